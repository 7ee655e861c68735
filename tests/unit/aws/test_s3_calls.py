"""S3 requests of the SageMaker backend's lake writes, counted against moto: no folder requests, no checks
before a write, a ceiling per step."""

from __future__ import annotations

import collections
from datetime import UTC, datetime
from typing import Any

import pytest

from conveyor.demo import churn_frame

SCORED_AT = datetime(2026, 3, 1, tzinfo=UTC)
SEQUENCE: list[str] = []  # the calls in order, for a failing assertion's message


@pytest.fixture
def s3_calls(monkeypatch):
    """Every AWS API call made (botocore's and aiobotocore's, so s3fs counts), as ``service:Operation``."""
    import aiobotocore.client
    import botocore.client

    calls: collections.Counter[str] = collections.Counter()
    sync_call = botocore.client.BaseClient._make_api_call
    async_call = aiobotocore.client.AioBaseClient._make_api_call

    def make_api_call(client: Any, operation: str, params: Any) -> Any:
        calls[f"{client.meta.service_model.service_name}:{operation}"] += 1
        SEQUENCE.append(f"{operation} {params.get('Key') or params.get('Prefix') or ''}")
        return sync_call(client, operation, params)

    async def make_async_api_call(client: Any, operation: str, params: Any) -> Any:
        calls[f"{client.meta.service_model.service_name}:{operation}"] += 1
        SEQUENCE.append(f"{operation} {params.get('Key') or params.get('Prefix') or ''}")
        return await async_call(client, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", make_api_call)
    monkeypatch.setattr(aiobotocore.client.AioBaseClient, "_make_api_call", make_async_api_call)
    return calls


def test_lake_writes_on_s3_make_no_folder_requests(s3_lake, s3_calls, tmp_path):
    from conveyor.lake import read_json, upload_tree, write_json

    report = tmp_path / "report"
    (report / "static").mkdir(parents=True)
    for name in ("index.html", "result.json", "static/site.css"):
        (report / name).write_text(name)
    s3_lake.path().fs.invalidate_cache()
    s3_calls.clear()

    write_json(s3_lake.path("raw", "churn", "LATEST.json"), {"version": "v-1"})
    assert upload_tree(report, s3_lake.reports("churn", "run-1") / "validation") == [
        "index.html",
        "result.json",
        "static/site.css",
    ]

    assert s3_calls == {"s3:PutObject": 4}  # one PUT a file: no HeadBucket, no listing, no HEAD first
    assert read_json(s3_lake.path("raw", "churn", "LATEST.json")) == {"version": "v-1"}
    assert (s3_lake.reports("churn", "run-1") / "validation" / "static" / "site.css").read_text() == "static/site.css"


def test_the_transform_steps_lake_work_has_a_call_ceiling(churn_model, s3_lake, s3_calls):
    from conveyor.aws.transform import INPUT, prepare_input
    from conveyor.batch.parts import completed_parts, write_parts
    from conveyor.batch.readers import read_chunks
    from conveyor.batch.scoring import output_table
    from conveyor.model.metadata import read

    metadata = read(churn_model["dir"])
    drop = s3_lake.landing("churn", "inference", "b1")
    with (drop / "customers.parquet").open("wb") as handle:
        churn_frame(2000, seed=5).drop(columns=["churned"]).to_parquet(handle, index=False)
    work = s3_lake.predictions("churn", "run-1") / "_transform"
    s3_lake.path().fs.invalidate_cache()
    s3_calls.clear()

    manifest = prepare_input(s3_lake.uri("landing", "churn", "inference", "b1"), metadata, work, 1000, "lake_s3")
    prepared = dict(s3_calls)
    s3_calls.clear()
    constants = {"model_name": "churn", "model_version": "1", "run_id": "run-1", "scored_at": SCORED_AT}
    context = {**constants, "id_column": metadata.id_column}
    frames = [chunk.to_pandas() for chunk in read_chunks(drop, metadata, 1000, "lake_s3")]
    s3_calls.clear()
    SEQUENCE.clear()
    tables = iter(output_table(frame, _answers(frame), 0, context) for frame in frames)
    result = write_parts(s3_lake.predictions("churn", "run-1"), tables, {"run_id": "run-1"}, conn_id="lake_s3")
    written = dict(s3_calls)

    assert manifest["rows"] == 2000 and [part["rows"] for part in manifest["parts"]] == [1000, 1000]
    assert len(list((work / INPUT).iterdir())) == 2
    assert result.rows == 2000 and len(completed_parts(s3_lake.predictions("churn", "run-1"))) == 2
    for calls in (prepared, written):
        assert "s3:HeadBucket" not in calls and "s3:CreateBucket" not in calls
    # prepare: the drop found (HEAD, 2 listings) and fetched once (HEAD, GET) for its check and its read, the
    # work folder cleared (1 listing), 2 CSV + 2 id files + the manifest (5 PUTs); it was 15 calls and more
    assert sum(prepared.values()) <= 12, prepared
    # write: 2 parts staged (PUT), one listing of the run, 2 server-side copies, the staging folder listed and
    # deleted at once, _SUCCESS.json (PUT); it was 23 calls (mkdir, exists() and a move of 4 calls per part)
    assert sum(written.values()) <= 8, "\n".join(SEQUENCE)


def _answers(frame):
    import pandas as pd

    return pd.DataFrame({"prediction": ["no"] * len(frame), "proba_no": 0.9, "proba_yes": 0.1})


def test_the_pending_inference_drop_on_s3_takes_one_listing(s3_lake, s3_calls):
    from conveyor.batch.runs import SCORED_MARKER, pending_inference_drop

    root = s3_lake.landing("churn", "inference")
    for drop, markers in {"b1": ["_SUCCESS", SCORED_MARKER], "b2": ["_SUCCESS"], "b3": [], "_x": ["_SUCCESS"]}.items():
        (root / drop / "customers.csv").write_bytes(b"a\n1\n")
        for marker in markers:
            (root / drop / marker).write_bytes(b"{}")
    s3_lake.path().fs.invalidate_cache()
    s3_calls.clear()

    assert pending_inference_drop(s3_lake, "churn", "_SUCCESS") == "b2"  # b1 scored, b3 incomplete, _x hidden
    assert s3_calls == {"s3:ListObjectsV2": 1}
    (root / "b2" / SCORED_MARKER).write_bytes(b"{}")
    s3_lake.path().fs.invalidate_cache()
    assert pending_inference_drop(s3_lake, "churn", "_SUCCESS") is None


def test_lake_reads_on_s3_are_one_get_each_and_a_missing_file_one_call(s3_lake, s3_calls, tmp_path):
    from airflow.sdk import ObjectStoragePath

    from conveyor.lake import copy_verified, keys_below, read_bytes, read_json, remove_tree, sha256_of, write_json

    write_json(s3_lake.path("raw", "churn", "LATEST.json"), {"version": "v-1"})
    (s3_lake.path("models", "churn", "r1", "model.tar.gz")).write_bytes(b"x" * 3000)
    s3_lake.path().fs.invalidate_cache()
    archive = s3_lake.path("models", "churn", "r1", "model.tar.gz")
    s3_calls.clear()
    SEQUENCE.clear()

    assert read_json(s3_lake.path("raw", "churn", "LATEST.json")) == {"version": "v-1"}
    assert read_bytes(archive) == b"x" * 3000
    local = tmp_path / "copy" / "model.tar.gz"
    digest, size = copy_verified(archive, ObjectStoragePath(local.as_uri()), 1024)
    assert (digest, size) == sha256_of(archive) and size == 3000 and local.read_bytes() == b"x" * 3000
    assert s3_calls == {"s3:GetObject": 4}, SEQUENCE  # no HEAD before a GET (s3fs's open() sends one)
    assert not list(local.parent.glob(".*"))  # no temporary file left

    s3_calls.clear()
    with pytest.raises(FileNotFoundError):
        read_json(s3_lake.path("raw", "churn", "missing.json"))
    remove_tree(s3_lake.path("predictions", "churn", "nothing-here"))
    assert keys_below(s3_lake.path("models", "churn"), recursive=False) == [archive.parent.path]
    assert s3_calls == {"s3:GetObject": 1, "s3:ListObjectsV2": 2}  # one call each: no HEAD, no second listing

    s3_calls.clear()
    copy_verified(ObjectStoragePath(local.as_uri()), s3_lake.path("models", "churn", "r2", "model.tar.gz"), 1024)
    assert s3_calls == {"s3:PutObject": 1}


def test_dataset_pointers_on_s3_are_one_get_each_found_or_not(s3_lake, s3_calls):
    from conveyor.data.datasets import latest_version, load_manifest
    from conveyor.lake import write_json

    write_json(s3_lake.raw("churn") / "LATEST.json", {"version": "v-0123456789abcdef0123"})
    s3_lake.path().fs.invalidate_cache()
    s3_calls.clear()

    assert latest_version(s3_lake, "churn") == "v-0123456789abcdef0123"
    assert latest_version(s3_lake, "other") is None and load_manifest(s3_lake, "churn", "v-00000000") is None
    assert s3_calls == {"s3:GetObject": 3}  # no exists() (a HEAD, and a listing when missing) before a read


def test_a_split_part_is_read_with_one_get(s3_lake, s3_calls):
    import pandas as pd

    from conveyor.data.splits import read_part

    frame = churn_frame(50, seed=3)
    (s3_lake.models("churn", "r1") / "split" / "test" / "data.parquet").write_bytes(frame.to_parquet(index=False))
    s3_lake.path().fs.invalidate_cache()
    s3_calls.clear()
    SEQUENCE.clear()

    pd.testing.assert_frame_equal(read_part(s3_lake, "churn", "r1", "test"), frame)
    assert s3_calls == {"s3:GetObject": 1}, SEQUENCE  # no HEAD for the size first


@pytest.mark.parametrize("size_known", [True, False])
def test_a_dataset_versions_file_on_s3_is_read_with_its_manifests_size(s3_lake, s3_calls, size_known):
    import pandas as pd

    from conveyor.data.datasets import read_table

    frame = churn_frame(40, seed=4)
    body = frame.to_parquet(index=False)
    (s3_lake.raw("churn", "v-1") / "data" / "customers.parquet").write_bytes(body)
    entry = {"path": "customers.parquet", **({"bytes": len(body)} if size_known else {})}
    manifest = {"pipeline": "churn", "version": "v-1", "format": "parquet", "files": [entry]}
    s3_lake.path().fs.invalidate_cache()
    s3_calls.clear()
    SEQUENCE.clear()

    pd.testing.assert_frame_equal(read_table(s3_lake, manifest, None), frame)
    # the copy is immutable and its manifest has its size: no HEAD to ask it (an older manifest: one HEAD)
    assert s3_calls == ({"s3:GetObject": 1} if size_known else {"s3:HeadObject": 1, "s3:GetObject": 1}), SEQUENCE


def test_a_runs_parts_on_s3_are_fetched_once_for_the_table_and_the_summary(s3_lake, s3_calls, tmp_path):
    from conveyor.batch.parts import write_parts
    from conveyor.batch.runs import load_run
    from conveyor.batch.scoring import output_table

    frame = churn_frame(300, seed=5).drop(columns=["churned"])
    context = {"model_name": "churn", "model_version": "1", "run_id": "run-1", "scored_at": SCORED_AT}
    tables = iter(
        [output_table(frame.iloc[i : i + 100], _answers(frame.iloc[i : i + 100]), i, {**context, "id_column": None})]
        for i in (0, 100, 200)
    )
    result = write_parts(s3_lake.predictions("churn", "run-1"), (t[0] for t in tables), {}, conn_id="lake_s3")
    s3_lake.path().fs.invalidate_cache()
    s3_calls.clear()

    rows, summary = load_run(result, table="churn_predictions", pipeline="churn", run_id="run-1", conn_id="lake_s3")
    assert rows == 300 and summary["rows"] == 300
    assert s3_calls == {"s3:GetObject": 3}  # one GET a part (it was a HEAD and a GET, three times over)


def test_parts_written_inside_local_copies_are_loaded_with_no_get(s3_lake, s3_calls, tmp_path):
    """The SageMaker batch writes its parts and loads them into SQL in one local_copies() block: the bytes
    written are read back from disk, the store is asked nothing, and the rows are the same."""
    import pyarrow.parquet as pq

    from conveyor.batch.parts import write_parts
    from conveyor.batch.readers import local_copies
    from conveyor.batch.runs import load_run
    from conveyor.batch.scoring import output_table

    frame = churn_frame(200, seed=6).drop(columns=["churned"])
    context = {"model_name": "churn", "model_version": "1", "run_id": "run-2", "scored_at": SCORED_AT}
    tables = [
        output_table(frame.iloc[i : i + 100], _answers(frame.iloc[i : i + 100]), i, {**context, "id_column": None})
        for i in (0, 100)
    ]
    s3_calls.clear()
    SEQUENCE.clear()
    with local_copies(keep_writes=True):
        result = write_parts(s3_lake.predictions("churn", "run-2"), iter(tables), {}, conn_id="lake_s3")
        rows, summary = load_run(result, table="churn_predictions", pipeline="churn", run_id="run-2", conn_id="lake_s3")
    assert rows == 200 and summary["rows"] == 200
    assert "s3:GetObject" not in s3_calls and "s3:HeadObject" not in s3_calls, SEQUENCE
    for part, table in zip(result.parts, tables, strict=True):  # what is in the store is what was loaded
        from airflow.sdk import ObjectStoragePath

        with ObjectStoragePath(part, conn_id="lake_s3").open("rb") as handle:
            assert pq.read_table(handle).num_rows == table.num_rows

    # A retry over an old output stages its parts and publishes them: the kept copies follow them.
    s3_calls.clear()
    with local_copies(keep_writes=True):
        again = write_parts(s3_lake.predictions("churn", "run-2"), iter(tables[:1]), {}, conn_id="lake_s3")
        rows, _ = load_run(again, table="churn_predictions", pipeline="churn", run_id="run-2", conn_id="lake_s3")
    assert rows == 100 and "s3:GetObject" not in s3_calls, SEQUENCE

    # Without keep_writes (the local batch's block for its input) nothing written is copied to disk.
    s3_calls.clear()
    with local_copies():
        third = write_parts(s3_lake.predictions("churn", "run-2"), iter(tables), {}, conn_id="lake_s3")
        load_run(third, table="churn_predictions", pipeline="churn", run_id="run-2", conn_id="lake_s3")
    assert s3_calls["s3:GetObject"] == 2  # each part fetched once for the table and the summary
