"""Who may call the model server: AWS SigV4 signatures (what ``boto3`` ``sagemaker-runtime`` sends) or a bearer token.

Every route but ``GET /ping`` needs one of:

- ``Authorization: AWS4-HMAC-SHA256 Credential=<key id>/<date>/<region>/sagemaker/aws4_request,
  SignedHeaders=..., Signature=...`` with ``X-Amz-Date``: a ``sagemaker-runtime`` client given the
  endpoint's access key and ``endpoint_url=`` signs this way unchanged. The server recomputes the
  signature with botocore's own signer (``SigV4Auth``: canonical request, string to sign, signing
  key) over the request as received and compares it in constant time; the date must be within
  :data:`MAX_SKEW_S` of the server's clock, the ``host`` header signed, and an
  ``X-Amz-Content-SHA256`` header, if sent, must be the body's hash (no unsigned payloads);
- ``Authorization: Bearer <token>`` (curl, scripts).

Credentials (:func:`endpoint_credentials`): ``CONVEYOR_ENDPOINT_ACCESS_KEY_ID`` +
``CONVEYOR_ENDPOINT_SECRET_ACCESS_KEY`` and/or ``CONVEYOR_ENDPOINT_TOKEN`` when any is set; else
the file ``<state>/endpoint-credentials.json`` (mode 0600), generated with random values the first
time a server or client needs it. Empty, short or example secrets are refused (the server does not
start), naming the variable. Clients in the project use :func:`auth_headers` (SigV4 when a key is
configured, else the bearer token) or :func:`runtime_client`.

Nothing here imports Airflow; botocore's signer is imported once, with this module.
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from conveyor import settings
from conveyor.errors import ConveyorError

SERVICE = "sagemaker"  # the signing name of sagemaker-runtime
MAX_SKEW_S = 300
CREDENTIALS_FILE = "endpoint-credentials.json"
MIN_SECRET_CHARS = 20
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9]{4,128}$")
EXAMPLE_MARKERS = ("example", "change-me", "changeme", "change_me", "replace-me", "your-", "secret", "password")
ALGORITHM = "AWS4-HMAC-SHA256"
AMZ_DATE = "%Y%m%dT%H%M%SZ"
UNSIGNED = "UNSIGNED-PAYLOAD"
ENV_KEY_ID = "CONVEYOR_ENDPOINT_ACCESS_KEY_ID"
ENV_SECRET = "CONVEYOR_ENDPOINT_SECRET_ACCESS_KEY"
ENV_TOKEN = "CONVEYOR_ENDPOINT_TOKEN"
HELP = (
    "sign requests with AWS SigV4 (a boto3 sagemaker-runtime client with the endpoint's access key) "
    "or send 'Authorization: Bearer <token>' (the keys: CONVEYOR_ENDPOINT_* or <state>/endpoint-credentials.json)"
)


class EndpointAuthError(ConveyorError):
    """The endpoint's credentials are missing, weak or unreadable (names the variable or file): no server starts."""


class AuthFailed(Exception):
    """A request without valid credentials: answered 401 (none sent) or 403 (wrong ones).

    :param status: 401 or 403.
    :param code: the AWS error code ``sagemaker-runtime`` clients show.
    :param message: what was wrong, for the client.
    """

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class EndpointCredentials:
    """What a client must prove: an access key (SigV4) and/or a bearer token.

    :param access_key_id: the SigV4 access key id, or None (SigV4 off).
    :param secret_access_key: its secret.
    :param token: the bearer token, or None (bearer off).
    :param source: where they came from (the environment or the file), for messages.
    """

    access_key_id: str | None
    secret_access_key: str | None
    token: str | None
    source: str

    def __repr__(self) -> str:  # never show the secrets
        return f"EndpointCredentials(access_key_id={self.access_key_id!r}, source={self.source!r})"


# ------------------------------------------------------------------------------------- credentials


def credentials_path() -> Path:
    """``<state>/endpoint-credentials.json``: the generated credentials of the local default."""
    return settings.state_dir() / CREDENTIALS_FILE


def check_secret(name: str, value: str | None) -> str:
    """A secret, refused when empty, short, or one of the published examples.

    :param name: the variable (or file field) it came from, for the message.
    :param value: the value.
    :raises EndpointAuthError: naming the variable and the rule it broke.
    """
    text = (value or "").strip()
    if not text:
        raise EndpointAuthError(
            f"{name} is empty: set a random value (python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if len(text) < MIN_SECRET_CHARS or any(c.isspace() for c in text):
        raise EndpointAuthError(f"{name} must be at least {MIN_SECRET_CHARS} characters without spaces")
    if any(marker in text.lower() for marker in EXAMPLE_MARKERS):
        raise EndpointAuthError(f"{name} is an example value: set a random one")
    return text


def check_key_id(name: str, value: str | None) -> str:
    """An access key id: 4 to 128 letters or digits, not a published example.

    :param name: the variable it came from.
    :param value: the value.
    :raises EndpointAuthError: naming the variable and the rule.
    """
    text = (value or "").strip()
    if not KEY_ID_PATTERN.match(text):
        raise EndpointAuthError(f"{name}={text!r} must be 4 to 128 letters or digits")
    if "example" in text.lower():
        raise EndpointAuthError(f"{name}={text!r} is an example value: set your own")
    return text


def _from_environment() -> EndpointCredentials | None:
    """The credentials the environment configures, checked; None when it sets none."""
    key_id, secret, token = settings.endpoint_auth_env()
    if key_id is None and secret is None and token is None:
        return None
    if (key_id is None) != (secret is None):
        missing = ENV_SECRET if secret is None else ENV_KEY_ID
        raise EndpointAuthError(f"{missing} is not set: {ENV_KEY_ID} and {ENV_SECRET} go together")
    return EndpointCredentials(
        access_key_id=None if key_id is None else check_key_id(ENV_KEY_ID, key_id),
        secret_access_key=None if secret is None else check_secret(ENV_SECRET, secret),
        token=None if token is None else check_secret(ENV_TOKEN, token),
        source="the environment",
    )


def _generate(path: Path) -> None:
    """Write fresh random credentials to ``path`` (mode 0600) unless another process got there first.

    :param path: the credentials file.
    """
    document = {
        "access_key_id": "CNV" + base64.b32encode(secrets.token_bytes(10)).decode(),
        "secret_access_key": secrets.token_urlsafe(30),
        "token": secrets.token_urlsafe(32),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # a link never replaces: the first writer wins
            os.link(temp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def _from_file(path: Path, create: bool) -> EndpointCredentials:
    """The credentials in ``path``, generated first when it does not exist and ``create``.

    :param path: the credentials file.
    :param create: generate the file when it is missing.
    :raises EndpointAuthError: a file others can read, one that is not JSON, or a weak secret in it.
    """
    if create and not path.exists():
        _generate(path)
    try:
        mode = path.stat().st_mode
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise EndpointAuthError(
            f"no endpoint credentials: {path} does not exist; set {ENV_TOKEN} (or {ENV_KEY_ID} and {ENV_SECRET})"
        ) from None
    except (OSError, ValueError) as error:
        raise EndpointAuthError(f"endpoint credentials {path} cannot be read ({error})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise EndpointAuthError(
            f"endpoint credentials {path} can be read by others (mode {oct(mode & 0o777)}): chmod 600 it"
        )
    if not isinstance(document, dict):
        raise EndpointAuthError(f"endpoint credentials {path} must hold a JSON object")
    return EndpointCredentials(
        access_key_id=check_key_id(f"{path}: access_key_id", document.get("access_key_id")),
        secret_access_key=check_secret(f"{path}: secret_access_key", document.get("secret_access_key")),
        token=check_secret(f"{path}: token", document.get("token")),
        source=str(path),
    )


def endpoint_credentials(create: bool = True) -> EndpointCredentials:
    """The endpoint's credentials: from the environment when it sets any, else the state folder's file.

    :param create: generate the file (random values, mode 0600) when neither exists.
    :raises EndpointAuthError: a missing, weak or example secret, naming where it came from.
    """
    return _from_environment() or _from_file(credentials_path(), create)


# ------------------------------------------------------------------------------------- verifying


PAYLOAD_DIGEST = "conveyor_payload_sha256"


class _ServerSigner(SigV4Auth):
    """botocore's SigV4 signer, given the body's SHA-256 already computed (it is checked against the header too)."""

    def payload(self, request: AWSRequest) -> str:
        """The hex SHA-256 of the body, as :meth:`SigV4Auth.payload` computes it for a signed payload.

        :param request: the reconstructed request (its context holds the digest).
        """
        return request.context[PAYLOAD_DIGEST]


def _epoch(amz_date: str) -> int:
    """Seconds since the epoch of an ``X-Amz-Date`` (``YYYYMMDDTHHMMSSZ``, UTC).

    :param amz_date: the header's value.
    :raises ValueError: another format.
    """
    digits = amz_date[:8] + amz_date[9:15]
    if len(amz_date) != 16 or amz_date[8] != "T" or amz_date[15] != "Z" or not (digits.isascii() and digits.isdigit()):
        raise ValueError(amz_date)
    fields = [int(digits[start:end]) for start, end in ((0, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 14))]
    return calendar.timegm((*fields, 0, 0, 0))


@dataclass(frozen=True)
class SignedRequest:
    """The parts of a SigV4 ``Authorization`` header (checked before the body is read)."""

    region: str
    amz_date: str
    signed_headers: tuple[str, ...]
    signature: str


def _field(parts: dict[str, str], name: str) -> str:
    """One ``Name=value`` field of a SigV4 Authorization header.

    :param parts: the fields.
    :param name: the field's name.
    """
    value = parts.get(name)
    if not value:
        raise AuthFailed(
            403, "IncompleteSignatureException", f"the AWS4-HMAC-SHA256 Authorization header has no {name}="
        )
    return value


class Verifier:
    """Checks a request's credentials against the endpoint's (cheap: a few HMACs and one body hash).

    :param credentials: what clients must prove.
    :param max_skew: the largest difference, in seconds, between ``X-Amz-Date`` and the server's clock.
    :param clock: the server's clock (seconds since the epoch).
    """

    def __init__(self, credentials: EndpointCredentials, max_skew: float = MAX_SKEW_S, clock: Any = time.time):
        self.credentials = credentials
        self.max_skew = max_skew
        self.clock = clock
        self._help = HELP
        self._signer_credentials = (
            Credentials(credentials.access_key_id, credentials.secret_access_key)
            if credentials.access_key_id and credentials.secret_access_key
            else None
        )

    def check_headers(self, headers: Mapping[str, str]) -> SignedRequest | None:
        """Check what can be checked before the body is read: a bearer token fully, a signature's key and date.

        :param headers: the request headers (lower-case names).
        :return: the signature left to check against the body, or None (a valid bearer token).
        :raises AuthFailed: 401 no credentials, 403 wrong ones.
        """
        header = headers.get("authorization")
        if not header or not header.strip():
            raise AuthFailed(
                401, "MissingAuthenticationTokenException", f"this endpoint needs authentication: {self._help}"
            )
        scheme, _, rest = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            token = self.credentials.token
            if token is None:
                raise AuthFailed(
                    403,
                    "UnrecognizedClientException",
                    "bearer tokens are not enabled on this endpoint: sign with SigV4",
                )
            if not hmac.compare_digest(rest.strip().encode(), token.encode()):
                raise AuthFailed(
                    403, "UnrecognizedClientException", f"the bearer token is not valid for this endpoint; {self._help}"
                )
            return None
        if scheme != ALGORITHM:
            raise AuthFailed(
                403,
                "IncompleteSignatureException",
                f"Authorization scheme {scheme[:40]!r} is not supported: {self._help}",
            )
        return self._check_signature_header(rest, headers)

    def _check_signature_header(self, rest: str, headers: Mapping[str, str]) -> SignedRequest:
        """Parse and check a SigV4 Authorization header's credential scope and date.

        :param rest: the header after ``AWS4-HMAC-SHA256``.
        :param headers: the request headers.
        """
        if self._signer_credentials is None:
            raise AuthFailed(
                403, "UnrecognizedClientException", "SigV4 is not enabled on this endpoint: send a bearer token"
            )
        parts: dict[str, str] = {}
        for part in rest.split(","):
            name, _, value = part.strip().partition("=")
            parts[name] = value
        scope = _field(parts, "Credential").split("/")
        signed = tuple(_field(parts, "SignedHeaders").split(";"))
        signature = _field(parts, "Signature")
        if len(scope) != 5 or scope[4] != "aws4_request":
            raise AuthFailed(
                403,
                "IncompleteSignatureException",
                "the credential scope must be <key id>/<date>/<region>/sagemaker/aws4_request",
            )
        key_id, date, region, service, _ = scope
        if not hmac.compare_digest(key_id.encode(), (self.credentials.access_key_id or "").encode()):
            raise AuthFailed(
                403,
                "UnrecognizedClientException",
                f"access key id {key_id[:32]!r} is not this endpoint's; {self._help}",
            )
        if service != SERVICE:
            raise AuthFailed(
                403, "InvalidSignatureException", f"the signature is for service {service!r}, not {SERVICE!r}"
            )
        amz_date = headers.get("x-amz-date", "")
        try:
            signed_at = _epoch(amz_date)
        except ValueError:
            raise AuthFailed(
                403, "IncompleteSignatureException", f"X-Amz-Date {amz_date[:40]!r} is missing or not YYYYMMDDTHHMMSSZ"
            ) from None
        skew = signed_at - self.clock()
        if abs(skew) > self.max_skew:
            raise AuthFailed(
                403,
                "InvalidSignatureException",
                f"Signature expired: X-Amz-Date {amz_date} is {abs(skew):.0f}s from the server's time "
                f"(at most {self.max_skew:.0f}s allowed)",
            )
        if date != amz_date[:8]:
            raise AuthFailed(
                403, "InvalidSignatureException", f"the credential scope's date {date!r} is not X-Amz-Date's"
            )
        if "host" not in signed:
            raise AuthFailed(403, "InvalidSignatureException", "the host header must be signed")
        missing = [name for name in signed if name not in headers]
        if missing:
            raise AuthFailed(
                403, "InvalidSignatureException", f"signed header(s) {', '.join(missing)} are not in the request"
            )
        return SignedRequest(region, amz_date, signed, signature)

    def check_signature(
        self, signed: SignedRequest, method: str, path: str, query: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> None:
        """Recompute the SigV4 signature of the request as received (botocore's signer) and compare.

        :param signed: what :meth:`check_headers` returned.
        :param method: the HTTP method.
        :param path: the raw (still percent-encoded) path.
        :param query: the raw query string.
        :param headers: every request header (lower-case names; repeated ones in order).
        :param body: the request body.
        :raises AuthFailed: 403 when the signature differs.
        """
        values = list(headers)
        digest = hashlib.sha256(body).hexdigest()
        content_hash = [value for name, value in values if name == "x-amz-content-sha256"]
        if content_hash and content_hash[-1].strip().lower() != digest:
            what = (
                "UNSIGNED-PAYLOAD is not accepted" if content_hash[-1].strip() == UNSIGNED else "it is not the body's"
            )
            raise AuthFailed(403, "InvalidSignatureException", f"X-Amz-Content-SHA256: {what}")
        request = AWSRequest(method=method, url=f"http://conveyor{path}" + (f"?{query}" if query else ""), data=body)
        wanted = set(signed.signed_headers)
        for name, value in values:
            if name in wanted:
                request.headers[name] = value  # an HTTPMessage: a repeated header is added, not replaced
        request.context["timestamp"] = signed.amz_date
        request.context[PAYLOAD_DIGEST] = digest
        signer = _ServerSigner(self._signer_credentials, SERVICE, signed.region)
        expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
        if not hmac.compare_digest(expected.encode(), signed.signature.strip().encode()):
            raise AuthFailed(
                403,
                "InvalidSignatureException",
                "the request signature does not match: check the secret access key, and that nothing changed the "
                "request (body, signed headers, path) after it was signed",
            )


# ------------------------------------------------------------------------------------- clients


def auth_headers(
    method: str, url: str, body: bytes = b"", headers: Mapping[str, str] | None = None, bearer: bool | None = None
) -> dict[str, str]:
    """The headers to send for one request: ``headers`` plus SigV4 (when a key is configured) or a bearer token.

    :param method: the HTTP method.
    :param url: the full URL.
    :param body: the body that will be sent, exactly.
    :param headers: the request's other headers (signed with it).
    :param bearer: force the bearer token (True) or SigV4 (False); None picks SigV4 when configured.
    """
    credentials = endpoint_credentials()
    out = dict(headers or {})
    use_bearer = bearer if bearer is not None else not credentials.access_key_id
    if use_bearer:
        if credentials.token is None:
            raise EndpointAuthError(f"no bearer token configured ({ENV_TOKEN}): sign with SigV4 instead")
        out["Authorization"] = f"Bearer {credentials.token}"
        return out
    if not credentials.access_key_id:
        raise EndpointAuthError(f"no access key configured ({ENV_KEY_ID}): use the bearer token instead")
    request = AWSRequest(method=method, url=url, data=body, headers=out)
    region = os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    SigV4Auth(Credentials(credentials.access_key_id, credentials.secret_access_key), SERVICE, region).add_auth(request)
    return dict(request.headers.items())


def runtime_client(url: str, region: str = "us-east-1", **config: Any) -> Any:
    """A boto3 ``sagemaker-runtime`` client for the local endpoint at ``url``, with its access key.

    :param url: the endpoint server's base URL.
    :param region: any region (it is part of the signature, not checked).
    :param config: ``botocore.config.Config`` options (e.g. ``retries``).
    """
    import boto3
    from botocore.config import Config

    credentials = endpoint_credentials()
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=url,
        region_name=region,
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        config=Config(**config) if config else None,
    )
