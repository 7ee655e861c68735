"""Params that name data are restricted to the lake (issue 17 item 13): the batch ``input``, the train
DAG's ``labelled_rows`` (and a retraining event's ``labelled_uri``) and ``dataset_version`` (``v-<hex>``,
and a triggering event's version). A refused value fails the task with an error naming the Param and the
rule, before anything is read; the accepted forms still work."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from conveyor.lake import LocationRefused
from helpers import context, pipeline_spec_dict

SPEC = pipeline_spec_dict("churn")
REFUSED = [
    ("http://127.0.0.1:8080/rows.parquet", "http:// is not the lake's scheme"),
    ("file:///etc", "not below the lake's root"),
    ("file:///etc/passwd", "not below the lake's root"),
    ("../../etc/passwd", "not below the lake's root"),
    ("s3://other-bucket/rows.parquet", "s3:// is not the lake's scheme"),
]


def batch(input_uri: str):
    from conveyor.operators.batch import BatchPredictOperator

    model = {"version": "1", "model_uri": "file:///nowhere/model.tar.gz"}
    return BatchPredictOperator(task_id="score", spec=SPEC, model=model, input_uri=input_uri)


def split(**kwargs):
    from conveyor.operators.train import SplitDatasetOperator

    return SplitDatasetOperator(task_id="split", spec=SPEC, **kwargs)


def fetched_nothing(monkeypatch) -> list:
    """Record any attempt to fetch a model (it must not happen for a refused input)."""
    import conveyor.model.artifacts

    calls: list = []
    monkeypatch.setattr(conveyor.model.artifacts, "fetch", lambda *a, **k: calls.append(a))
    return calls


@pytest.mark.parametrize("given, rule", REFUSED)
def test_the_batch_input_must_be_inside_the_lake(lake, monkeypatch, given, rule):
    calls = fetched_nothing(monkeypatch)
    with pytest.raises(AirflowFailException, match=f"^Param 'input': .* is refused: .*{rule}") as caught:
        batch(given).execute(context("manual__1"))
    assert isinstance(caught.value.__cause__, LocationRefused) and calls == []
    assert not lake.predictions("churn", "manual__1").exists()


def test_a_batch_input_inside_the_lake_goes_on_to_scoring(lake, monkeypatch):
    """Accepted forms get past the check (the fake model then stops the run where scoring starts)."""

    class Reached(Exception):
        pass

    def fetch(*args, **kwargs):
        raise Reached

    import conveyor.model.artifacts

    monkeypatch.setattr(conveyor.model.artifacts, "fetch", fetch)
    root = lake.root.removeprefix("file://")
    for given in (lake.uri("landing", "churn", "in.csv"), f"{root}/landing/churn/in.csv", "landing/churn/in.csv"):
        with pytest.raises(Reached):
            batch(given).execute(context("manual__1"))


@pytest.mark.parametrize("given, rule", REFUSED)
def test_labelled_rows_must_be_inside_the_lake(lake, monkeypatch, given, rule):
    import conveyor.operators.train as train

    monkeypatch.setattr(train, "resolve_version", lambda *a: "v-0123456789abcdef0123")
    monkeypatch.setattr("conveyor.data.datasets.load_manifest", lambda *a: {"rows": 1})
    monkeypatch.setattr("conveyor.data.datasets.read_table", lambda *a, **k: None)
    read: list = []
    monkeypatch.setattr("conveyor.monitoring.labelled.with_labelled_rows", lambda *a: read.append(a))
    with pytest.raises(AirflowFailException, match=f"^Param 'labelled_rows': .* is refused: .*{rule}"):
        split(labelled_rows=given).execute(context("manual__1"))
    event = {"churn.retrain": [SimpleNamespace(extra={"labelled_uri": given})]}
    with pytest.raises(AirflowFailException, match=f"^the retraining event's labelled_uri: .* is refused: .*{rule}"):
        split().execute({**context("manual__2"), "triggering_asset_events": event})
    assert read == []


def test_labelled_rows_inside_the_lake_are_read(lake, monkeypatch):
    import conveyor.operators.train as train

    monkeypatch.setattr(train, "resolve_version", lambda *a: "v-0123456789abcdef0123")
    monkeypatch.setattr("conveyor.data.datasets.load_manifest", lambda *a: {"rows": 1})
    monkeypatch.setattr("conveyor.data.datasets.read_table", lambda *a, **k: "frame")
    read: list = []

    class Joined(tuple):  # what with_labelled_rows returns, before (rows, added) and after item 11 (an object)
        rows, added, rejected, quarantine = "f", 1, 0, None

        def summary(self) -> dict:
            return {"rows": 1}

    joined = Joined(("f", 1))
    monkeypatch.setattr("conveyor.monitoring.labelled.with_labelled_rows", lambda *a: read.append(a[1]) or joined)
    monkeypatch.setattr("conveyor.data.splits.write_split", lambda *a: {"uri": "u", "parts": {}})
    uri = lake.uri("monitor", "churn", "retrain", "r1", "labelled.parquet")
    split(labelled_rows=uri).execute(context("manual__1"))
    split(labelled_rows="monitor/churn/retrain/r1/labelled.parquet").execute(context("manual__2"))
    assert read == [uri, uri]


@pytest.mark.parametrize("version", ["v-../x", "../../raw/other", "v-0123456789abcdef0123/../../x", "latest", "v-XYZ"])
def test_a_dataset_version_must_be_v_and_a_hex_digest(lake, version):
    with pytest.raises(
        AirflowFailException, match="^Param 'dataset_version': .* is refused: a dataset version is 'v-'"
    ):
        split(dataset_version=version).execute(context("manual__1"))
    event = {"churn_dataset": [SimpleNamespace(extra={"version": version})]}
    with pytest.raises(AirflowFailException, match="^the triggering dataset event's version: .* is refused"):
        split().execute({**context("manual__2"), "triggering_asset_events": event})


def test_a_well_formed_dataset_version_goes_on_to_the_lookup(lake):
    with pytest.raises(AirflowFailException, match="'v-0123456789abcdef0123' of 'churn' does not exist or was not"):
        split(dataset_version="v-0123456789abcdef0123").execute(context("manual__1"))


def test_labelled_rows_the_store_fails_to_read_are_retried_and_a_bad_file_is_not(lake, monkeypatch):
    """Issue 17 item 8: an S3 503 while the retraining run reads its labelled rows is not bad input."""
    import pandas as pd
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    import conveyor.monitoring.labelled as labelled
    from conveyor.operators.base import airflow_errors
    from conveyor.spec import PipelineSpec

    spec = PipelineSpec.model_validate(SPEC)
    frame = pd.DataFrame({"customer_id": ["C1"], "tenure_months": [1], "churned": ["no"]})
    uri = lake.uri("monitor", "churn", "retrain", "r1", "labelled.parquet")
    response = {
        "Error": {"Code": "ServiceUnavailable", "Message": "try again"},
        "ResponseMetadata": {"HTTPStatusCode": 503},
    }
    unavailable = translate_boto_error(ClientError(response, "GetObject"))

    def read_parquet(path):
        raise unavailable

    real = labelled.read_parquet
    monkeypatch.setattr(labelled, "read_parquet", read_parquet)
    with pytest.raises(OSError, match="try again") as caught, airflow_errors():
        labelled.with_labelled_rows(frame, uri, spec, lake, "manual__1")
    assert caught.value is unavailable  # propagates: Airflow retries the split

    monkeypatch.setattr(labelled, "read_parquet", real)
    path = lake.monitor("churn", "retrain", "r1", "labelled.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not parquet")
    with pytest.raises(AirflowFailException, match="labelled rows cannot be read"), airflow_errors():
        labelled.with_labelled_rows(frame, uri, spec, lake, "manual__1")


def test_the_train_form_refuses_a_dataset_version_that_is_not_v_and_hex():
    from airflow.sdk.definitions.param import ParamValidationError

    from conveyor.factory.train import train_params
    from conveyor.spec import PipelineSpec

    param = train_params(PipelineSpec.model_validate(SPEC))["dataset_version"]
    for accepted in ("", None, "v-0123456789abcdef0123"):
        assert param.resolve(accepted) == accepted
    for refused in ("v-../x", "../../raw/other/v-0123456789abcdef0123", "latest"):
        with pytest.raises(ParamValidationError, match="does not match"):
            param.resolve(refused)
