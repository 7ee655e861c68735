"""The tuning step on SageMaker: the exact tuning job request, and the provider's SageMakerTuningOperator on moto.

Where moto stops: moto 5.2 accepts ``CreateHyperParameterTuningJob`` (botocore validates the request
against the SageMaker API model first) and answers ``DescribeHyperParameterTuningJob`` with the job
``Completed`` at once and a fixed ``BestTrainingJob`` (``FakeTrainingJobName``); it runs no training job
and does not implement ``ListTrainingJobsForHyperParameterTuningJob``. So the request and the
provider's create/describe run on moto; the trial listing is tested with botocore's ``Stubber`` (the
request checked against the API model, pages followed); and taking the best job's model
(``conveyor.aws.training.job_model``, tested with the training emulator in test_train_sagemaker.py) is
replaced by a recorder here.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from conveyor.aws import training as sm
from conveyor.aws import tuning as smt
from conveyor.training.tuning import trial_spec
from helpers import context
from sagemaker_emulator import sagemaker_pipeline

PROJECT = Path(__file__).resolve().parents[3]
SPACE = {
    "lr": {"type": "float", "low": 0.0001, "high": 0.1, "log": True},
    "epochs": {"type": "int", "low": 2, "high": 8},
    "batch_size": {"type": "int", "low": 8, "high": 32, "step": 8},
    "optimizer": {"type": "categorical", "choices": ["sgd", "adamw"]},
    "freeze_backbone": {"type": "categorical", "choices": [True, False]},
}


def shapes_on_sagemaker(tmp_path, monkeypatch, **tuning):
    hyperparameters = {"arch": "resnet18", "image-size": 32, "workers": 0}
    block = {"metric": "balanced_accuracy", "trials": 6, "parallel": 2, "budget": 300, "search_space": SPACE, **tuning}
    return sagemaker_pipeline(
        tmp_path,
        monkeypatch,
        pipeline="shapes",
        registry="mlflow",
        trainer={"hyperparameters": hyperparameters, "gpu": False},
        changes={"tuning": block},
        check_interval_seconds=1,
        max_run_seconds=900,
    )


def test_the_tuning_job_request(tmp_path, monkeypatch):
    spec = shapes_on_sagemaker(tmp_path, monkeypatch)
    name = smt.tuning_job_name(spec.name, "shapes__train", "manual__1")
    assert len(name) <= 32 and name.startswith("shapes-")
    args = sm.job_arguments(trial_spec(spec, {}), spec.tuning.trial_seconds(300), "")
    training = sm.training_job_config(
        spec,
        name,
        "img",
        {"train": "s3://b/split/train/", "validation": "s3://b/split/validation/"},
        "s3://b/out/",
        "s3://b/checkpoints/",
        sm.hyperparameters(args, "train.py", "s3://b/source/sourcedir.tar.gz", "us-east-1"),
        {"conveyor:pipeline": "shapes"},
    )
    config = smt.tuning_job_config(spec, name, training, 300, sm.wait_limit_seconds(spec))
    tuning = config["HyperParameterTuningJobConfig"]
    assert tuning["Strategy"] == "Bayesian" and tuning["RandomSeed"] == 0
    assert tuning["HyperParameterTuningJobObjective"] == {
        "Type": "Maximize",
        "MetricName": "validation:balanced_accuracy",
    }
    assert tuning["ResourceLimits"] == {
        "MaxNumberOfTrainingJobs": 6,
        "MaxParallelTrainingJobs": 2,
        "MaxRuntimeInSeconds": 3 * 900,  # 3 waves of 2, each at most max_run_seconds
    }
    assert tuning["ParameterRanges"] == {
        "IntegerParameterRanges": [{"Name": "epochs", "MinValue": "2", "MaxValue": "8", "ScalingType": "Linear"}],
        "ContinuousParameterRanges": [
            {"Name": "lr", "MinValue": "0.0001", "MaxValue": "0.1", "ScalingType": "Logarithmic"}
        ],
        "CategoricalParameterRanges": [
            {"Name": "batch-size", "Values": ["8", "16", "24", "32"]},  # a stepped range: its values
            {"Name": "optimizer", "Values": ['"sgd"', '"adamw"']},  # JSON-encoded, as the SDK does
            {"Name": "freeze-backbone", "Values": ["true", "false"]},
        ],
    }
    definition = config["TrainingJobDefinition"]
    static = definition["StaticHyperParameters"]
    assert not {"lr", "epochs", "batch-size", "optimizer", "freeze-backbone", "checkpoint-dir"} & set(static)
    assert static["gate-metric"] == '"balanced_accuracy"' and static["time-limit"] == '"100"'  # 300 s x 2 / 6
    assert static["image-size"] == '"32"' and static["sagemaker_program"] == '"train.py"'
    assert "CheckpointConfig" not in definition and "TrainingJobName" not in definition
    assert definition["StoppingCondition"] == {"MaxRuntimeInSeconds": 900}
    assert definition["InputDataConfig"] == training["InputDataConfig"]
    assert config["Tags"] == [
        {"Key": "conveyor:pipeline", "Value": "shapes"},
        {"Key": "conveyor:tuning-budget", "Value": "300"},
    ]
    (metric,) = definition["AlgorithmSpecification"]["MetricDefinitions"]
    line = "saved: /opt/ml/model/model.pt (42.7 MB, epoch 3, balanced_accuracy 0.8125), /opt/ml/model/metadata.json"
    assert re.search(metric["Regex"], line).group(1) == "0.8125"


def test_the_metric_line_is_the_one_the_resnet_trainer_prints():
    source = (PROJECT / "include" / "training" / "resnet_image" / "train.py").read_text()
    assert (
        "f\"saved: {model_dir / 'model.pt'} ({size_mb:.1f} MB, epoch {progress.best_epoch}, {args.gate_metric} \""
        in source
    )
    assert 'f"{progress.best_score:.4f}), ' in source


def test_random_search_and_minimized_metrics(tmp_path, monkeypatch):
    spec = shapes_on_sagemaker(tmp_path, monkeypatch, strategy="random", seed=7, search_space={"lr": SPACE["lr"]})
    training = {
        "TrainingJobName": "x",
        "HyperParameters": {"lr": "1"},
        "AlgorithmSpecification": {"TrainingImage": "i", "TrainingInputMode": "File"},
    }
    config = smt.tuning_job_config(spec, "x", training, 300, 900)
    assert config["HyperParameterTuningJobConfig"]["Strategy"] == "Random"
    assert config["HyperParameterTuningJobConfig"]["RandomSeed"] == 7
    assert config["TrainingJobDefinition"]["StaticHyperParameters"] == {}


def test_sagemaker_refuses_what_a_tuning_job_cannot_take(tmp_path, monkeypatch):
    from conveyor.errors import SpecError

    with pytest.raises(
        SpecError, match=r"field 'tuning.search_space.epochs': 46 values: rule 'at most 30 on SageMaker'"
    ):
        shapes_on_sagemaker(
            tmp_path, monkeypatch, search_space={"epochs": {"type": "int", "low": 5, "high": 50, "step": 1}}
        )
    with pytest.raises(SpecError, match="compute 'sagemaker' tunes the resnet trainer's flags only"):
        sagemaker_pipeline(
            tmp_path,
            monkeypatch,
            changes={
                "tuning": {
                    "metric": "roc_auc",
                    "search_space": {"GBM.num_leaves": {"type": "int", "low": 8, "high": 64}},
                }
            },
        )


def test_list_trials_follows_every_page():
    client = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    job = {
        "TrainingJobName": "t-001",
        "TrainingJobArn": "arn:aws:sagemaker:us-east-1:123456789012:training-job/t-001",
        "CreationTime": datetime(2026, 1, 1, tzinfo=UTC),
        "TrainingJobStatus": "Completed",
        "TunedHyperParameters": {"lr": "0.01"},
    }
    with Stubber(client) as stub:  # the requests are checked against SageMaker's API model
        stub.add_response(
            "list_training_jobs_for_hyper_parameter_tuning_job",
            {"TrainingJobSummaries": [job], "NextToken": "p2"},
            {"HyperParameterTuningJobName": "t", "MaxResults": 100},
        )
        stub.add_response(
            "list_training_jobs_for_hyper_parameter_tuning_job",
            {"TrainingJobSummaries": [{**job, "TrainingJobName": "t-002", "TrainingJobStatus": "Failed"}]},
            {"HyperParameterTuningJobName": "t", "MaxResults": 100, "NextToken": "p2"},
        )
        jobs = smt.list_trials(client, "t")
        stub.assert_no_pending_responses()
    assert [j["TrainingJobName"] for j in jobs] == ["t-001", "t-002"]


def test_trials_summary_orders_trials_and_marks_the_best(tmp_path, monkeypatch):
    spec = shapes_on_sagemaker(tmp_path, monkeypatch)
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def job(name, minute, status, value=None):
        return {
            "TrainingJobName": name,
            "CreationTime": start.replace(minute=minute),
            "TrainingStartTime": start.replace(minute=minute),
            "TrainingEndTime": start.replace(minute=minute + 1),
            "TrainingJobStatus": status,
            "TunedHyperParameters": {"lr": "0.01", "optimizer": '"sgd"'},
            **({"FinalHyperParameterTuningJobObjectiveMetric": {"MetricName": "m", "Value": value}} if value else {}),
            **({"FailureReason": "AlgorithmError: boom"} if status == "Failed" else {}),
        }

    jobs = [job("t-002", 5, "Completed", 0.9), job("t-001", 1, "Completed", 0.7), job("t-003", 9, "Failed")]
    description = {
        "HyperParameterTuningJobName": "t",
        "BestTrainingJob": {
            **jobs[0],
            "FinalHyperParameterTuningJobObjectiveMetric": {"MetricName": "m", "Value": 0.9},
        },
    }
    summary = smt.trials_summary(spec, description, jobs, 300)
    assert [(t["training_job"], t["status"], t["value"]) for t in summary["trials"]] == [
        ("t-001", "complete", 0.7),
        ("t-002", "complete", 0.9),
        ("t-003", "failed", None),
    ]
    assert summary["best_trial"] == 1 and summary["best_value"] == 0.9
    assert summary["best_params"] == {"lr": 0.01, "optimizer": "sgd"}
    assert summary["trials"][2]["error"] == "AlgorithmError: boom" and summary["trials"][0]["seconds"] == 60.0


@pytest.mark.slow  # moto's server, the S3 lake
def test_the_provider_operator_creates_the_job_on_moto_and_keeps_the_best_model(
    tmp_path, monkeypatch, s3_lake, sagemaker_aws
):
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    from conveyor.operators import tune_sagemaker
    from conveyor.operators.tune_sagemaker import SageMakerTuneModelOperator

    spec = shapes_on_sagemaker(tmp_path, monkeypatch)
    run_id = f"manual__{uuid.uuid4().hex[:8]}"
    for part in ("train", "validation"):
        (s3_lake.models(spec.name, run_id) / "split" / part / "manifest.csv").write_text("path,label\n")
    client = SageMakerHook(aws_conn_id="aws_default").conn
    client.create_training_job(  # the best training job moto names (it runs none)
        TrainingJobName="FakeTrainingJobName",
        RoleArn=spec.sagemaker.role_arn,
        AlgorithmSpecification={"TrainingImage": "img", "TrainingInputMode": "File"},
        OutputDataConfig={"S3OutputPath": "s3://b/out/"},
        ResourceConfig={"InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        StoppingCondition={"MaxRuntimeInSeconds": 900},
    )
    taken = []
    monkeypatch.setattr(
        smt, "list_trials", lambda conn, name: []
    )  # moto has no ListTrainingJobsForHyperParameterTuningJob
    monkeypatch.setattr(
        sm, "job_model", lambda *args, **kwargs: taken.append((args, kwargs)) or {"model_uri": "s3://m/model.tar.gz"}
    )
    operator = SageMakerTuneModelOperator(
        task_id="train",
        spec=spec.model_dump(mode="json"),
        split={"dataset_version": "v-test", "parts": {}},
        aws_conn_id="aws_default",
        deferrable=False,
        check_interval=1,
    )
    ctx = {**context(run_id), "dag": None}
    monkeypatch.setattr(SageMakerTuneModelOperator, "dag_id", "shapes__train", raising=False)
    result = operator.execute(ctx)

    name = smt.tuning_job_name(spec.name, "shapes__train", run_id)
    described = client.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
    assert described["HyperParameterTuningJobConfig"]["ParameterRanges"]["ContinuousParameterRanges"][0]["Name"] == "lr"
    assert described["TrainingJobDefinition"]["StaticHyperParameters"]["time-limit"] == '"100"'
    source = described["TrainingJobDefinition"]["StaticHyperParameters"]["sagemaker_submit_directory"]
    assert json.loads(source).endswith("/sourcedir.tar.gz")  # uploaded to the S3 lake before the job was created
    ((args, kwargs),) = taken
    assert args[4]["TrainingJobName"] == "FakeTrainingJobName"  # the best training job's description
    assert kwargs["tuning"]["tuning_job"] == name and kwargs["tuning"]["best_training_job"] == "FakeTrainingJobName"
    assert result["tuning"]["tuning_job"] == name and result["model_uri"] == "s3://m/model.tar.gz"
    assert tune_sagemaker  # the module the factory imports

    operator.execute(ctx)  # a retry finds the completed job: no second create (moto would refuse it)
    assert len(taken) == 2
