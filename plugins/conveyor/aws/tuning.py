"""The tuning step on SageMaker: a hyperparameter tuning job over the trainer's flags.

The tuning job's training jobs are the train task's own training job (``conveyor.aws.training``:
script mode, the run's split as channels, every flag a hyperparameter) with the tuned flags taken
out of the static hyperparameters and given as parameter ranges. Each trial gets its share of the
budget as ``--time-limit`` (``TuningSpec.trial_seconds``); SageMaker reads the trial's metric
from its log with a metric definition on the line the trainer prints when it saves the best model.

Only the ResNet trainer is tuned on SageMaker (``conveyor.training.tuning_spec`` refuses the rest at
parse time): AutoGluon's model hyperparameters are one JSON flag, which a range cannot reach into.
The Airflow side is the Amazon provider's ``SageMakerTuningOperator``
(``conveyor.operators.tune_sagemaker``); the best training job's model is taken like a training
job's (``conveyor.aws.training.job_model``) and the trials go into its metadata (``tuning``).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

from conveyor.aws.common import sagemaker_name
from conveyor.training.tuning_spec import flag_name

if TYPE_CHECKING:
    from conveyor.spec import PipelineSpec

MAX_RUNTIME = 30 * 24 * 3600  # SageMaker's most for ResourceLimits.MaxRuntimeInSeconds
MAX_CATEGORICAL_VALUES = 30  # SageMaker's most values of one categorical range (a stepped range becomes one)
_TUNING_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,31}$")
STRATEGIES = {"tpe": "Bayesian", "random": "Random"}
# What each trainer prints when it saves its best model; group 1 is the validation metric.
METRIC_LINES = {"resnet": r"saved: .*, epoch \d+, {metric} (-?[0-9.]+(?:[eE][-+]?[0-9]+)?)\)"}
RUNNING = frozenset({"InProgress", "Stopping"})


def tuning_job_name(pipeline: str, dag_id: str, run_id: str) -> str:
    """The tuning job of an Airflow run (32 characters at most, SageMaker's limit), the same for every try.

    :param pipeline: the pipeline's name.
    :param dag_id: the train DAG's id.
    :param run_id: the Airflow run's id.
    """
    digest = hashlib.sha256(f"{dag_id}\n{run_id}\ntuning".encode()).hexdigest()[:12]
    name = f"{sagemaker_name(pipeline, 19)}-{digest}"
    assert _TUNING_JOB_NAME.match(name), name
    return name


def hyperparameter_name(name: str) -> str:
    """A search-space name as the SageMaker hyperparameter of the script's flag (``batch_size`` -> ``batch-size``).

    :param name: the search-space name.
    """
    return flag_name(name).replace("_", "-")


def stepped_values(low: float, high: float, step: float) -> list[float]:
    """The values of a stepped range, ``low`` first (SageMaker ranges have no step: a categorical range).

    :param low: the lower bound.
    :param high: the upper bound.
    :param step: the step.
    """
    count = int((high - low) / step + 1e-9) + 1
    return [round(low + i * step, 12) for i in range(count)]


def parameter_ranges(spec: PipelineSpec) -> dict[str, list[dict[str, Any]]]:
    """``ParameterRanges`` of the tuning job: each search-space entry as a SageMaker range.

    Categorical values are JSON-encoded, as the SageMaker Python SDK does for framework containers
    (the training toolkit decodes every hyperparameter); numeric bounds are plain numbers.

    :param spec: the pipeline (its ``tuning.search_space``).
    """
    assert spec.tuning is not None
    ranges: dict[str, list[dict[str, Any]]] = {
        "IntegerParameterRanges": [],
        "ContinuousParameterRanges": [],
        "CategoricalParameterRanges": [],
    }
    for name, dist in spec.tuning.search_space.items():
        hp = hyperparameter_name(name)
        if dist.type == "categorical":
            ranges["CategoricalParameterRanges"].append({"Name": hp, "Values": [json.dumps(v) for v in dist.choices]})
        elif dist.step is not None:
            values = stepped_values(dist.low, dist.high, dist.step)
            shown = [int(v) if dist.type == "int" else v for v in values]
            ranges["CategoricalParameterRanges"].append({"Name": hp, "Values": [json.dumps(v) for v in shown]})
        else:
            key = "IntegerParameterRanges" if dist.type == "int" else "ContinuousParameterRanges"
            ranges[key].append(
                {
                    "Name": hp,
                    "MinValue": str(dist.low),
                    "MaxValue": str(dist.high),
                    "ScalingType": "Logarithmic" if dist.log else "Linear",
                }
            )
    return ranges


def objective_metric(spec: PipelineSpec) -> dict[str, str]:
    """The metric definition of the trials (a regex on the trainer's log line) and its name.

    :param spec: the pipeline (its trainer and ``tuning.metric``).
    """
    assert spec.tuning is not None
    metric = spec.tuning.metric
    return {"Name": f"validation:{metric}", "Regex": METRIC_LINES[spec.trainer.kind].format(metric=re.escape(metric))}


def tuning_job_config(
    spec: PipelineSpec, name: str, training: dict[str, Any], budget: int, wait_limit: int
) -> dict[str, Any]:
    """The ``CreateHyperParameterTuningJob`` request from a run's ``CreateTrainingJob`` request.

    :param spec: the pipeline (its ``tuning`` block).
    :param name: the tuning job's name (:func:`tuning_job_name`).
    :param training: the trial's training job request (``conveyor.aws.training.job_request``, without the
        tuned flags, its ``--time-limit`` a trial's share).
    :param budget: seconds for all trials.
    :param wait_limit: the longest one trial can take (``conveyor.aws.training.wait_limit_seconds``).
    """
    tuning = spec.tuning
    assert tuning is not None
    definition = {k: v for k, v in training.items() if k not in ("TrainingJobName", "HyperParameters", "Tags")}
    # One checkpoint folder would be shared by parallel trials (one resuming from another's): none.
    definition.pop("CheckpointConfig", None)
    tuned = {hyperparameter_name(n) for n in tuning.search_space}
    definition["StaticHyperParameters"] = {
        k: v for k, v in training["HyperParameters"].items() if k not in tuned and k != "checkpoint-dir"
    }
    metric = objective_metric(spec)
    definition["AlgorithmSpecification"] = {**training["AlgorithmSpecification"], "MetricDefinitions": [metric]}
    waves = -(-tuning.trials // tuning.parallel)
    return {
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobConfig": {
            "Strategy": STRATEGIES[tuning.strategy],
            "HyperParameterTuningJobObjective": {
                "Type": "Maximize" if tuning.goal == "maximize" else "Minimize",
                "MetricName": metric["Name"],
            },
            "ResourceLimits": {
                "MaxNumberOfTrainingJobs": tuning.trials,
                "MaxParallelTrainingJobs": tuning.parallel,
                "MaxRuntimeInSeconds": min(MAX_RUNTIME, max(120, waves * wait_limit)),
            },
            "ParameterRanges": parameter_ranges(spec),
            "TrainingJobEarlyStoppingType": "Off",
            "RandomSeed": tuning.seed,
        },
        "TrainingJobDefinition": definition,
        "Tags": [*training.get("Tags", []), {"Key": "conveyor:tuning-budget", "Value": str(budget)}],
    }


def _tuned_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def trials_summary(spec: PipelineSpec, description: dict[str, Any], jobs: list[dict[str, Any]], budget: int) -> dict:
    """What the model's metadata keeps of a completed tuning job (``tuning``), like the local search's.

    :param spec: the pipeline.
    :param description: the tuning job's ``DescribeHyperParameterTuningJob``.
    :param jobs: its ``ListTrainingJobsForHyperParameterTuningJob`` summaries.
    :param budget: seconds for all trials.
    """
    tuning = spec.tuning
    assert tuning is not None
    best = description.get("BestTrainingJob") or {}
    ordered = sorted(jobs, key=lambda j: (str(j.get("CreationTime") or ""), j["TrainingJobName"]))
    trials = []
    for number, job in enumerate(ordered):
        start, end = job.get("TrainingStartTime"), job.get("TrainingEndTime")
        seconds = round((end - start).total_seconds(), 2) if hasattr(end, "__sub__") and start else 0.0
        final = job.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
        status = {"Completed": "complete", "Failed": "failed", "Stopped": "failed"}.get(
            job["TrainingJobStatus"], "running"
        )
        trials.append(
            {
                "number": number,
                "params": {k: _tuned_value(v) for k, v in (job.get("TunedHyperParameters") or {}).items()},
                "status": status,
                "value": final.get("Value"),
                "seconds": seconds,
                "error": job.get("FailureReason"),
                "training_job": job["TrainingJobName"],
            }
        )
    best_number = next((t["number"] for t in trials if t["training_job"] == best.get("TrainingJobName")), None)
    return {
        "backend": "sagemaker",
        "tuning_job": description.get("HyperParameterTuningJobName"),
        **tuning.settings(budget),
        "best_trial": best_number,
        "best_training_job": best.get("TrainingJobName"),
        "best_value": (best.get("FinalHyperParameterTuningJobObjectiveMetric") or {}).get("Value"),
        "best_params": {k: _tuned_value(v) for k, v in (best.get("TunedHyperParameters") or {}).items()},
        "trials": trials,
    }


def list_trials(client: Any, name: str) -> list[dict[str, Any]]:
    """Every training job of a tuning job (``ListTrainingJobsForHyperParameterTuningJob``, all pages).

    :param client: the boto3 SageMaker client.
    :param name: the tuning job.
    """
    jobs: list[dict[str, Any]] = []
    token = None
    while True:
        page = client.list_training_jobs_for_hyper_parameter_tuning_job(
            HyperParameterTuningJobName=name, MaxResults=100, **({"NextToken": token} if token else {})
        )
        jobs += page.get("TrainingJobSummaries", [])
        token = page.get("NextToken")
        if not token:
            return jobs
