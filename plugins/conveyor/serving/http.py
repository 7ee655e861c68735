"""What every route of the model server shares: refusing a request, reading its body, error answers.

Error answers have the shape ``sagemaker-runtime`` clients parse (botocore's rest-json protocol):
the error code in the ``x-amzn-ErrorType`` header and the readable text in the JSON body's
``message`` (kept in ``error`` too), so ``ClientError`` shows ``ValidationError`` and the text
rather than an empty message. The codes are those of the SageMaker runtime API where one fits:
``ValidationError`` (4xx), ``ModelError`` (the model failed; with ``OriginalStatusCode`` and
``OriginalMessage``), ``ServiceUnavailable`` (503), ``InternalFailure`` (other 5xx); 401 and 403
use the AWS authentication codes (see :mod:`conveyor.serving.auth`).

Nothing here imports Airflow: the server workers import this module.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import Request
from fastapi.responses import JSONResponse

VERSION_HEADER = "X-Conveyor-Model-Version"
ERROR_TYPE_HEADER = "x-amzn-ErrorType"
CODES = {401: "MissingAuthenticationTokenException", 403: "AccessDeniedException", 503: "ServiceUnavailable"}


class RequestRejected(Exception):
    """A request refused before the model sees it.

    :param status: the HTTP status.
    :param message: what was wrong, for the client.
    :param code: the error code clients see (None: the status's default, see :func:`error_code`).
    """

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def error_code(status: int) -> str:
    """The SageMaker runtime error code of a status: ``ValidationError`` for 4xx, ``InternalFailure`` for 5xx.

    :param status: the HTTP status.
    """
    return CODES.get(status) or ("ValidationError" if status < 500 else "InternalFailure")


def error_response(
    status: int,
    message: str,
    version: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A JSON error response boto3 parses: ``x-amzn-ErrorType: <code>`` and ``{"message": ..., "error": ...}``.

    :param status: the HTTP status.
    :param message: what went wrong.
    :param version: the model version that handled the request, if one did.
    :param code: the error code (None: :func:`error_code` of the status).
    :param headers: more headers (e.g. ``WWW-Authenticate``).
    """
    code = code or error_code(status)
    out = {ERROR_TYPE_HEADER: code, **(headers or {})}
    if version:
        out[VERSION_HEADER] = version
    body: dict[str, object] = {"message": message, "error": message}
    if code == "ModelError":
        body.update({"OriginalStatusCode": status, "OriginalMessage": message})
    return JSONResponse(body, status_code=status, headers=out)


def head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """The size of a request head as sent: the target plus ``name: value\\r\\n`` per header.

    :param url: the request target (path and query).
    :param headers: the headers.
    """
    return len(url) + sum(len(name) + len(value) + 4 for name, value in headers)


def too_large_message(limit: int) -> str:
    """The text of a 431 answer.

    :param limit: the limit, in bytes.
    """
    return f"the request line and headers are larger than the limit of {limit} bytes (CONVEYOR_MAX_HEADER_BYTES)"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) above ``limit`` bytes by its Content-Length or its actual size.

    :param request: the request.
    :param limit: the largest body allowed.
    :raises RequestRejected: a Content-Length that is not a number (400), or a body over the limit (413).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestRejected(400, f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise RequestRejected(413, f"request body of {size} bytes is larger than the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestRejected(413, f"request body is larger than the limit of {limit} bytes")
    return bytes(body)
