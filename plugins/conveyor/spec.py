"""The pipeline YAML model: one file in ``include/pipelines/`` declares one ML use case.

Every field a later capability needs is declared here, so the file format is designed once.
Unknown keys are refused, so a typo'd field is an error naming the file and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from conveyor import settings
from conveyor.errors import SpecError

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

ProblemType = Literal["binary", "multiclass", "regression", "image_classification"]


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
    time_limit: int = Field(300, ge=0)
    presets: str = "medium_quality"
    eval_metric: str | None = None
    excluded_model_types: list[str] = ["NN_TORCH", "FASTAI"]
    hyperparameters: dict[str, Any] = {}
    gpu: bool = False
    refit_full: bool = False
    infer_limit: float | None = None
    # ResNet only: a local file or URI of pretrained weights; never downloaded.
    pretrained_weights: str | None = None


class RetrainSpec(_Strict):
    schedule: str | None = None
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


class BatchSpec(_Strict):
    enabled: bool = False
    schedule: str | None = None
    input: str | None = None
    table: str | None = None
    chunk_rows: int = Field(50_000, ge=1)
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


class MonitorSpec(_Strict):
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
        return self

    @property
    def suite_name(self) -> str:
        """The expectation suite's name (``include/expectations/<suite_name>.json``)."""
        return self.expectations or self.name


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<root>"


def load_spec(path: Path) -> PipelineSpec:
    """Read and validate one pipeline file.

    :param path: the YAML file.
    :raises SpecError: naming the file and the field that broke a rule.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: not a readable YAML file: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a pipeline file must be a YAML mapping, got {type(raw).__name__}")
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"field '{_field_path(err['loc'])}': {err['msg']}" for err in exc.errors())
        raise SpecError(f"{path}: {problems}") from None
    if spec.name != path.stem:
        raise SpecError(f"{path}: field 'name': {spec.name!r} must match the file name {path.stem!r}")
    return spec


def load_specs(folder: Path) -> tuple[dict[str, PipelineSpec], dict[Path, SpecError]]:
    """Load every ``*.yaml`` pipeline in a folder; a bad file does not stop the others.

    :param folder: the pipelines folder.
    :return: the valid specs by name, and the error of every invalid file.
    """
    specs: dict[str, PipelineSpec] = {}
    errors: dict[Path, SpecError] = {}
    for path in sorted(folder.glob("*.y*ml")):
        try:
            specs[path.stem] = load_spec(path)
        except SpecError as exc:
            errors[path] = exc
    return specs, errors


def get_spec(name: str) -> PipelineSpec:
    """The spec of one pipeline by name, read from the pipelines folder."""
    return load_spec(settings.pipelines_dir() / f"{name}.yaml")
