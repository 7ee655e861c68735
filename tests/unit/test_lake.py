"""The lake's own rules: atomic writes (local and S3), which errors are transient, and which locations
and dataset versions a person or an event may name (issue 17 items 8, 10 and 13)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from conveyor.errors import ConveyorError, TransientError
from conveyor.lake import Lake, LocationRefused, check_dataset_version, is_transient, read_json, write_json

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


def leftovers(folder: Path) -> list[str]:
    """Temporary files a write left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------------- atomic writes


def run_with_file_size_limit(code: str, limit: int) -> subprocess.CompletedProcess:
    """Run Python code in a child process whose files cannot grow past ``limit`` bytes (a full disk).

    Writes past the limit fail with EFBIG half-way, as they would on a full disk or quota.
    """
    prelude = textwrap.dedent(
        f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120
    )


def test_a_json_write_that_fails_half_way_keeps_the_old_document_and_leaves_no_temp_file(lake):
    pointer = lake.raw("churn") / "LATEST.json"
    write_json(pointer, {"version": "v-0123456789abcdef0123"})
    folder = Path(pointer.path).parent
    result = run_with_file_size_limit(
        f"""
        from airflow.sdk import ObjectStoragePath
        from conveyor.lake import write_json
        try:
            write_json(ObjectStoragePath({pointer.as_uri()!r}), {{"version": "v-" + "f" * 20, "pad": "x" * 100_000}})
        except OSError as error:
            print("failed", error.errno)
        """,
        limit=50_000,
    )
    assert f"failed {errno.EFBIG}" in result.stdout, result.stderr[-2000:]
    assert read_json(pointer) == {"version": "v-0123456789abcdef0123"}  # the old pointer, whole
    assert leftovers(folder) == []


def test_an_upload_that_fails_half_way_keeps_the_old_page(lake, tmp_path):
    from conveyor.lake import upload_tree

    report = lake.reports("churn", "run-1")
    source = tmp_path / "report"
    source.mkdir()
    (source / "index.html").write_text("<html>old</html>")
    upload_tree(source, report)
    (source / "index.html").write_text("<html>" + "x" * 200_000 + "</html>")
    result = run_with_file_size_limit(
        f"""
        from pathlib import Path
        from airflow.sdk import ObjectStoragePath
        from conveyor.lake import upload_tree
        try:
            upload_tree(Path({str(source)!r}), ObjectStoragePath({report.as_uri()!r}))
        except OSError as error:
            print("failed", error.errno)
        """,
        limit=100_000,
    )
    assert f"failed {errno.EFBIG}" in result.stdout, result.stderr[-2000:]
    assert (report / "index.html").read_text() == "<html>old</html>"
    assert leftovers(Path(report.path)) == []


def test_a_reader_never_sees_a_half_written_pointer(lake):
    pointer = lake.monitor("churn", "capture_offsets.json")
    documents = [{f"capture/{n}.jsonl": n * 1000 for n in range(4000)}, {"capture/a.jsonl": 1}]
    write_json(pointer, documents[0])
    errors: list[Exception] = []
    done = threading.Event()

    def read_forever() -> None:
        while not done.is_set():
            try:
                assert read_json(pointer) in documents
            except Exception as error:  # noqa: BLE001 - an empty or cut document: what this test looks for
                errors.append(error)

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        for n in range(150):
            write_json(pointer, documents[n % 2])
    finally:
        done.set()
        reader.join()
    assert errors == []
    assert leftovers(Path(pointer.path).parent) == []


def test_a_write_to_s3_is_one_object_and_a_failed_one_keeps_the_old(s3_lake):
    from conveyor.lake import replacing

    pointer = s3_lake.raw("churn") / "LATEST.json"
    write_json(pointer, {"version": "v-0123456789abcdef0123"})
    write_json(pointer, {"version": "v-" + "a" * 20})
    assert read_json(pointer) == {"version": "v-" + "a" * 20}
    with pytest.raises(RuntimeError, match="cut"), replacing(pointer) as handle:
        handle.write(b'{"version": ')
        raise RuntimeError("cut")
    assert read_json(pointer) == {"version": "v-" + "a" * 20}
    assert sorted(p.name for p in pointer.parent.iterdir()) == ["LATEST.json"]


# ---------------------------------------------------------------------------------- transient


def client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Get"
    )


def s3fs_error(status: int, code: str) -> OSError:
    """The OSError s3fs raises for an S3 error response (its own translation, cause kept)."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(client_error(status, code))


def test_storage_5xx_timeouts_and_lost_connections_are_transient():
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

    assert is_transient(client_error(503, "SlowDown"))
    assert is_transient(client_error(500, "InternalError"))
    assert is_transient(client_error(400, "ThrottlingException"))
    assert is_transient(s3fs_error(503, "ServiceUnavailable"))
    assert is_transient(s3fs_error(500, "InternalError"))
    assert is_transient(s3fs_error(400, "RequestTimeout"))
    assert is_transient(EndpointConnectionError(endpoint_url="http://minio:9000"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://minio:9000"))
    assert is_transient(ConnectTimeoutError(endpoint_url="http://minio:9000"))
    assert is_transient(TimeoutError("timed out"))
    assert is_transient(ConnectionResetError("reset by peer"))
    assert is_transient(OSError(errno.EIO, "Input/output error"))
    assert is_transient(OSError(errno.ESTALE, "Stale file handle"))
    assert is_transient(TransientError("registry: 503"))
    wrapped = RuntimeError("while reading")
    wrapped.__cause__ = client_error(502, "BadGateway")
    assert is_transient(wrapped)


def test_bad_input_missing_files_and_refusals_are_not_transient():
    assert not is_transient(None)
    assert not is_transient(s3fs_error(404, "NoSuchKey"))
    assert not is_transient(s3fs_error(403, "AccessDenied"))
    assert not is_transient(client_error(400, "InvalidArgument"))
    assert not is_transient(FileNotFoundError(errno.ENOENT, "no such file"))
    assert not is_transient(PermissionError(errno.EACCES, "denied"))
    assert not is_transient(OSError("Parquet magic bytes not found"))  # pyarrow's bad file: no errno
    assert not is_transient(ValueError("could not convert 'lots' to float"))
    deterministic = ConveyorError("bad rows")
    deterministic.__cause__ = TimeoutError("a timeout the domain already judged")
    assert not is_transient(deterministic)  # Conveyor's own errors say what they are


# ---------------------------------------------------------------------------------- locations


@pytest.fixture
def local(tmp_path) -> Lake:
    root = tmp_path / "lake"
    (root / "landing" / "churn" / "inference" / "d1").mkdir(parents=True)
    return Lake(root=root.as_uri())


@pytest.mark.parametrize(
    "given, rule",
    [
        ("http://127.0.0.1:8000/rows.csv", "http:// is not the lake's scheme"),
        ("https://example.com/rows.csv", "https:// is not the lake's scheme"),
        ("file:///etc", "not below the lake's root"),
        ("file:///etc/passwd", "not below the lake's root"),
        ("/etc/passwd", "not below the lake's root"),
        ("../../etc/passwd", "not below the lake's root"),
        ("landing/../../outside", "not below the lake's root"),
        ("file://otherhost/lake/x.csv", "host or bucket 'otherhost' is not the lake's"),
        ("s3://other-bucket/rows.csv", "s3:// is not the lake's scheme"),
        ("ftp://127.0.0.1/rows.csv", "ftp:// is not the lake's scheme"),
        ("landing/x.csv?token=1", None),  # a relative name: '?' is a character of it, not a query
        ("", "it is empty"),
        ("landing/\nx.csv", "control characters"),
    ],
)
def test_a_local_lake_refuses_what_is_not_inside_it(local, given, rule):
    if rule is None:
        assert local.inside(given, "Param 'input'").startswith(local.root + "/landing/")
        return
    with pytest.raises(LocationRefused, match=rf"^Param 'input': .* is refused: .*{rule}") as caught:
        local.inside(given, "Param 'input'")
    assert local.root in str(caught.value) and not caught.value.retryable


def test_a_local_lake_refuses_its_root_encoded_dots_and_symlinks_out(local, tmp_path):
    root = Path(local.root.removeprefix("file://"))
    for given in (local.root, str(root), f"{local.root}/landing/%2e%2e/%2e%2e/%2e%2e/etc", f"{root}other/x.csv"):
        with pytest.raises(LocationRefused, match="not below the lake's root"):
            local.inside(given, "Param 'input'")
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "landing" / "link").symlink_to(outside)
    with pytest.raises(LocationRefused, match="not below the lake's root"):
        local.inside("landing/link/rows.csv", "Param 'input'")


def test_a_local_lake_accepts_its_uris_paths_and_relative_names(local):
    root = local.root.removeprefix("file://")
    drop = f"{local.root}/landing/churn/inference/d1"
    assert local.inside(drop, "Param 'input'") == drop
    assert local.inside(f"file://localhost{root}/landing/churn/inference/d1", "x") == drop
    assert local.inside(f"{root}/landing/churn/inference/d1/", "x") == drop
    assert local.inside("landing/churn/inference/d1", "x") == drop
    assert local.inside(" landing/churn/x/../inference/d1 ", "x") == drop  # normalised, still inside


@pytest.mark.parametrize(
    "given, rule",
    [
        ("s3://other-bucket/conveyor/rows.csv", "host or bucket 'other-bucket' is not the lake's"),
        ("s3://stranger@lake-bucket/conveyor/rows.csv", "host or bucket 'stranger@lake-bucket' is not the lake's"),
        ("s3://lake-bucket/elsewhere/rows.csv", "not below the lake's root"),
        ("s3://lake-bucket/conveyor/../elsewhere/rows.csv", "not below the lake's root"),
        ("s3://lake-bucket/conveyor/x.csv?versionId=1", "no query or fragment"),
        ("file:///etc/passwd", "file:// is not the lake's scheme"),
        ("/etc/passwd", "the lake is not on this machine's disk"),
        ("gs://lake-bucket/conveyor/x.csv", "gs:// is not the lake's scheme"),
        ("../x.csv", "not below the lake's root"),
    ],
)
def test_an_s3_lake_refuses_other_buckets_prefixes_and_schemes(given, rule):
    lake = Lake(root="s3://lake-bucket/conveyor", conn_id="lake_s3")
    with pytest.raises(LocationRefused, match=rule):
        lake.inside(given, "Param 'labelled_rows'")


def test_an_s3_lake_accepts_its_keys_with_or_without_its_connection():
    lake = Lake(root="s3://lake-bucket/conveyor", conn_id="lake_s3")
    key = "s3://lake-bucket/conveyor/monitor/churn/retrain/r1/labelled.parquet"
    assert lake.inside(key, "x") == key
    assert lake.inside("s3://lake_s3@lake-bucket/conveyor/monitor/churn/retrain/r1/labelled.parquet", "x") == key
    assert lake.inside("monitor/churn/retrain/r1/labelled.parquet", "x") == key


# ----------------------------------------------------------------------------------- versions


def test_a_dataset_version_is_v_and_the_hex_digest_ingest_gives():
    from conveyor.data.datasets import version_of

    made = version_of([{"path": "customers.csv", "bytes": 3, "sha256": "ab"}])
    assert check_dataset_version(made, "Param 'dataset_version'") == made
    for bad in ("v-../x", "../../raw/other/v-0123456789abcdef0123", "v-0123456789ABCDEF0123", "v-", "latest", "v-12"):
        with pytest.raises(
            LocationRefused, match=r"^Param 'dataset_version': .* is refused: a dataset version is 'v-'"
        ):
            check_dataset_version(bad, "Param 'dataset_version'")
    assert json.dumps(made).startswith('"v-')


class _FailingReader:
    """A source whose store fails after its first chunk (an S3 503 half-way through a GET)."""

    def __init__(self, first: bytes):
        self.first, self.reads = first, 0

    def read(self, size: int) -> bytes:
        self.reads += 1
        if self.reads == 1:
            return self.first
        raise OSError(errno.EIO, "connection reset half-way")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_copy_whose_source_fails_half_way_leaves_the_old_file(where, request, monkeypatch):
    from airflow.sdk import ObjectStoragePath

    from conveyor.lake import copy_verified

    lake = request.getfixturevalue("lake" if where == "local" else "s3_lake")
    source, target = lake.landing("churn", "d1", "customers.csv"), lake.models("churn", "run-1") / "model.tar.gz"
    source.parent.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(b"new bytes " * 1000)
    target.write_bytes(b"the old archive")
    real_open = ObjectStoragePath.open

    def open_(self, mode="r", *args, **kwargs):
        if mode == "rb" and self.name == "customers.csv":
            return _FailingReader(b"new bytes " * 10)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(ObjectStoragePath, "open", open_)
    with pytest.raises(OSError, match="half-way"):
        copy_verified(source, target, 100)
    monkeypatch.setattr(ObjectStoragePath, "open", real_open)
    assert target.read_bytes() == b"the old archive"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.tar.gz"]
    assert copy_verified(source, target, 100)[1] == 10_000 and target.read_bytes() == b"new bytes " * 1000


def test_a_long_name_is_written_atomically_too(lake):
    """The temporary name stays within the file system's name limit (255 bytes) for any valid name."""
    path = lake.monitor("churn", "checks", "batch-" + "r" * 240 + ".json")
    write_json(path, {"ok": True})
    write_json(path, {"ok": False})
    assert read_json(path) == {"ok": False} and leftovers(Path(path.path).parent) == []
