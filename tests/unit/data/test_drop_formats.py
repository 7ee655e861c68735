"""Drops as data engineers produce them, and drops that must never block ingest (issue 17 items 7, 8, 13, 16, 17).

Compressed CSV, Spark/Hive part folders, columns in another order, skipped files listed in the
manifest; every failure to read a drop is a rejection with its reason, a storage retry, or counted
tries then quarantine, and the drops after a bad one flow.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import os

import pyarrow as pa
import pytest
from airflow.sdk.exceptions import AirflowFailException

from conveyor.errors import ConveyorError, DropRejected, TransientError
from conveyor.lake import read_json, safe_name
from helpers import churn_csv, ingest_and_validate, write_drop


def zstd(payload: bytes) -> bytes:
    out = pa.BufferOutputStream()
    with pa.CompressedOutputStream(out, "zstd") as stream:
        stream.write(payload)
    return out.getvalue().to_pybytes()


def png(colour: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, "PNG")
    return buffer.getvalue()


def good_files() -> dict[str, bytes]:
    """Ten images in each class of the shapes pipeline."""
    return {
        f"{name}/{n}.png": png((20 * n, 80 * c, 5 * n + c))
        for c, name in enumerate(("circle", "square", "triangle"))
        for n in range(10)
    }


def manifest_of(lake, ingested: dict) -> dict:
    return read_json(lake.raw("churn", ingested["version"]) / "manifest.json")


def rejected(drop: str = "bad") -> DropRejected:
    with pytest.raises(AirflowFailException) as err:
        ingest_and_validate(drop)
    assert isinstance(err.value.__cause__, DropRejected), err.value
    return err.value.__cause__


# --- item 16: compressed CSV, with a cap on what it inflates to ------------------------------------------


@pytest.mark.parametrize(
    ("name", "pack"),
    [("customers.csv.gz", gzip.compress), ("customers.csv.bz2", bz2.compress), ("customers.csv.zst", zstd)],
)
def test_compressed_csv_drops_are_ingested_and_validated(lake, name, pack):
    from conveyor.data.datasets import read_table
    from conveyor.operators.base import pipeline_spec
    from helpers import pipeline_spec_dict

    plain = churn_csv(400)
    write_drop(lake, "z1", {name: pack(plain)})
    ingested, validated = ingest_and_validate("z1")
    assert ingested["rows"] == 400 and validated["rows"] == 400
    manifest = manifest_of(lake, ingested)
    assert manifest["files"][0]["path"] == name and manifest["files"][0]["bytes"] == len(pack(plain))
    table = read_table(lake, manifest, pipeline_spec(pipeline_spec_dict("churn")))
    assert len(table) == 400 and table.to_csv(index=False).encode() == plain


def test_a_gzip_without_its_suffix_is_recognised_by_its_magic_number(lake):
    write_drop(lake, "z1", {"customers.csv": gzip.compress(churn_csv(100))})
    ingested, _ = ingest_and_validate("z1")
    assert ingested["rows"] == 100 and manifest_of(lake, ingested)["files"][0]["compression"] == "gzip"


def test_a_csv_that_inflates_past_the_cap_is_refused_while_streaming(lake, monkeypatch):
    monkeypatch.setenv("CONVEYOR_MAX_DECOMPRESSED_BYTES", str(1024 * 1024))  # 1 MiB
    bomb = gzip.compress(b"a,b\n" + b"1,2\n" * (4 * 1024 * 1024))  # 16 MiB of text in ~16 KiB
    assert len(bomb) < 100_000
    write_drop(lake, "bad", {"customers.csv.gz": bomb})
    err = rejected()
    assert "customers.csv.gz: rule 'at most 1048576 bytes once decompressed'" in str(err)
    assert "CONVEYOR_MAX_DECOMPRESSED_BYTES" in str(err)
    assert (lake.quarantine("churn", "bad") / "customers.csv.gz").read_bytes() == bomb


def test_the_decompressed_size_cap_defaults_to_two_gib(monkeypatch):
    from conveyor import settings

    monkeypatch.delenv("CONVEYOR_MAX_DECOMPRESSED_BYTES", raising=False)
    assert settings.ingest_settings().max_decompressed_bytes == 2 * 1024**3
    monkeypatch.setenv("CONVEYOR_MAX_DECOMPRESSED_BYTES", "0")
    with pytest.raises(ValueError, match="CONVEYOR_MAX_DECOMPRESSED_BYTES='0' must be at least 1"):
        settings.ingest_settings()


def test_a_corrupt_gzip_is_rejected_naming_the_file(lake):
    write_drop(lake, "bad", {"customers.csv.gz": gzip.compress(churn_csv(200))[:-40] + b"\x00" * 40})
    assert "customers.csv.gz: rule 'readable gzip'" in str(rejected())


# --- item 17: part folders, columns by name, skipped files listed --------------------------------------


def test_a_spark_part_folder_is_read_as_one_table(lake):
    whole = churn_csv(300).decode().splitlines(keepends=True)
    header, rows = whole[0], whole[1:]
    files = {
        "customers.csv/part-00000": (header + "".join(rows[:100])).encode(),
        "customers.csv/part-00001.csv": (header + "".join(rows[100:200])).encode(),
        "customers.csv/part-00002-1b2c.c000.csv.gz": gzip.compress((header + "".join(rows[200:])).encode()),
        "customers.csv/part-00003": b"",  # an empty partition
        "customers.csv/_SUCCESS": b"",
        "customers.csv/.part-00000.crc": b"crc",
    }
    write_drop(lake, "spark", files)
    ingested, validated = ingest_and_validate("spark")
    assert ingested["rows"] == 300 and validated["rows"] == 300
    manifest = manifest_of(lake, ingested)
    assert [f["path"] for f in manifest["files"]] == [
        "customers.csv/part-00000",
        "customers.csv/part-00001.csv",
        "customers.csv/part-00002-1b2c.c000.csv.gz",
    ]
    skipped = {item["path"]: item["reason"] for item in manifest["skipped"]}
    assert set(skipped) == {"customers.csv/part-00003", "customers.csv/_SUCCESS", "customers.csv/.part-00000.crc"}
    assert "empty part file" in skipped["customers.csv/part-00003"]
    assert "job marker" in skipped["customers.csv/_SUCCESS"] and ".crc" in skipped["customers.csv/.part-00000.crc"]
    assert ingested["skipped"] == 3


def test_csv_files_with_the_same_columns_in_another_order_are_one_table(lake):
    from conveyor.data.datasets import read_table
    from conveyor.demo import churn_frame
    from conveyor.operators.base import pipeline_spec
    from helpers import pipeline_spec_dict

    frame = churn_frame(300)
    reordered = frame.iloc[150:][list(reversed(frame.columns))]
    files = {
        "a.csv": frame.iloc[:150].to_csv(index=False).encode(),
        "b.csv": reordered.to_csv(index=False).encode(),
    }
    write_drop(lake, "d1", files)
    ingested, validated = ingest_and_validate("d1")
    assert ingested["rows"] == 300 and validated["rows"] == 300
    table = read_table(lake, manifest_of(lake, ingested), pipeline_spec(pipeline_spec_dict("churn")))
    assert list(table.columns) == list(frame.columns)
    assert table["customer_id"].tolist() == frame["customer_id"].tolist()


def test_files_with_different_columns_are_still_rejected_naming_them(lake):
    write_drop(lake, "bad", {"a.csv": churn_csv(100), "b.csv": churn_csv(100, age=None)})
    message = str(rejected())
    assert "rule 'one schema per drop': b.csv has different columns from a.csv (missing ['age'], extra [])" in message


def test_files_skipped_by_convention_are_listed_in_the_manifest(lake):
    files = {
        "customers.csv": churn_csv(200),
        "_notes.csv": b"a,b\n1,2\n",
        ".hidden.csv": b"a,b\n1,2\n",
        "Thumbs.db": b"\x00junk",
        "_tmp/extra.csv": b"a,b\n1,2\n",
    }
    write_drop(lake, "d1", files)
    ingested, _ = ingest_and_validate("d1")
    manifest = manifest_of(lake, ingested)
    assert [f["path"] for f in manifest["files"]] == ["customers.csv"]
    skipped = {item["path"]: item["reason"] for item in manifest["skipped"]}
    assert set(skipped) == {"_notes.csv", ".hidden.csv", "Thumbs.db", "_tmp/extra.csv"}
    assert "starts with '_'" in skipped["_notes.csv"] and "hidden file" in skipped[".hidden.csv"]
    assert "operating-system file" in skipped["Thumbs.db"] and "inside folder '_tmp'" in skipped["_tmp/extra.csv"]
    assert "_SUCCESS" not in skipped and "_PROCESSED" not in skipped  # the marker and bookkeeping are not data


def test_a_drop_of_nothing_but_skipped_files_names_them(lake):
    write_drop(lake, "bad", {"_customers.csv": churn_csv(50)})
    assert "rule 'data files': the drop holds nothing but its marker and 1 skipped file(s): ['_customers.csv']" in str(
        rejected()
    )


# --- item 13: names and links that point outside ---------------------------------------------------------


@pytest.mark.parametrize("name", [".", "..", "...", "/../", "  ..  "])
def test_safe_name_refuses_names_that_are_only_dots(name):
    with pytest.raises(ConveyorError, match="rule 'a name, not . or ..'"):
        safe_name(name)


def test_safe_name_keeps_ordinary_names():
    assert safe_name("manual__2026-11-01T00:00:00+00:00") == "manual__2026-11-01T00_00_00_00_00"
    assert safe_name("a..b") == "a..b" and safe_name(".hidden") == ".hidden"


def test_a_symlink_in_a_local_drop_is_rejected_and_its_target_never_copied(lake, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_bytes(b"customer_id,password\nC1,hunter2\n")
    write_drop(lake, "bad", {"customers.csv": churn_csv(100)})
    os.symlink(secret, lake.landing("churn", "bad").path + "/extra.csv")
    err = rejected()
    assert f"rule 'no symbolic links': the drop holds 1 link(s): extra.csv -> {secret}" in str(err)
    quarantined = lake.quarantine("churn", "bad")
    assert os.path.islink(quarantined.path + "/extra.csv")  # the link itself, not its target's bytes
    assert b"hunter2" not in b"".join(
        p.read_bytes() for p in quarantined.rglob("*") if p.is_file() and not p.is_symlink()
    )
    assert secret.read_bytes().startswith(b"customer_id,password")
    assert not lake.raw("churn").exists() or not list(lake.raw("churn").iterdir())


def test_a_drop_name_that_leaves_the_landing_zone_is_refused(lake):
    from conveyor.data.datasets import ingest_drop
    from conveyor.operators.base import pipeline_spec
    from helpers import pipeline_spec_dict

    spec = pipeline_spec(pipeline_spec_dict("churn"))
    for name in ("..", "../other", "a/b", ""):
        with pytest.raises(DropRejected, match="rule 'one folder of the landing zone'"):
            ingest_drop(lake, spec, name, "run1")


# --- item 7: nothing blocks the drops after it ----------------------------------------------------------


def test_a_bad_drop_is_quarantined_and_the_next_run_ingests_the_good_one_after_it(lake):
    from conveyor.data.datasets import latest_version
    from conveyor.sensors.drop import DropSensor

    bad = {
        "img/0.png": good_files()["circle/0.png"],
        "manifest.csv": "path,label\nimg/0.png,cerc\xe9\n".encode("latin-1"),
    }
    write_drop(lake, "2026-11-01", bad, pipeline="shapes")
    write_drop(lake, "2026-11-02", good_files(), pipeline="shapes")
    sensor = DropSensor(task_id="wait_for_drop", pipeline="shapes", poke_interval=0.05, timeout=30)
    first = sensor.execute({})["drop"]
    assert first == "2026-11-01"
    with pytest.raises(AirflowFailException, match="manifest.csv: rule 'encoding utf-8'") as err:
        ingest_and_validate(first, pipeline="shapes", run_id="run1")
    assert isinstance(err.value.__cause__, DropRejected)
    second = sensor.execute({})["drop"]
    assert second == "2026-11-02"  # the bad drop no longer blocks the queue
    ingested, _ = ingest_and_validate(second, pipeline="shapes", run_id="run2")
    assert latest_version(lake, "shapes") == ingested["version"]


def fail_reading(monkeypatch, error: BaseException) -> None:
    """Every read of a CSV drop raises ``error`` (as a broken store or library would)."""
    import pyarrow.csv

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(pyarrow.csv, "open_csv", broken)


def test_an_unclear_error_is_retried_then_quarantined_at_the_last_try(lake, monkeypatch):
    monkeypatch.setenv("CONVEYOR_INGEST_MAX_ATTEMPTS", "3")
    fail_reading(monkeypatch, PermissionError(errno.EACCES, "Permission denied"))
    write_drop(lake, "d1", {"customers.csv": churn_csv(50)})
    for run in ("run1", "run2"):
        with pytest.raises(PermissionError):  # not AirflowFailException: Airflow retries it
            ingest_and_validate("d1", run_id=run)
        assert lake.landing("churn", "d1").exists() and not lake.quarantine("churn", "d1").exists()
    attempts = read_json(lake.landing("churn", "d1") / "_ATTEMPTS.json")["attempts"]
    assert [a["run_id"] for a in attempts] == ["run1", "run2"] and "PermissionError" in attempts[0]["error"]
    with pytest.raises(AirflowFailException, match="reading it failed 3 time.s., the last with PermissionError") as err:
        ingest_and_validate("d1", run_id="run3")
    assert isinstance(err.value.__cause__, DropRejected)
    report = read_json(lake.quarantine("churn", "d1") / "_report.json")
    assert len(report["attempts"]) == 3 and not lake.landing("churn", "d1").exists()


def test_a_deterministic_library_error_is_a_rejection_at_once(lake, monkeypatch):
    fail_reading(monkeypatch, RecursionError("maximum recursion depth exceeded"))
    write_drop(lake, "bad", {"customers.csv": churn_csv(50)})
    assert "rule 'readable drop': RecursionError: maximum recursion depth exceeded" in str(rejected())
    assert lake.quarantine("churn", "bad").exists()


# --- item 8: storage failures are retried, never blamed on the drop -------------------------------------


def storage_errors() -> dict[str, BaseException]:
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def s3fs_style(status: int, code: str) -> OSError:  # what s3fs raises for a ClientError: an OSError from it
        cause = ClientError(
            {"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
        )
        err = OSError(errno.EREMOTEIO if status == 500 else errno.EBUSY, f"{code}: try again")
        err.__cause__ = cause
        return err

    return {
        "S3 500 through s3fs": s3fs_style(500, "InternalError"),
        "S3 503 SlowDown through s3fs": s3fs_style(503, "SlowDown"),
        "botocore 500 ClientError": ClientError(
            {"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 500}}, "GetObject"
        ),
        "botocore read timeout": ReadTimeoutError(endpoint_url="http://minio:9000/lake"),
        "botocore endpoint down": EndpointConnectionError(endpoint_url="http://minio:9000/lake"),
        "connection reset": ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        "timeout": TimeoutError("timed out"),
        "conveyor transient": TransientError("storage answered 503"),
    }


@pytest.mark.parametrize("case", sorted(storage_errors()))
def test_storage_errors_propagate_for_a_retry_and_the_drop_stays(lake, monkeypatch, case):
    error = storage_errors()[case]
    fail_reading(monkeypatch, error)
    write_drop(lake, "good", {"customers.csv": churn_csv(50)})
    with pytest.raises(type(error)) as err:
        ingest_and_validate("good")
    assert err.value is error  # the original error: Airflow's retries apply
    assert not isinstance(err.value, AirflowFailException)
    assert (lake.landing("churn", "good") / "customers.csv").exists()
    assert not lake.quarantine("churn", "good").exists()
    assert not (lake.landing("churn", "good") / "_ATTEMPTS.json").exists()  # not counted against the drop


@pytest.fixture
def parquet_pipeline(lake, tmp_path, monkeypatch):
    """The churn pipeline switched to Parquet drops, in a private include folder."""
    import shutil

    import yaml

    from conveyor import settings

    include = tmp_path / "include"
    shutil.copytree(settings.expectations_dir(), include / "expectations")
    spec = yaml.safe_load((settings.pipelines_dir() / "churn.yaml").read_text())
    spec["data"]["format"] = "parquet"
    (include / "pipelines").mkdir()
    (include / "pipelines" / "churn.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))


def test_an_s3_5xx_on_a_good_parquet_drop_is_retried_not_quarantined(lake, parquet_pipeline, monkeypatch):
    import pyarrow.parquet

    from conveyor.demo import churn_frame

    error = storage_errors()["S3 500 through s3fs"]

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(pyarrow.parquet, "ParquetFile", broken)
    write_drop(lake, "good", {"customers.parquet": churn_frame(100).to_parquet(index=False)})
    with pytest.raises(OSError) as err:
        ingest_and_validate("good")
    assert err.value is error
    assert (lake.landing("churn", "good") / "customers.parquet").exists()
    assert not lake.quarantine("churn", "good").exists()


def test_a_parquet_binary_column_is_rejected_at_ingest(lake, parquet_pipeline):
    from conveyor.demo import churn_frame

    frame = churn_frame(100)
    frame["blob"] = [b"\xff\xfe\x00" + bytes([i]) for i in range(100)]
    write_drop(lake, "bad", {"customers.parquet": frame.to_parquet(index=False)})
    message = str(rejected())
    assert "customers.parquet: rule 'no binary columns in a tabular pipeline': column(s) ['blob']" in message
    assert lake.quarantine("churn", "bad").exists()
    assert not lake.raw("churn").exists() or not list(lake.raw("churn").iterdir())  # no unvalidated copy


def test_transient_and_bad_bytes_are_told_apart():
    import zlib

    from conveyor.data.failures import classify

    assert classify(storage_errors()["S3 500 through s3fs"]) == "transient"
    assert classify(OSError(errno.EIO, "Input/output error")) == "transient"
    assert classify(gzip.BadGzipFile("Not a gzipped file")) == "reject"
    assert classify(zlib.error("invalid distance")) == "reject"
    assert classify(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")) == "reject"
    assert classify(PermissionError(errno.EACCES, "denied")) == "unclear"
    assert classify(MemoryError()) == "unclear"


def test_a_symlinked_folder_in_a_drop_is_rejected_and_what_it_points_to_survives(lake, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "other.csv").write_bytes(churn_csv(20))
    write_drop(lake, "bad", {"customers.csv": churn_csv(100)})
    os.symlink(outside, lake.landing("churn", "bad").path + "/more")
    assert f"more -> {outside}" in str(rejected())
    assert (outside / "other.csv").read_bytes() == churn_csv(20)  # removing the drop never follows the link
    assert os.path.islink(lake.quarantine("churn", "bad").path + "/more")


def test_a_torn_attempts_file_is_counted_afresh(lake, monkeypatch):
    fail_reading(monkeypatch, PermissionError(errno.EACCES, "Permission denied"))
    write_drop(lake, "d1", {"customers.csv": churn_csv(50), "_ATTEMPTS.json": b'{"attempts": [{"run_'})
    with pytest.raises(PermissionError):
        ingest_and_validate("d1", run_id="run1")
    assert [a["run_id"] for a in read_json(lake.landing("churn", "d1") / "_ATTEMPTS.json")["attempts"]] == ["run1"]
