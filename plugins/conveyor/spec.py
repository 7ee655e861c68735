"""The pipeline YAML model: one file in ``include/pipelines/`` declares one ML use case.

Every field a later capability needs is declared here, so the file format is designed once.
Unknown keys are refused, so a typo'd field is an error naming the file and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from conveyor import settings
from conveyor.errors import SpecError
from conveyor.training.tuning_spec import TuningSpec, tuning_problems

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

ProblemType = Literal["binary", "multiclass", "regression", "image_classification"]
PIPELINE_SUFFIXES = (".yaml", ".yml")  # both accepted; a name with both files keeps the .yaml one


def _cron(value: str | None, also: tuple[str, ...] = ()) -> str | None:
    """A schedule Airflow accepts: None, a cron expression, or a preset (``@hourly`` ...), or one of ``also``.

    Checked with Airflow's own timetable at parse time, so a bad one names its field instead of
    failing the DAG file (imported here, not at the top: the spec is read outside Airflow too).

    :param value: the schedule as written.
    :param also: other values the field accepts (``@once``, ``@continuous`` for a DAG's own schedule).
    """
    if value is None or value in also:
        return value
    from airflow.sdk import CronTriggerTimetable

    try:
        CronTriggerTimetable(value, timezone="UTC").validate()
    except Exception as exc:  # Airflow's AirflowTimetableInvalid (domain code raises no Airflow errors)
        raise ValueError(f"{value!r} is not a cron expression or preset (@hourly, @daily, ...): {exc}") from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CsvOptions(_Strict):
    delimiter: str = Field(",", min_length=1, max_length=1)
    encoding: Literal["utf-8"] = "utf-8"
    header: bool = True


class DataSpec(_Strict):
    format: Literal["csv", "parquet", "images"]
    label: str
    problem_type: ProblemType
    id_column: str | None = None
    features: list[str] | None = None
    marker: str = "_SUCCESS"
    csv: CsvOptions = CsvOptions()
    # Share of image files allowed to be bad before the drop is rejected (image pipelines).
    max_bad_file_share: float = Field(0.0, ge=0.0, le=1.0)


class IngestSpec(_Strict):
    schedule: str | None = "@hourly"
    poke_interval: float = Field(30.0, gt=0)
    timeout: float = Field(3600.0, gt=0)
    chunk_bytes: int = Field(8 * 1024 * 1024, ge=4096)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return _cron(value, also=("@once", "@continuous"))


class ValidationSpec(_Strict):
    """Implicit checks and limits every drop passes besides its suite (``conveyor.data.checks``)."""

    # A column whose type family differs from the last validated version's (or that appeared or
    # disappeared) rejects the drop, unless accepted here (then it is reported as a warning).
    allow_schema_drift: bool = False
    # inf/-inf in a numeric column rejects the drop unless accepted here (NaN is a missing value).
    allow_non_finite: bool = False
    # A version larger than these is rejected before it is loaded into memory for validation.
    max_rows: int = Field(5_000_000, ge=1)
    max_bytes: int = Field(1024**3, ge=1)
    # Validation runs of one version that did not finish (killed, e.g. out of memory) before it is rejected.
    max_attempts: int = Field(3, ge=1)


class SplitSpec(_Strict):
    validation: float = Field(0.15, gt=0, lt=0.5)
    test: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 42
    stratify: bool = True


class TrainerSpec(_Strict):
    kind: Literal["autogluon", "resnet"]
    # At least 1: the train DAG's time_limit Param has minimum 1 (0 failed the DAG at construction).
    time_limit: int = Field(300, ge=1)
    presets: str = "medium_quality"
    eval_metric: str | None = None
    excluded_model_types: list[str] = ["NN_TORCH", "FASTAI"]
    hyperparameters: dict[str, Any] = {}
    gpu: bool = False
    # auto: the AutoGluon trainer refits the best model on train + validation when the fit left the time for it.
    refit_full: bool | Literal["auto"] = "auto"
    infer_limit: float | None = None
    # ResNet only: a local file or URI of pretrained weights; never downloaded.
    pretrained_weights: str | None = None


class _Scheduled(_Strict):
    """A section whose ``schedule`` is a time trigger (a cron expression or preset), or None."""

    schedule: str | None = None

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        return _cron(value)


class RetrainSpec(_Scheduled):
    on_new_data: bool = True


class GateSpec(_Strict):
    metric: str
    thresholds: dict[str, float] = {}
    min_improvement: float = 0.0
    on_reject: Literal["fail", "skip"] = "fail"


class EndpointSpec(_Strict):
    enabled: bool = False
    name: str | None = None
    instance_type: str = "ml.m5.large"
    instance_count: int = Field(1, ge=1)
    workers: int = Field(2, ge=1)
    port: int = Field(8090, ge=1, le=65535)
    capture_share: float = Field(0.0, ge=0.0, le=1.0)
    # local server: requests waiting in a worker merged into one predict of at most max_batch_size
    # rows; max_batch_wait_ms > 0 holds a batch that long for more rows (0: start at once when idle).
    max_batch_size: int = Field(64, ge=1, le=10_000)
    max_batch_wait_ms: float = Field(0.0, ge=0.0, le=1000.0)
    # compute: sagemaker only (docs/aws.md): the blue/green update of an existing endpoint. Traffic
    # moves ALL_AT_ONCE, or CANARY (traffic_step_share first, the rest after wait_interval_seconds),
    # or LINEAR (traffic_step_share every wait_interval_seconds); the old fleet is kept
    # termination_wait_seconds more; any rollback_alarms (CloudWatch alarm names) in ALARM roll back.
    traffic_routing: Literal["ALL_AT_ONCE", "CANARY", "LINEAR"] = "ALL_AT_ONCE"
    traffic_step_share: float = Field(0.1, gt=0.0, lt=1.0)
    wait_interval_seconds: int = Field(300, ge=0, le=3600)
    termination_wait_seconds: int = Field(300, ge=0, le=3600)
    rollback_alarms: list[str] = Field([], max_length=10)
    # How long a deploy waits for the endpoint to be InService before it fails.
    deploy_timeout_seconds: int = Field(3600, ge=60)


class BatchSpec(_Scheduled):
    enabled: bool = False
    input: str | None = None
    table: str | None = None
    # Rows per chunk at most (local transform) and per input file (SageMaker): at 5M rows 50,000 made the local
    # transform 0.97x the rows/s of one whole-frame predict, 100,000 1.05x (docs/benchmarks.md).
    chunk_rows: int = Field(100_000, ge=1)
    workers: int = Field(2, ge=1)
    # compute: sagemaker only (docs/aws.md): the transform job's instances, the largest request
    # sent to the container (a mini-batch of CSV lines), and how long the run waits for the job.
    instance_type: str = "ml.m5.large"
    instance_count: int = Field(1, ge=1)
    max_payload_mb: int = Field(6, ge=1, le=100)
    timeout_seconds: int = Field(6 * 3600, ge=60)


class DeploySpec(_Strict):
    endpoint: EndpointSpec = EndpointSpec()
    batch: BatchSpec = BatchSpec()


class SageMakerSpec(_Strict):
    """Settings of ``compute: sagemaker`` and ``registry: sagemaker`` (see ``conveyor.aws.training``)."""

    # The execution role SageMaker assumes (required by compute: sagemaker).
    role_arn: str | None = None
    # The Airflow AWS connection for SageMaker calls, and its region (the connection's when None).
    aws_conn_id: str = "aws_default"
    region: str | None = None
    training_instance_type: str = "ml.m5.xlarge"
    training_instance_count: int = Field(1, ge=1)
    training_volume_gb: int = Field(30, ge=1)
    # Managed spot training: MaxWaitTimeInSeconds is max_wait_seconds (2 x max_run_seconds when None).
    use_spot: bool = False
    max_run_seconds: int = Field(3600, ge=60)
    max_wait_seconds: int | None = Field(None, ge=60)
    # Training / inference container images; None: the AWS framework image of the trainer.
    image_uri: str | None = None
    inference_image_uri: str | None = None
    # Prefix of the model package group (<prefix><pipeline, '_' as '-'>), for a shared account.
    name_prefix: str = Field("", pattern=r"^([a-zA-Z0-9][a-zA-Z0-9-]{0,19})?$")
    # Seconds between two status checks of a running job.
    check_interval_seconds: int = Field(30, ge=1)

    @model_validator(mode="after")
    def _spot_wait(self) -> SageMakerSpec:
        if self.max_wait_seconds is not None and self.max_wait_seconds < self.max_run_seconds:
            raise ValueError("max_wait_seconds must be at least max_run_seconds (spot waits include the run)")
        return self


class MonitorSpec(_Scheduled):
    """``<name>__monitor``: drift of batch runs and endpoint traffic, live accuracy, retraining triggers."""

    enabled: bool = True
    schedule: str | None = "@daily"
    # A feature drifts past these (see conveyor.monitoring.drift); retraining fires when the share of drifted
    # features exceeds max_drift_share, or the prediction distribution drifted.
    psi_threshold: float = Field(0.2, gt=0)
    ks_pvalue: float = Field(0.01, gt=0, lt=1)
    missing_rate: float = Field(0.1, gt=0, le=1)
    max_drift_share: float = Field(0.25, ge=0, le=1)
    # Fewer rows than this in a batch or capture slice: reported, but too few for a drift verdict.
    min_rows: int = Field(100, ge=1)
    retrain_on_prediction_drift: bool = True
    # Live accuracy: the gate metric (or this one) over feedback labels joined with predictions.
    metric: str | None = None
    min_live_metric: float | None = None
    min_new_labels: int = Field(100, ge=1)
    cooldown_hours: float = Field(24.0, ge=0)
    feedback_marker: str = "_SUCCESS"
    # Several labels for one id: the most recent wins (last), the first stays (first, later ones are
    # rejected), or an id with conflicting labels is kept out of live metrics and retraining (reject).
    feedback_duplicates: Literal["last", "first", "reject"] = "last"


class PipelineSpec(_Strict):
    name: str
    description: str = ""
    owner: str = "conveyor"
    tags: list[str] = []
    retries: int = Field(2, ge=0)
    # Seconds before the first retry of a failed task (up to twice that, jittered); each later one doubles.
    retry_delay: float = Field(30.0, gt=0)
    data: DataSpec
    expectations: str | None = None
    ingest: IngestSpec = IngestSpec()
    validation: ValidationSpec = ValidationSpec()
    split: SplitSpec = SplitSpec()
    trainer: TrainerSpec
    retrain: RetrainSpec = RetrainSpec()
    gate: GateSpec
    approval: Literal["auto", "manual"] = "auto"
    compute: Literal["local", "sagemaker"] = "local"
    registry: Literal["mlflow", "sagemaker"] = "mlflow"
    deploy: DeploySpec = DeploySpec()
    sagemaker: SageMakerSpec = SageMakerSpec()
    monitor: MonitorSpec = MonitorSpec()
    # Optional trials of the trainer before the gate (conveyor.training.tuning_spec); none when unset.
    tuning: TuningSpec | None = None

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError("must be lower-case letters, digits and '_', starting with a letter")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PipelineSpec:
        images = self.data.format == "images"
        if images != (self.data.problem_type == "image_classification"):
            raise ValueError("data.format 'images' goes with problem_type 'image_classification'")
        if images != (self.trainer.kind == "resnet"):
            raise ValueError("trainer.kind 'resnet' is for image pipelines, 'autogluon' for tables")
        if self.data.features is not None and self.data.label in self.data.features:
            raise ValueError(f"data.features must not contain the label {self.data.label!r}")
        if self.compute == "sagemaker" and not self.sagemaker.role_arn:
            raise ValueError("compute 'sagemaker' needs sagemaker.role_arn (the role training jobs run as)")
        problems = _metric_problems(self) + tuning_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # The file it was read from (load_spec); None for a spec a task received as JSON. Not dumped.
    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        """The pipeline file this spec was read from, or None when it was not read from one."""
        return self._source

    @property
    def suite_name(self) -> str:
        """The expectation suite's name (``include/expectations/<suite_name>.json``)."""
        return self.expectations or self.name


def _metric_problems(spec: PipelineSpec) -> list[str]:
    """The gate and monitor metrics that the evaluation never computes for the spec's problem type.

    :param spec: the pipeline (its problem type, gate and monitor sections).
    """
    from conveyor.model.metrics import METRICS_BY_PROBLEM_TYPE  # cheap: the functions import numpy

    problem_type = spec.data.problem_type
    computed = METRICS_BY_PROBLEM_TYPE[problem_type]
    claims = [("gate.metric", spec.gate.metric), *(("gate.thresholds", name) for name in spec.gate.thresholds)]
    if spec.monitor.metric is not None:
        claims.append(("monitor.metric", spec.monitor.metric))
    return [
        f"field '{field}': {name!r} is not a metric {problem_type} pipelines compute "
        f"(one of: {', '.join(sorted(computed))})"
        for field, name in claims
        if name not in computed
    ]


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<root>"


def _problem(err: Any) -> str:
    """One broken rule of a pydantic error as ``field '<path>': <message>``.

    :param err: one entry of ``ValidationError.errors()``.
    """
    if err["type"] == "value_error":  # a rule of Conveyor's own: its message says what was given
        rule = str(err["ctx"]["error"])
        return f"field '{_field_path(err['loc'])}': {rule}" if err["loc"] else rule  # a rule across fields names them
    given = err.get("input")
    shown = f" (got {given!r:.80})" if isinstance(given, int | float | str) and err["type"] != "missing" else ""
    return f"field '{_field_path(err['loc'])}': {err['msg']}{shown}"


class DuplicateKeyError(yaml.YAMLError):
    """A key appears twice in one YAML mapping (PyYAML would silently keep the last value)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key that appears twice in one mapping (merge keys ``<<`` excepted)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged in may be overridden: that is YAML's own rule
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the safe loader's own error names it
            if first is not None:
                raise DuplicateKeyError(
                    f"line {line}: key {key!r} appears twice in one mapping (first on line {first})"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A pipeline file's YAML, refusing duplicate keys.

    :param path: the file.
    :raises SpecError: naming the file, and the line for a syntax error or a duplicate key.
    """
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except DuplicateKeyError as exc:
        raise SpecError(f"{path}: {exc}: each key once (YAML would keep only the last value)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: not a readable YAML file: {exc}") from exc


def load_spec(path: Path) -> PipelineSpec:
    """Read and validate one pipeline file (``.yaml`` or ``.yml``).

    :param path: the YAML file.
    :raises SpecError: naming the file and the field that broke a rule.
    """
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a pipeline file must be a YAML mapping, got {type(raw).__name__}")
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{path}: {'; '.join(_problem(err) for err in exc.errors())}") from None
    if spec.name != path.stem:
        raise SpecError(f"{path}: field 'name': {spec.name!r} must match the file name {path.stem!r}")
    suite = settings.expectations_dir() / f"{spec.suite_name}.json"
    if not suite.is_file():
        raise SpecError(
            f"{path}: field 'expectations': the expectation suite {suite} does not exist "
            f"(the suite is include/expectations/<expectations, or the pipeline's name>.json)"
        )
    spec._source = path
    return spec


def pipeline_files(folder: Path) -> list[Path]:
    """The pipeline files of a folder: ``*.yaml`` and ``*.yml``, hidden files left out, sorted.

    :param folder: the pipelines folder.
    """
    return sorted(p for p in folder.glob("*") if p.suffix in PIPELINE_SUFFIXES and not p.name.startswith("."))


def load_specs(folder: Path) -> tuple[dict[str, PipelineSpec], dict[Path, SpecError]]:
    """Load every pipeline file in a folder; a bad file does not stop the others.

    Checked across files: one pipeline per name (``x.yml`` beside ``x.yaml`` is refused), and one
    pipeline per endpoint name and local port (:func:`endpoint_conflicts`).

    :param folder: the pipelines folder.
    :return: the valid specs by name, and the error of every invalid file.
    """
    specs: dict[str, PipelineSpec] = {}
    errors: dict[Path, SpecError] = {}
    seen: dict[str, Path] = {}
    for path in pipeline_files(folder):
        if path.stem in seen:  # sorted: x.yaml comes before x.yml
            errors[path] = SpecError(
                f"{path}: pipeline {path.stem!r} is already {seen[path.stem]}: one file per pipeline"
            )
            continue
        seen[path.stem] = path
        try:
            specs[path.stem] = load_spec(path)
        except SpecError as exc:
            errors[path] = exc
        except Exception as exc:  # e.g. RecursionError on absurdly nested YAML: still this file's error only
            errors[path] = SpecError(f"{path}: not a readable pipeline file: {type(exc).__name__}: {exc}")
    for name, problems in endpoint_conflicts(specs).items():
        spec = specs.pop(name)
        errors[spec.source or folder / f"{name}.yaml"] = SpecError(f"{spec.source}: {'; '.join(problems)}")
    return specs, dict(sorted(errors.items()))


def _endpoint(spec: PipelineSpec) -> str:
    return spec.deploy.endpoint.name or spec.name


def endpoint_conflicts(specs: dict[str, PipelineSpec]) -> dict[str, list[str]]:
    """Pipelines that claim another's endpoint name or local port, with why (naming the other files).

    Only enabled endpoints claim. An endpoint name shared by pipelines belongs to the pipeline named
    like it (a copy of ``churn`` that kept ``name: churn`` is refused, churn keeps it); without such
    an owner, every claimant is refused. A local port shared by the pipelines still standing refuses
    all of them: Conveyor cannot tell which one was meant.

    :param specs: the valid specs by name.
    :return: the refused pipelines by name, each with its problems (``field '...': ...``).
    """
    refused: dict[str, list[str]] = {}
    names: dict[tuple[str, str, str], list[PipelineSpec]] = {}
    for spec in specs.values():
        if spec.deploy.endpoint.enabled:
            prefix = spec.sagemaker.name_prefix if spec.compute == "sagemaker" else ""
            names.setdefault((spec.compute, prefix, _endpoint(spec)), []).append(spec)
    for (_compute, _prefix, endpoint), claimants in names.items():
        owners = [s for s in claimants if s.name == endpoint]
        for spec in claimants if len(claimants) > 1 else []:
            if spec in owners:
                continue
            others = ", ".join(str(o.source) for o in claimants if o is not spec)
            why = f"pipeline {endpoint}'s own" if owners else "claimed by more than one pipeline"
            refused.setdefault(spec.name, []).append(
                f"field 'deploy.endpoint.name': endpoint {endpoint!r} is {why} (also in {others}); "
                "give this pipeline's endpoint a name of its own"
            )
    ports: dict[int, list[PipelineSpec]] = {}
    for spec in specs.values():
        if spec.deploy.endpoint.enabled and spec.compute == "local" and spec.name not in refused:
            ports.setdefault(spec.deploy.endpoint.port, []).append(spec)
    for port, claimants in ports.items():
        for spec in claimants if len(claimants) > 1 else []:
            others = ", ".join(str(o.source) for o in claimants if o is not spec)
            refused.setdefault(spec.name, []).append(
                f"field 'deploy.endpoint.port': port {port} is also the endpoint port of {others}; "
                "each endpoint needs a port of its own"
            )
    return refused


def get_spec(name: str) -> PipelineSpec:
    """The spec of one pipeline by name, read from its ``<name>.yaml`` (or ``<name>.yml``) file.

    :param name: the pipeline.
    :raises SpecError: when neither file exists, or the file breaks a rule.
    """
    folder = settings.pipelines_dir()
    for suffix in PIPELINE_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return load_spec(folder / f"{name}{suffix}")
    raise SpecError(f"no pipeline {name!r}: neither {folder / name}.yaml nor .yml exists")
