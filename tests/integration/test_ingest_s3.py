"""Ingest and validation with the lake on S3 (moto's server), through ObjectStoragePath."""

from __future__ import annotations

import boto3
import pytest
from airflow.sdk.exceptions import AirflowFailException

from conveyor.data.datasets import latest_version
from conveyor.errors import ValidationFailed
from conveyor.sensors.drop import DropSensor
from helpers import churn_csv, ingest_and_validate, write_drop


def keys(moto_server: str, lake) -> set[str]:
    bucket, prefix = lake.root[len("s3://") :].split("/", 1)
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"][len(prefix) + 1 :] for page in pages for item in page.get("Contents", [])}


def test_s3_drop_is_sensed_versioned_and_validated(s3_lake, moto_server):
    payload = churn_csv(300)
    write_drop(s3_lake, "incomplete", {"customers.csv": payload}, marker=False)
    assert DropSensor(task_id="w", pipeline="churn").poke({}).is_done is False
    write_drop(s3_lake, "d1", {"customers.csv": payload})
    assert DropSensor(task_id="w", pipeline="churn").poke({}).xcom_value == {
        "drop": "d1",
        "pending": 1,
        "incomplete": [],
    }
    late = DropSensor(task_id="w", pipeline="churn", timeout=0).poke({}).xcom_value["incomplete"]
    assert [(item["drop"], item["reason"]) for item in late] == [("incomplete", "has no '_SUCCESS' marker")]

    ingested, validated = ingest_and_validate("d1", run_id="s3run")
    version = ingested["version"]
    stored = keys(moto_server, s3_lake)
    assert f"raw/churn/{version}/data/customers.csv" in stored
    assert f"raw/churn/{version}/manifest.json" in stored
    assert "reports/churn/s3run/validation/index.html" in stored
    assert "landing/churn/d1/_PROCESSED" in stored
    assert latest_version(s3_lake, "churn") == version
    assert (s3_lake.raw("churn", version) / "data" / "customers.csv").read_bytes() == payload
    assert validated["report"].startswith("s3://")


def test_s3_same_bytes_give_the_same_version_as_local(s3_lake, lake_version_of_local):
    write_drop(s3_lake, "d1", {"customers.csv": churn_csv(300)})
    ingested, _ = ingest_and_validate("d1")
    assert ingested["version"] == lake_version_of_local


@pytest.fixture
def lake_version_of_local(tmp_path, monkeypatch):
    """The version the same bytes get on a local lake (content addressing is store-independent)."""
    from conveyor.data.datasets import profile_drop, version_of
    from conveyor.data.drops import drop_files
    from conveyor.lake import Lake
    from conveyor.spec import get_spec

    local = Lake(root=(tmp_path / "local").as_uri())
    write_drop(local, "d1", {"customers.csv": churn_csv(300)})
    spec = get_spec("churn")
    return version_of(profile_drop(drop_files(local.landing("churn", "d1"), "_SUCCESS"), spec, 1 << 16))


def test_s3_failing_drop_goes_to_quarantine(s3_lake, moto_server):
    bad = churn_csv(200, churned=["maybe"] * 200)
    write_drop(s3_lake, "bad", {"customers.csv": bad})
    with pytest.raises(AirflowFailException, match="churned") as err:
        ingest_and_validate("bad", run_id="s3bad")
    assert isinstance(err.value.__cause__, ValidationFailed)
    assert err.value.__cause__.report_uri.startswith("s3://")
    stored = keys(moto_server, s3_lake)
    assert "quarantine/churn/bad/customers.csv" in stored
    assert "quarantine/churn/bad/_report.json" in stored
    assert not any(key.startswith("landing/churn/bad/") for key in stored)
    assert not any(key.startswith("raw/") for key in stored)
    assert (s3_lake.quarantine("churn", "bad") / "customers.csv").read_bytes() == bad
