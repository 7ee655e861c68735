"""What a failure while reading a drop means: bad input, a storage hiccup, or not clear yet.

Ingest sorts every exception raised while it reads a drop into one of three kinds:

- ``reject``: the bytes themselves are bad (they cannot be decoded, parsed or decompressed);
  the same bytes fail the same way, so the drop is quarantined at once with the reason.
- ``transient``: the storage or the network failed (S3 5xx or throttling, timeouts, refused or
  reset connections); the drop is fine, so it is never quarantined for it: the error propagates
  and Airflow's retries apply.
- ``unclear``: anything else (a local ``OSError``, an exception no rule knows); the drop gets
  ``CONVEYOR_INGEST_MAX_ATTEMPTS`` tries, counted in the lake, then it is quarantined.
"""

from __future__ import annotations

import csv
import errno
import zlib
from typing import Literal

Kind = Literal["reject", "transient", "unclear"]

# errno values of a storage or network failure (s3fs maps 500 to EREMOTEIO, 503 to EBUSY, unknown to EIO).
_TRANSIENT_ERRNO = frozenset(
    getattr(errno, name)
    for name in (
        "EREMOTEIO",
        "EIO",
        "EBUSY",
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EAGAIN",
        "ENETUNREACH",
        "ENETDOWN",
        "EHOSTUNREACH",
        "EPIPE",
    )
    if hasattr(errno, name)
)
# botocore / urllib3 / aiohttp classes that mean the request never got a usable answer.
_TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ConnectionError",
        "HTTPClientError",
        "ProxyConnectionError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ProtocolError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientPayloadError",
        "ServerTimeoutError",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
    }
)
_REMOTE_MODULES = ("botocore", "aiobotocore", "urllib3", "aiohttp", "s3fs")


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and the ones it was raised from (``__cause__``, else ``__context__``), at most 8."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 8:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _client_error_is_transient(exc: BaseException) -> bool:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
    code = (response.get("Error") or {}).get("Code") or ""
    return int(status) >= 500 or int(status) == 429 or code in _TRANSIENT_CODES


def _one_is_transient(exc: BaseException) -> bool:
    from conveyor.errors import TransientError

    if isinstance(exc, TransientError | TimeoutError | ConnectionError):
        return True
    module = type(exc).__module__ or ""
    if module.startswith(_REMOTE_MODULES):
        if type(exc).__name__ == "ClientError":
            return _client_error_is_transient(exc)
        return any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__)
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO and not _is_bad_bytes(exc)


def is_transient(exc: BaseException) -> bool:
    """Whether an exception is a storage or network failure that a retry may pass.

    :param exc: the exception raised while reading or writing the lake.
    """
    return any(_one_is_transient(item) for item in _chain(exc))


def _is_bad_bytes(exc: BaseException) -> bool:
    import gzip
    import lzma

    return isinstance(exc, gzip.BadGzipFile | EOFError | zlib.error | lzma.LZMAError)


def _is_deterministic(exc: BaseException) -> bool:
    """Errors that the bytes themselves cause: decoding, parsing, decompressing, decoding an image."""
    if _is_bad_bytes(exc) or isinstance(exc, ValueError | csv.Error | RecursionError | OverflowError):
        return True  # UnicodeDecodeError, ArrowInvalid and JSONDecodeError are ValueErrors
    module = type(exc).__module__ or ""  # PIL's DecompressionBombError and UnidentifiedImageError among them
    return module.startswith(("PIL", "pyarrow")) and not isinstance(exc, OSError | MemoryError)


def classify(exc: BaseException) -> Kind:
    """How ingest treats an exception raised while it reads a drop (see the module's docstring).

    :param exc: the exception.
    """
    from conveyor.errors import DropRejected

    if isinstance(exc, DropRejected):
        return "reject"
    if is_transient(exc):
        return "transient"
    if _is_deterministic(exc):
        return "reject"
    return "unclear"


def describe(exc: BaseException) -> str:
    """One line for a report: the exception's type and message.

    :param exc: the exception.
    """
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:500]}" if text else type(exc).__name__
