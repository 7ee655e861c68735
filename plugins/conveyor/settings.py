"""Every environment variable Conveyor reads, in one place; nothing else in the package reads one.

| variable | read by | default |
|---|---|---|
| ``CONVEYOR_STATE_DIR`` | everything local | ``<project>/.state`` (AIRFLOW_HOME, SQLite stores, the local lake) |
| ``CONVEYOR_INCLUDE_DIR`` | DAG factory, training | ``<project>/include`` (pipelines, suites, training code) |
| ``CONVEYOR_LAKE_URI`` | every task | ``file://<state>/lake`` |
| ``CONVEYOR_LAKE_CONN_ID`` | every task | none for local files, ``aws_default`` for ``s3://`` |
| ``MLFLOW_TRACKING_URI`` | registry, gate | SQLite store ``<state>/mlflow/mlflow.db`` |
| ``CONVEYOR_WAREHOUSE_URL`` | batch predictions | ``conveyor_warehouse`` connection, else ``<state>/warehouse.db`` |
| ``CONVEYOR_GPU_QUEUE`` | DAG factory | ``gpu`` (the Celery queue of GPU training tasks) |
| ``CONVEYOR_ENDPOINT_URL`` | deploy | none: deploy starts the endpoint on this host; set: the endpoint service's URL |
| ``CONVEYOR_ENDPOINT_WORKERS`` | deploy (endpoint service) | ``1`` (workers of an endpoint run as its own service) |
| ``CONVEYOR_ENDPOINT`` | model server worker | set by the endpoint process (the endpoint's name) |
| ``CONVEYOR_MAX_BODY_BYTES`` | model server | ``6291456`` (6 MiB, SageMaker's limit) |
| ``CONVEYOR_INFERENCE_CONCURRENCY`` | model server | ``1`` predictions at a time per worker |
| ``CONVEYOR_MAX_BATCH_SIZE`` | model server | ``64`` rows in one merged predict (spec ``max_batch_size``) |
| ``CONVEYOR_MAX_BATCH_WAIT_MS`` | model server | ``0``: a batch starts at once when idle (``max_batch_wait_ms``) |
| ``CONVEYOR_CAPTURE_DIR`` | model server | none (no capture); set by deploy from the spec's ``capture_share`` |
| ``CONVEYOR_CAPTURE_SHARE`` | model server | ``1.0`` of requests captured when capture is on |
| ``CONVEYOR_FEEDBACK_DIR`` | model server | none (``POST /feedback`` answers 503); set by deploy for a local lake |
| ``CONVEYOR_ENDPOINT_ACCESS_KEY_ID`` | endpoint, clients | SigV4 key id; none: ``<state>/endpoint-credentials.json`` |
| ``CONVEYOR_ENDPOINT_SECRET_ACCESS_KEY`` | endpoint, clients | its secret (20+ characters); none: as above |
| ``CONVEYOR_ENDPOINT_TOKEN`` | endpoint, clients | bearer token (20+ characters); none: as above (0600) |
| ``CONVEYOR_MAX_HEADER_BYTES`` | model server | ``16384``: request line + headers; more is answered 431 |
| ``CONVEYOR_REQUEST_MAX_IMAGES`` | image inference | ``64`` images per request; more is answered 413 |
| ``CONVEYOR_REQUEST_MAX_IMAGE_PIXELS`` | image inference | ``40000000`` pixels per image, read before decoding |
| ``CONVEYOR_REQUEST_MAX_PIXELS`` | image inference | ``100000000`` pixels per request, all images together |
| ``CONVEYOR_ALLOW_UNHASHED_MODELS`` | model loaders | ``false``: versions with no sha256 refused; ``true``: warned |
| ``CONVEYOR_INGEST_MAX_ATTEMPTS`` | ingest | ``3`` tries of a drop failing unclearly, then quarantine |
| ``CONVEYOR_MAX_DECOMPRESSED_BYTES`` | ingest, validation | ``2147483648`` (2 GiB) per inflated CSV; more is refused |
| ``CONVEYOR_MAX_IMAGE_PIXELS`` | ingest | ``89478485`` pixels per image (PIL's limit); more: a bad file |
| ``CONVEYOR_MAX_MANIFEST_BYTES`` | ingest | ``67108864`` (64 MiB) for an image drop's ``manifest.csv`` |
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
GPU_QUEUE_DEFAULT = "gpu"
MAX_BODY_BYTES_DEFAULT = 6 * 1024 * 1024  # SageMaker's real-time payload limit
MAX_HEADER_BYTES_DEFAULT = 16 * 1024  # the request line and every header together


def state_dir() -> Path:
    """The project-local state folder."""
    return Path(os.environ.get("CONVEYOR_STATE_DIR", PROJECT_ROOT / ".state"))


def include_dir() -> Path:
    """The folder of pipelines, expectation suites, training and inference code."""
    return Path(os.environ.get("CONVEYOR_INCLUDE_DIR", PROJECT_ROOT / "include"))


def pipelines_dir() -> Path:
    """The pipeline files (read by the DAG factory, once per parse)."""
    return include_dir() / "pipelines"


def expectations_dir() -> Path:
    """The expectation suites, one per pipeline."""
    return include_dir() / "expectations"


def lake_uri() -> str:
    """The lake root URI."""
    return os.environ.get("CONVEYOR_LAKE_URI") or (state_dir() / "lake").as_uri()


def lake_conn_id() -> str | None:
    """The Airflow connection of the lake's object store, if it has one."""
    conn_id = os.environ.get("CONVEYOR_LAKE_CONN_ID")
    if conn_id is None and lake_uri().startswith("s3://"):
        return "aws_default"
    return conn_id or None


def mlflow_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, or the SQLite store in the state folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir() / 'mlflow' / 'mlflow.db'}"


def warehouse_url_override() -> str | None:
    """``CONVEYOR_WAREHOUSE_URL`` when set (it wins over the ``conveyor_warehouse`` connection)."""
    return os.environ.get("CONVEYOR_WAREHOUSE_URL") or None


def default_warehouse_url() -> str:
    """The embedded default warehouse: SQLite in the project's state folder."""
    return f"sqlite:///{state_dir() / 'warehouse.db'}"


def gpu_queue() -> str:
    """The Celery queue of tasks that need a GPU: ``CONVEYOR_GPU_QUEUE``, ``gpu`` by default."""
    return os.environ.get("CONVEYOR_GPU_QUEUE") or GPU_QUEUE_DEFAULT


def endpoint_service_url() -> str | None:
    """``CONVEYOR_ENDPOINT_URL``: the model endpoint runs as its own service at this URL."""
    return (os.environ.get("CONVEYOR_ENDPOINT_URL") or "").rstrip("/") or None


def endpoint_service_workers() -> int:
    """``CONVEYOR_ENDPOINT_WORKERS``: the workers of an endpoint run as its own service."""
    return int(env_number("CONVEYOR_ENDPOINT_WORKERS", 1, 1))


def env_number(name: str, default: float, low: float, high: float | None = None) -> float:
    """A number from the environment, checked against its range.

    :param name: the variable.
    :param default: the value when unset or empty.
    :param low: the smallest value allowed.
    :param high: the largest value allowed (None: no limit).
    :raises ValueError: naming the variable, its value and the rule it broke.
    """
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise ValueError(f"{name}={raw!r} must be {bound}")
    return value


@dataclass(frozen=True)
class ServerSettings:
    """What one model-server worker reads from its environment (the endpoint process sets it)."""

    endpoint: str | None
    max_body_bytes: int
    concurrency: int
    capture_dir: Path | None
    capture_share: float
    feedback_dir: Path | None
    max_header_bytes: int = MAX_HEADER_BYTES_DEFAULT
    max_batch_size: int = 64
    max_batch_wait_ms: float = 0.0


def server_settings() -> ServerSettings:
    """The model server's settings (``CONVEYOR_ENDPOINT``, ``CONVEYOR_MAX_BODY_BYTES``, ...)."""
    capture = os.environ.get("CONVEYOR_CAPTURE_DIR")
    feedback = os.environ.get("CONVEYOR_FEEDBACK_DIR")
    return ServerSettings(
        endpoint=os.environ.get("CONVEYOR_ENDPOINT") or None,
        max_body_bytes=int(env_number("CONVEYOR_MAX_BODY_BYTES", MAX_BODY_BYTES_DEFAULT, 1)),
        concurrency=int(env_number("CONVEYOR_INFERENCE_CONCURRENCY", 1, 1)),
        capture_dir=Path(capture) if capture else None,
        capture_share=env_number("CONVEYOR_CAPTURE_SHARE", 1.0, 0.0, 1.0),
        feedback_dir=Path(feedback) if feedback else None,
        max_header_bytes=int(env_number("CONVEYOR_MAX_HEADER_BYTES", MAX_HEADER_BYTES_DEFAULT, 1024)),
        max_batch_size=int(env_number("CONVEYOR_MAX_BATCH_SIZE", 64, 1, 10_000)),
        max_batch_wait_ms=env_number("CONVEYOR_MAX_BATCH_WAIT_MS", 0.0, 0.0, 1000.0),
    )


def endpoint_auth_env() -> tuple[str | None, str | None, str | None]:
    """The endpoint's configured credentials: access key id, secret access key, bearer token (None: unset)."""
    names = ("CONVEYOR_ENDPOINT_ACCESS_KEY_ID", "CONVEYOR_ENDPOINT_SECRET_ACCESS_KEY", "CONVEYOR_ENDPOINT_TOKEN")
    key_id, secret, token = (os.environ.get(name) for name in names)
    return key_id, secret, token


def allow_unhashed_models() -> bool:
    """``CONVEYOR_ALLOW_UNHASHED_MODELS``: load versions registered before archive hashes were recorded (warned)."""
    return (os.environ.get("CONVEYOR_ALLOW_UNHASHED_MODELS") or "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class IngestSettings:
    """The caps and the retry policy of drop ingest (``CONVEYOR_INGEST_MAX_ATTEMPTS``, ``CONVEYOR_MAX_*``)."""

    max_attempts: int
    max_decompressed_bytes: int
    max_image_pixels: int
    max_manifest_bytes: int


def ingest_settings() -> IngestSettings:
    """The ingest caps, read from the environment each time (a task sees its own environment)."""
    return IngestSettings(
        max_attempts=int(env_number("CONVEYOR_INGEST_MAX_ATTEMPTS", 3, 1)),
        max_decompressed_bytes=int(env_number("CONVEYOR_MAX_DECOMPRESSED_BYTES", 2 * 1024**3, 1)),
        max_image_pixels=int(env_number("CONVEYOR_MAX_IMAGE_PIXELS", 89_478_485, 1)),
        max_manifest_bytes=int(env_number("CONVEYOR_MAX_MANIFEST_BYTES", 64 * 1024**2, 1)),
    )


_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#]*@")
_SECRET_PARAMS = re.compile(
    r"(?P<key>[?&;](?:password|passwd|pwd|secret|[a-z_]*secret_access_key|token|access_token|api_key|apikey"
    r"|x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig)=)[^&;\s#'\"]*",
    re.IGNORECASE,
)


def mask_url(text: str) -> str:
    """A URL, or any text holding URLs, with credentials replaced by ``***``: safe to print, log or raise.

    ``postgresql://user:pw@db/warehouse`` -> ``postgresql://***@db/warehouse``; a ``password=``,
    ``token=``, ``secret=`` or S3 signature parameter keeps its name, its value becomes ``***``.

    :param text: a URL (warehouse, ``MLFLOW_TRACKING_URI``, lake) or a message that may contain one.
    """
    return _SECRET_PARAMS.sub(r"\g<key>***", _URL_USERINFO.sub(r"\g<scheme>***@", str(text)))
