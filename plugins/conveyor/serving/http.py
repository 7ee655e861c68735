"""What every route of the model server shares: refusing a request, reading its body, error answers.

Nothing here imports Airflow: the server workers import this module.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

VERSION_HEADER = "X-Conveyor-Model-Version"


class RequestRejected(Exception):
    """A request refused before the model sees it.

    :param status: the HTTP status.
    :param message: what was wrong, for the client.
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str, version: str | None = None) -> JSONResponse:
    """A JSON error response: ``{"error": message}``.

    :param status: the HTTP status.
    :param message: what went wrong.
    :param version: the model version that handled the request, if one did.
    """
    headers = {VERSION_HEADER: version} if version else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


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
