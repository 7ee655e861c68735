"""The SageMaker batch transform: the exact CreateTransformJob request, deferral, loading the answers once.

The lake is S3 on moto's server; the SageMaker hook is a mock (``conveyor.aws.hosting.sagemaker_hook``)
so the requests are asserted as sent. moto runs no container, so the job itself is emulated by
``sagemaker_emulator.run_transform_job``: the model's real ``code/inference.py`` handlers over the
request's S3 input, answers written where the request says.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from unittest import mock

import boto3
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException, TaskDeferred
from botocore.exceptions import ClientError

from conveyor.batch.readers import BatchInputError
from helpers import context, pipeline_spec_dict
from sagemaker_emulator import run_transform_job
from sagemaker_pipeline import Matches, sagemaker_include

pytestmark = pytest.mark.slow  # the session's churn model trains once (about 20 s)

RUN = "scheduled__2026-03-01T06:00:00+00:00"
WHEN = datetime(2026, 3, 1, 6, 0, tzinfo=UTC)
ROWS = 2300
TAGS = [
    {"Key": "conveyor:pipeline", "Value": "churn"},
    {"Key": "conveyor:model-version", "Value": "3"},
    {"Key": "conveyor:run-id", "Value": RUN},
]


def missing(what: str) -> ClientError:
    return ClientError({"Error": {"Code": "ValidationException", "Message": f"Could not find {what} 'x'."}}, "Describe")


@pytest.fixture
def setup(s3_lake, churn_model, moto_server, tmp_path, monkeypatch):
    """Churn in sagemaker mode on an S3 lake (moto), its model on S3, an inference drop, a mocked SageMaker hook."""
    from conveyor.demo import churn_frame

    sagemaker_include(
        tmp_path / "include",
        monkeypatch,
        {
            "deploy": {
                "batch": {
                    "enabled": True,
                    "chunk_rows": 1000,
                    "instance_type": "ml.c5.xlarge",
                    "instance_count": 2,
                    "max_payload_mb": 1,
                }
            }
        },
    )
    monkeypatch.setenv("CONVEYOR_WAREHOUSE_URL", f"sqlite:///{tmp_path}/warehouse.db")
    archive = s3_lake.models("churn", "train-7") / "model.tar.gz"
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(churn_model["archive"].read_bytes())
    frame = churn_frame(ROWS, seed=5).drop(columns=["churned"])
    drop = s3_lake.landing("churn", "inference", "d-1")
    drop.mkdir(parents=True, exist_ok=True)
    (drop / "customers.csv").write_bytes(frame.to_csv(index=False).encode())
    (drop / "_SUCCESS").write_bytes(b"")
    hook = mock.MagicMock(name="SageMakerHook")
    hook.conn_region_name = "us-east-1"
    hook.describe_model.side_effect = missing("model")
    hook.describe_transform_job.side_effect = missing("transform job")
    monkeypatch.setattr("conveyor.aws.hosting.sagemaker_hook", lambda spec: hook)
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    model = {
        "model_name": "churn",
        "version": "3",
        "model_uri": s3_lake.uri("models", "churn", "train-7", "model.tar.gz"),
        "train_run": "train-7",
        "status": "Approved",
        "sha256": hashlib.sha256(churn_model["archive"].read_bytes()).hexdigest(),
    }
    return {
        "lake": s3_lake,
        "hook": hook,
        "s3": s3,
        "frame": frame,
        "model": model,
        "engine": sa.create_engine(f"sqlite:///{tmp_path}/warehouse.db"),
    }


def ctx() -> dict:
    return {**context(RUN), "logical_date": WHEN}


def operator(setup, **kwargs):
    from conveyor.operators.batch_sagemaker import SageMakerBatchPredictOperator

    return SageMakerBatchPredictOperator(
        task_id="score", spec=pipeline_spec_dict("churn"), model=setup["model"], **kwargs
    )


def start(setup) -> TaskDeferred:
    with pytest.raises(TaskDeferred) as caught:
        operator(setup).execute(ctx())
    return caught.value


def table_rows(setup) -> pd.DataFrame:
    with setup["engine"].connect() as conn:
        return pd.read_sql(sa.text("SELECT * FROM churn_predictions ORDER BY customer_id"), conn)


def test_transform_job_request_deferral_and_rows_loaded_once(setup, churn_model):
    from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger

    from conveyor.model.artifacts import LoadedModel

    hook, lake = setup["hook"], setup["lake"]
    event = start(setup)
    work = f"{lake.root}/predictions/churn/{'scheduled__2026-03-01T06_00_00_00_00'}/_transform"
    hook.create_model.assert_called_once()
    model_name = hook.create_model.call_args.args[0]["ModelName"]
    assert model_name == Matches(r"churn-v3-[0-9a-f]{6}")
    hook.conn.create_transform_job.assert_called_once_with(  # boto3's: no check of the input just written
        **{
            "TransformJobName": Matches(r"churn-batch-[0-9a-f]{12}"),
            "ModelName": model_name,
            "BatchStrategy": "MultiRecord",
            "MaxPayloadInMB": 1,
            "TransformInput": {
                "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"{work}/input/"}},
                "ContentType": "text/csv",
                "CompressionType": "None",
                "SplitType": "Line",
            },
            "TransformOutput": {"S3OutputPath": f"{work}/output", "Accept": "application/json", "AssembleWith": "Line"},
            "TransformResources": {"InstanceType": "ml.c5.xlarge", "InstanceCount": 2},
            "Tags": TAGS,
        },
    )
    request = hook.conn.create_transform_job.call_args.kwargs
    job = request["TransformJobName"]
    classpath, kwargs = event.trigger.serialize()
    assert classpath == "airflow.providers.amazon.aws.triggers.sagemaker.SageMakerTrigger"
    assert kwargs == {
        "job_name": job,
        "job_type": "transform",
        "waiter_delay": 30,
        "waiter_max_attempts": 720,
        "aws_conn_id": "aws_default",
    }
    assert SageMakerTrigger(**kwargs).serialize() == (classpath, kwargs)
    assert event.method_name == "execute_complete"  # the job's name derives from the run
    assert event.kwargs["manifest"]["rows"] == ROWS  # what loading needs, carried (not read back)

    # Three input files of at most 1,000 headerless feature rows.
    inputs = sorted(p.name for p in (lake.predictions("churn", RUN) / "_transform" / "input").iterdir())
    assert inputs == ["part-00000.csv", "part-00001.csv", "part-00002.csv"]

    # The job runs (emulated: the model's own handlers over exactly the request's S3 input).
    assert len(run_transform_job(request, setup["model"]["model_uri"], setup["s3"])) == 3
    result = operator(setup).execute_complete(ctx(), {"status": "success", "job_name": job})
    assert result["rows"] == ROWS and result["table"] == "churn_predictions" and result["model_version"] == "3"

    rows = table_rows(setup)
    assert list(rows.columns) == [
        "customer_id",
        "prediction",
        "proba_no",
        "proba_yes",
        "model_name",
        "model_version",
        "run_id",
        "scored_at",
        "pipeline",
    ]
    frame = setup["frame"].sort_values("customer_id").reset_index(drop=True)
    expected = LoadedModel(churn_model["dir"]).predict_frame(frame)
    assert list(rows["customer_id"]) == list(frame["customer_id"])
    assert list(rows["prediction"]) == list(expected["prediction"])
    np.testing.assert_allclose(rows[["proba_no", "proba_yes"]], expected[["proba_no", "proba_yes"]], rtol=1e-9)
    assert set(rows["model_version"]) == {"3"} and set(rows["run_id"]) == {RUN} and set(rows["model_name"]) == {"churn"}
    assert set(rows["pipeline"]) == {"churn"}  # the table's rows are keyed by pipeline and run
    parquet = lake.predictions("churn", RUN)
    assert json.loads((parquet / "_SUCCESS.json").read_text())["rows"] == ROWS
    assert (lake.landing("churn", "inference", "d-1") / "_SCORED.json").exists()
    summary = json.loads((lake.reports("churn", RUN) / "batch" / "summary.json").read_text())
    assert summary["rows"] == ROWS and summary["transform_job"] == job

    # A retry of the task: the completed job is reused (no second job) and the rows are replaced, not added.
    hook.describe_transform_job.side_effect = None
    hook.describe_transform_job.return_value = {"TransformJobName": job, "TransformJobStatus": "Completed"}
    again = operator(setup).execute(ctx())
    assert again["rows"] == ROWS
    hook.conn.create_transform_job.assert_called_once()
    assert len(table_rows(setup)) == ROWS
    parts = sorted(p.name for p in parquet.iterdir() if p.name.startswith("part-"))
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


def test_a_retry_waits_for_the_job_in_progress(setup):
    hook = setup["hook"]
    hook.describe_transform_job.side_effect = None
    hook.describe_transform_job.return_value = {"TransformJobStatus": "InProgress"}
    with pytest.raises(TaskDeferred):
        operator(setup).execute(ctx())
    hook.conn.create_transform_job.assert_not_called()
    hook.create_model.assert_not_called()


def test_a_failed_job_fails_the_task_with_its_reason(setup):
    hook = setup["hook"]
    start(setup)
    job = hook.conn.create_transform_job.call_args.kwargs["TransformJobName"]
    hook.describe_transform_job.side_effect = None
    hook.describe_transform_job.return_value = {
        "TransformJobName": job,
        "TransformJobStatus": "Failed",
        "FailureReason": "ClientError: See job logs for more information",
    }
    with pytest.raises(AirflowFailException, match=f"{job} ended Failed: ClientError: See job logs"):
        operator(setup).execute_complete(ctx(), {"status": "failed", "message": "x"})
    with pytest.raises(AirflowFailException, match="start a new run"):
        operator(setup).execute(ctx())  # the retry finds the failed job: no new one under the same name
    hook.conn.create_transform_job.assert_called_once()
    with setup["engine"].connect() as conn:
        assert not sa.inspect(conn).has_table("churn_predictions")


def test_answers_that_do_not_match_the_input_are_refused(setup):
    start(setup)
    request = setup["hook"].conn.create_transform_job.call_args.kwargs
    written = run_transform_job(request, setup["model"]["model_uri"], setup["s3"])
    bucket = setup["lake"].root.split("/")[2]
    body = setup["s3"].get_object(Bucket=bucket, Key=written[1])["Body"].read()
    answers = json.loads(body.splitlines()[0])
    answers["predictions"] = answers["predictions"][:-1]  # one answer lost
    setup["s3"].put_object(Bucket=bucket, Key=written[1], Body=json.dumps(answers).encode() + b"\n")
    with pytest.raises(AirflowFailException, match="part-00001.csv.out: 999 answers for 1000 input rows") as caught:
        operator(setup).execute_complete(ctx(), {"status": "success"})
    assert isinstance(caught.value.__cause__, BatchInputError)
    assert not (setup["lake"].predictions("churn", RUN) / "_SUCCESS.json").exists()


def test_a_line_break_in_a_value_is_refused_before_any_job(setup):
    frame = setup["frame"].copy()
    frame.loc[5, "region"] = "north\nwest"
    drop = setup["lake"].landing("churn", "inference", "d-1")
    (drop / "customers.csv").write_bytes(frame.to_csv(index=False).encode())
    with pytest.raises(AirflowFailException, match="row 6, column 'region' holds a line break") as caught:
        operator(setup).execute(ctx())
    assert isinstance(caught.value.__cause__, BatchInputError)
    setup["hook"].conn.create_transform_job.assert_not_called()


def test_nothing_to_score_skips_before_the_archive_is_read(setup, monkeypatch):
    import conveyor.model.artifacts

    (setup["lake"].landing("churn", "inference", "d-1") / "_SCORED.json").write_bytes(b"{}")
    monkeypatch.setattr(conveyor.model.artifacts, "verified_metadata", lambda *a, **k: pytest.fail("read the archive"))
    with pytest.raises(AirflowSkipException, match="no complete, unscored drop"):
        operator(setup).execute(ctx())


def test_an_expired_credential_is_a_clear_retryable_error(setup):
    from conveyor.aws.common import AwsCredentialsExpired

    setup["hook"].conn.create_transform_job.side_effect = ClientError(
        {
            "Error": {
                "Code": "ExpiredTokenException",
                "Message": "The security token included in the request is expired",
            }
        },
        "CreateTransformJob",
    )
    with pytest.raises(AwsCredentialsExpired, match="ExpiredTokenException.*refresh") as caught:
        operator(setup).execute(ctx())
    assert caught.value.retryable and not isinstance(caught.value, AirflowFailException)  # the task's retries apply


def test_an_input_outside_the_lake_fails_before_any_job_or_file(setup):
    """Issue 17 item 13: the transform job reads only what is inside the lake's bucket and prefix."""
    lake = setup["lake"]
    bucket = lake.root.removeprefix("s3://").split("/")[0]
    for given, rule in (
        ("s3://other-bucket/rows.csv", "host or bucket 'other-bucket' is not the lake's"),
        (f"s3://{bucket}/elsewhere/rows.csv", "not below the lake's root"),
        ("http://127.0.0.1:9/rows.csv", "http:// is not the lake's scheme"),
        ("file:///etc/passwd", "file:// is not the lake's scheme"),
    ):
        with pytest.raises(AirflowFailException, match=f"^Param 'input': .* is refused: .*{rule}"):
            operator(setup, input_uri=given).execute(ctx())
    setup["hook"].conn.create_transform_job.assert_not_called()
    assert not (lake.predictions("churn", RUN) / "_transform").exists()
    inside = lake.uri("landing", "churn", "inference", "d-1")
    with pytest.raises(TaskDeferred):
        operator(setup, input_uri=inside).execute(ctx())  # the lake's own drop, named by its URI


def test_an_archive_whose_sha256_differs_from_the_registry_is_refused_before_any_model(setup):
    setup["model"]["sha256"] = "0" * 64
    with pytest.raises(AirflowFailException, match="sha256"):
        operator(setup).execute(ctx())
    setup["hook"].create_model.assert_not_called()
    setup["hook"].conn.create_transform_job.assert_not_called()
    assert not (setup["lake"].predictions("churn", RUN) / "_transform").exists()  # nor any input written


def first_try() -> dict:
    from types import SimpleNamespace

    return {**ctx(), "ti": SimpleNamespace(try_number=1)}


def test_a_first_try_starts_its_job_without_asking_for_one_or_clearing_input(setup, monkeypatch):
    """The job's name derives from the run: only a retry can meet an earlier try's job or input, so the first
    try neither describes the job nor lists the work folder to clear it, nor lists the output folder."""
    import conveyor.batch.parts
    import conveyor.lake

    listed: list[str] = []
    keys_below = conveyor.lake.keys_below
    monkeypatch.setattr(
        conveyor.lake, "keys_below", lambda path, **kw: listed.append(str(path)) or keys_below(path, **kw)
    )
    hook = setup["hook"]
    with pytest.raises(TaskDeferred):
        operator(setup).execute(first_try())
    hook.describe_transform_job.assert_not_called()
    request = hook.conn.create_transform_job.call_args.kwargs
    run_transform_job(request, setup["model"]["model_uri"], setup["s3"])
    monkeypatch.setattr(conveyor.batch.parts, "_old_output", lambda target: pytest.fail("listed the output"))
    result = operator(setup).execute_complete(first_try(), {"status": "success"})
    assert result["rows"] == ROWS and len(table_rows(setup)) == ROWS
    assert not [path for path in listed if "/predictions/" in path]  # neither _transform/ nor the run's folder


def test_a_first_try_meeting_a_job_of_its_name_fails_without_loading_it(setup):
    """A run id used before (a run deleted and triggered again): its job is not this run's to load."""
    hook = setup["hook"]
    hook.conn.create_transform_job.side_effect = ClientError(
        {"Error": {"Code": "ResourceInUse", "Message": "Job name must be unique ... already exists"}},
        "CreateTransformJob",
    )
    with pytest.raises(AirflowFailException, match="exists already .*though this is the task's first try.*start a new"):
        operator(setup).execute(first_try())
    hook.describe_transform_job.assert_called_once()  # asked only once the create was refused: how old is it?
    assert not (setup["lake"].predictions("churn", RUN) / "_SUCCESS.json").exists()
    with pytest.raises(ClientError, match="ResourceInUse"):  # a retry's collision is not this rule's
        operator(setup).execute(ctx())


@pytest.mark.parametrize(
    "code, message",
    [
        ("ResourceInUse", "Job name must be unique ... already exists"),
        (
            "ValidationException",
            "Job name must be unique within an AWS account and region, and a job with this name already exists",
        ),
    ],
)
def test_a_first_try_whose_create_was_resent_waits_for_its_own_job(setup, code, message):
    """botocore resent the create after a timeout: the job SageMaker made moments ago is this try's own."""
    hook = setup["hook"]
    hook.conn.create_transform_job.side_effect = ClientError({"Error": {"Code": code, "Message": message}}, "Create")
    hook.describe_transform_job.side_effect = None
    hook.describe_transform_job.return_value = {
        "TransformJobStatus": "InProgress",
        "CreationTime": datetime.now(UTC),
    }
    with pytest.raises(TaskDeferred):
        operator(setup).execute(first_try())
    hook.describe_transform_job.return_value["CreationTime"] = datetime(2026, 1, 1, tzinfo=UTC)  # an old run's
    with pytest.raises(AirflowFailException, match="exists already \\(created 2026-01-01"):
        operator(setup).execute(first_try())
