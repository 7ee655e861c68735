"""SageMaker Model Registry, as Conveyor uses it (``registry: sagemaker``).

One model package group per pipeline (``<sagemaker.name_prefix><pipeline>``, ``_`` as ``-``;
created on first use, reused when it exists). One model package per registered version: its
inference container (the trainer's serving image and our ``model.tar.gz`` on S3, the content types
the inference handlers accept), the test metrics (``ModelMetrics`` points at the evaluation's
``metrics.json``; ``CustomerMetadataProperties`` holds them as ``test_<metric>`` next to
``conveyor_run_id``, ``dataset_version``, ``code_version``, ``mlflow_run_id``, ``model_sha256``...). Its approval
status is the package's ``ModelApprovalStatus`` (``PendingManualApproval`` -> ``Approved`` /
``Rejected``); the champion is the latest ``Approved`` package of the group. The version live on
an endpoint is a tag of the group (``conveyor:live_on:<endpoint>``) and ``live_on`` in the
package's metadata.

A registration is found again by the key in its description (``[registration <run_id>]``), so a
retry returns the package it created before. An update names only what it changes (SageMaker keeps
the rest; the tests' moto is made to, ``tests/sagemaker_emulator.py``): a status alone, or the
package's whole metadata (UpdateModelPackage may replace the map it is given). Calls go through the
Amazon provider's ``SageMakerHook`` (its ``conn`` is the boto3 client):
``SageMakerRegisterModelVersionOperator`` hard-codes ``text/csv`` and nothing in the provider changes
an approval status.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from conveyor.aws.common import (
    CONTENT_TYPES,
    RESPONSE_TYPES,
    aws_errors,
    error_code,
    inference_image,
    model_package_group,
    plain_s3_uri,
)
from conveyor.registry.base import (
    APPROVED,
    CHAMPION,
    PENDING,
    RUN_TAG,
    SHA256_TAG,
    STATUS_TAG,
    ModelVersionNotFound,
    check_retry,
    check_status,
    registered_sha256,
)

if TYPE_CHECKING:
    from conveyor.spec import PipelineSpec

LATEST = "latest"
LIVE_ON = "live_on"
LIVE_TAG = "conveyor:live_on:{endpoint}"
METADATA_MAX_ENTRIES = 50
METADATA_VALUE_MAX = 256
_TAG_UNSAFE = re.compile(r"[^\w.:/=+\-@ ]")
# arn:<partition>:sagemaker:<region>:<account>:model-package/<group>/<version>: its group's ARN follows from it
_PACKAGE_ARN = re.compile(r"^(arn:[^:]+:sagemaker:[^:]*:[^:]*:)model-package/([^/]+)/(\d+)$")


@dataclass(frozen=True)
class RegisteredVersion:
    """One model package, shaped like an MLflow model version.

    :param name: the registered model (the pipeline).
    :param version: the package's version number, as text.
    :param source: the ``s3://`` URI of its ``model.tar.gz``.
    :param tags: its metadata, with ``approval_status`` (the package's status) added.
    :param run_id: the MLflow run that judged it (its registration key).
    :param arn: the model package's ARN (a SageMaker model can be created from it).
    :param group: the model package group.
    """

    name: str
    version: str
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    arn: str = ""
    group: str = ""

    @property
    def status(self) -> str:
        return self.tags.get(STATUS_TAG, "")


class SageMakerRegistryHook(BaseHook):
    """Talks to the SageMaker Model Registry; keeps no per-run state.

    :param aws_conn_id: the Airflow AWS connection.
    :param region_name: the region (the connection's when None).
    :param trainer: the pipeline's trainer (picks the serving image and content types).
    :param inference_image_uri: the serving image (the trainer's AWS image when None).
    :param name_prefix: prefix of model package group names.
    :param realtime_instance_types: instance types the package declares for endpoints.
    """

    def __init__(
        self,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        trainer: str = "autogluon",
        inference_image_uri: str | None = None,
        name_prefix: str = "",
        realtime_instance_types: list[str] | None = None,
    ):
        super().__init__()
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.trainer = trainer
        self.inference_image_uri = inference_image_uri
        self.name_prefix = name_prefix
        self.realtime_instance_types = list(realtime_instance_types or [])
        # What this hook learnt from SageMaker (one hook lives for one task step): group ARNs, package ARNs by
        # (model, version), DescribeModelPackage answers by ARN (kept in step with this hook's own updates)
        # and group tags. Saves the describe-before-update and list-before-describe round trips.
        self._group_arns: dict[str, str] = {}
        self._package_arns: dict[tuple[str, int], str] = {}
        self._packages: dict[str, dict[str, Any]] = {}
        self._tags: dict[str, dict[str, str]] = {}

    @classmethod
    def for_spec(cls, spec: PipelineSpec) -> SageMakerRegistryHook:
        """The hook of a pipeline's ``sagemaker`` settings.

        :param spec: the pipeline.
        """
        settings = spec.sagemaker
        return cls(
            aws_conn_id=settings.aws_conn_id,
            region_name=settings.region,
            trainer=spec.trainer.kind,
            inference_image_uri=settings.inference_image_uri,
            name_prefix=settings.name_prefix,
            realtime_instance_types=[spec.deploy.endpoint.instance_type],
        )

    @cached_property
    def hook(self) -> Any:
        """The provider's ``SageMakerHook``."""
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        return SageMakerHook(aws_conn_id=self.aws_conn_id, region_name=self.region_name)

    def _call(self, action: str, **kwargs: Any) -> Any:
        with aws_errors(f"sagemaker:{action}", self.aws_conn_id):
            method = re.sub(r"(?<!^)(?=[A-Z])", "_", action).lower()
            return getattr(self.hook.conn, method)(**kwargs)

    # ---------------------------------------------------------------------------------- groups

    def group(self, model_name: str) -> str:
        """The model package group of a registered model (pipeline)."""
        return model_package_group(model_name, self.name_prefix)

    def group_arn(self, model_name: str) -> str | None:
        """The ARN of a model's group, or None when it does not exist yet."""
        from botocore.exceptions import ClientError

        if model_name in self._group_arns:
            return self._group_arns[model_name]
        try:
            found = self._call("DescribeModelPackageGroup", ModelPackageGroupName=self.group(model_name))
        except ClientError as exc:
            if error_code(exc) == "ValidationException":  # what SageMaker answers for an unknown group
                return None
            raise
        self._group_arns[model_name] = found["ModelPackageGroupArn"]
        return found["ModelPackageGroupArn"]

    def ensure_group(self, model_name: str) -> str:
        """The ARN of a model's group, created if missing ("already exists": reused)."""
        from botocore.exceptions import ClientError

        arn = self.group_arn(model_name)
        if arn is not None:
            return arn
        name = self.group(model_name)
        description = f"Conveyor pipeline {model_name}: registered model versions"
        try:
            created = self._call(
                "CreateModelPackageGroup", ModelPackageGroupName=name, ModelPackageGroupDescription=description
            )
        except ClientError as exc:  # created meanwhile by a concurrent task: reused (the provider's rule)
            if error_code(exc) != "ValidationException" or "already exists" not in str(exc):
                raise
            return self.group_arn(model_name) or ""
        self.log.info("Created model package group %s", name)
        self._group_arns[model_name] = created["ModelPackageGroupArn"]
        return created["ModelPackageGroupArn"]

    # -------------------------------------------------------------------------------- packages

    def _learn(self, model_name: str, version: Any, arn: str) -> None:
        """Keep a package's ARN, and its group's ARN (the same prefix and group name, so no describe asks it)."""
        if str(version).isdigit():
            self._package_arns[(model_name, int(version))] = arn
        matched = _PACKAGE_ARN.match(arn)
        if matched and matched.group(2).lower() == self.group(model_name).lower():
            self._group_arns.setdefault(model_name, f"{matched.group(1)}model-package-group/{matched.group(2)}")

    def remember(self, entry: dict[str, Any]) -> None:
        """Take a version's ARN from an earlier task's result (``model_name``, ``version``, ``arn``):
        ARNs never change, so the version is not listed again to find it (``RegistryHook.remember``).

        Only an ARN of this model's group that ends in that version number is taken; anything else is
        left for a listing to find.
        """
        name, arn = str(entry.get("model_name") or ""), str(entry.get("arn") or "")
        matched = _PACKAGE_ARN.match(arn)
        if (
            name
            and matched
            and matched.group(2).lower() == self.group(name).lower()
            and str(entry.get("version")) == matched.group(3)
        ):
            self._learn(name, matched.group(3), arn)

    def _summaries(self, model_name: str, status: str | None = None) -> Iterator[dict[str, Any]]:
        """The group's package summaries, newest first."""
        kwargs: dict[str, Any] = {
            "ModelPackageGroupName": self.group(model_name),
            "SortBy": "CreationTime",
            "SortOrder": "Descending",
            "MaxResults": 100,
        }
        if status:
            kwargs["ModelApprovalStatus"] = status
        while True:
            page = self._call("ListModelPackages", **kwargs)
            for summary in page.get("ModelPackageSummaryList") or []:
                if summary.get("ModelPackageVersion") and summary.get("ModelPackageArn"):
                    self._learn(model_name, summary["ModelPackageVersion"], summary["ModelPackageArn"])
                yield summary
            if not page.get("NextToken"):
                return
            kwargs["NextToken"] = page["NextToken"]

    def _describe(self, model_name: str, arn: str) -> RegisteredVersion:
        found = self._call("DescribeModelPackage", ModelPackageName=arn)
        self._packages[arn] = found
        self._learn(model_name, found["ModelPackageVersion"], arn)
        return self._version_of(model_name, found)

    def _version_of(self, model_name: str, found: dict[str, Any]) -> RegisteredVersion:
        """A ``RegisteredVersion`` from a DescribeModelPackage answer (or what this hook sent to create one)."""
        tags = {str(k): str(v) for k, v in (found.get("CustomerMetadataProperties") or {}).items()}
        tags[STATUS_TAG] = found.get("ModelApprovalStatus") or PENDING
        containers = (found.get("InferenceSpecification") or {}).get("Containers") or [{}]
        return RegisteredVersion(
            name=model_name,
            version=str(found["ModelPackageVersion"]),
            source=containers[0].get("ModelDataUrl", ""),
            tags=tags,
            run_id=tags.get("mlflow_run_id"),
            arn=found["ModelPackageArn"],
            group=found.get("ModelPackageGroupName") or self.group(model_name),
        )

    def _arn(self, model_name: str, version: str) -> str:
        wanted = int(version)
        if (model_name, wanted) in self._package_arns:
            return self._package_arns[(model_name, wanted)]
        for summary in self._summaries(model_name):
            if int(summary.get("ModelPackageVersion") or 0) == wanted:
                return summary["ModelPackageArn"]
        raise ModelVersionNotFound(
            f"model {model_name!r} (model package group {self.group(model_name)}) has no version {version}"
        )

    def find_version(self, model_name: str, run_id: str) -> RegisteredVersion | None:
        """The package a registration with this key created before, if any.

        :param model_name: the registered model (pipeline).
        :param run_id: the registration key (the MLflow run that judged the model).
        """
        key = _registration_key(run_id)
        for summary in self._summaries(model_name):
            if (summary.get("ModelPackageDescription") or "").endswith(key):
                return self._describe(model_name, summary["ModelPackageArn"])
        return None

    def register(
        self,
        model_name: str,
        source: str,
        run_id: str,
        tags: dict[str, str],
        metrics: dict[str, float] | None = None,
        metrics_uri: str | None = None,
        sha256: str | None = None,
        first_try: bool = False,
    ) -> RegisteredVersion:
        """A new model package (``PendingManualApproval``); a retry with the same key returns the same one.

        :param model_name: the registered model (pipeline).
        :param source: the ``model.tar.gz`` on S3 (an ``s3://`` URI, possibly ``s3://conn@bucket/...``).
        :param run_id: the registration key (the MLflow run that judged the model).
        :param tags: metadata (dataset_version, code_version, conveyor_run_id, ...).
        :param metrics: test metrics, stored as ``test_<metric>``.
        :param metrics_uri: the evaluation's ``metrics.json`` (``ModelMetrics``), on S3.
        :param sha256: the archive's sha256 (read from ``source`` through the lake's connection when None),
            recorded as the ``model_sha256`` metadata property; loaders refuse an archive that differs.
        :param first_try: the registering task's first try, so no earlier attempt made a package with this key:
            the group is not listed to find one (``CreateModelPackage``'s ``ClientToken``, derived from the
            key, still answers a repeat with the package it made).
        :raises ArchiveMissing: no archive at ``source``.
        :raises IntegrityError: a retry names an archive whose bytes differ from the package's record.
        """
        model_data_url = plain_s3_uri(source)  # refused before anything is written when not on S3
        metrics_s3 = plain_s3_uri(metrics_uri) if metrics_uri else None
        digest = registered_sha256(model_name, source, sha256)
        existing = None if first_try else self.find_version(model_name, run_id)
        if existing is not None:
            check_retry(model_name, existing, source, digest)
            self.log.info("%s version %s was registered by this run before: reused", model_name, existing.version)
            return existing
        self.ensure_group(model_name)
        group = self.group(model_name)
        metadata = _metadata({**tags, "mlflow_run_id": run_id, SHA256_TAG: digest}, metrics or {})
        airflow_run = tags.get(RUN_TAG, "")
        request: dict[str, Any] = {
            "ModelPackageGroupName": group,
            "ModelPackageDescription": f"{model_name} model of Airflow run {airflow_run} {_registration_key(run_id)}"[
                -1024:
            ],
            "InferenceSpecification": self.inference_specification(model_data_url),
            "ModelApprovalStatus": PENDING,
            "CustomerMetadataProperties": metadata,
            "MetadataProperties": {
                "GeneratedBy": f"conveyor run {airflow_run}"[:1024],
                "CommitId": str(tags.get("code_version", ""))[:1024] or "unknown",
                "ProjectId": model_name,
            },
            "ClientToken": hashlib.sha256(f"{group}\n{run_id}".encode()).hexdigest()[:36],
            "Tags": [
                {"Key": "conveyor:pipeline", "Value": model_name},
                {"Key": "conveyor:run_id", "Value": _TAG_UNSAFE.sub("_", airflow_run)[:256]},
            ],
        }
        if metrics_s3:
            request["ModelMetrics"] = {
                "ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": metrics_s3}}
            }
        created = self._call("CreateModelPackage", **request)
        version = self._created(model_name, created["ModelPackageArn"], request)
        self.log.info(
            "Registered %s version %s (%s) in model package group %s", model_name, version.version, version.arn, group
        )
        return version

    def _created(self, model_name: str, arn: str, request: dict[str, Any]) -> RegisteredVersion:
        """The version just created, from what was sent (its number is the ARN's last part); described when the
        ARN does not end in a number."""
        number = arn.rsplit("/", 1)[-1]
        if not number.isdigit():
            return self._describe(model_name, arn)
        found = {**request, "ModelPackageArn": arn, "ModelPackageVersion": int(number)}
        self._packages[arn] = found
        self._learn(model_name, number, arn)
        return self._version_of(model_name, found)

    def inference_specification(self, model_data_url: str) -> dict[str, Any]:
        """The package's serving container and what it accepts and answers.

        :param model_data_url: the ``s3://`` URI of ``model.tar.gz``.
        """
        specification: dict[str, Any] = {
            "Containers": [
                {
                    "Image": inference_image(self.trainer, self.hook.conn_region_name, self.inference_image_uri),
                    "ModelDataUrl": model_data_url,
                    "Environment": {
                        "SAGEMAKER_PROGRAM": "inference.py",
                        "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
                        "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
                    },
                }
            ],
            "SupportedContentTypes": list(CONTENT_TYPES[self.trainer]),
            "SupportedResponseMIMETypes": list(RESPONSE_TYPES),
        }
        if self.realtime_instance_types:
            specification["SupportedRealtimeInferenceInstanceTypes"] = list(self.realtime_instance_types)
        return specification

    def _update(
        self,
        arn: str,
        status: str | None = None,
        set_tags: dict[str, str] | None = None,
        remove: tuple[str, ...] = (),
        reason: str | None = None,
    ) -> None:
        """Update a package: a new status is sent alone, a metadata change with the package's whole metadata.

        SageMaker keeps what an update does not name, so a status change needs no describe first. The
        metadata map is sent whole (read first unless this hook knows it): UpdateModelPackage may
        replace the map it is given.
        """
        request: dict[str, Any] = {"ModelPackageArn": arn}
        if status:
            request["ModelApprovalStatus"] = status
        if reason:
            request["ApprovalDescription"] = reason[:1024]
        known = self._packages.get(arn)
        if set_tags or remove:
            current = known or self._call("DescribeModelPackage", ModelPackageName=arn)
            old = dict(current.get("CustomerMetadataProperties") or {})
            metadata = {**old, **{k: _value(v) for k, v in (set_tags or {}).items()}}
            for key in remove:
                metadata.pop(key, None)
            if metadata:
                request["CustomerMetadataProperties"] = metadata
            dropped = [key for key in remove if key in old]
            if dropped:
                request["CustomerMetadataPropertiesToRemove"] = dropped
            known = {**current, "CustomerMetadataProperties": metadata}
        self._call("UpdateModelPackage", **request)
        if known is not None:
            self._packages[arn] = {**known, **({"ModelApprovalStatus": status} if status else {})}

    def set_status(self, model_name: str, version: str, status: str) -> None:
        """Set a version's approval status.

        :param model_name: the registered model (pipeline).
        :param version: the version number.
        :param status: ``PendingManualApproval``, ``Approved`` or ``Rejected``.
        """
        check_status(status)
        self._update(self._arn(model_name, version), status=status, reason=f"{status} by Conveyor")

    def promote(self, model_name: str, version: str, newest: bool = False) -> None:
        """Approve a version: the latest ``Approved`` package is the champion.

        :param model_name: the registered model (pipeline).
        :param version: the version number.
        :param newest: the caller knows no newer version is approved (the automatic approval of the version its
            run just registered: a pipeline's train runs never overlap), so none is listed to warn that it stays
            champion.
        """
        self.set_status(model_name, version, APPROVED)
        if newest:
            return
        approved = [int(summary.get("ModelPackageVersion") or 0) for summary in self._summaries(model_name, APPROVED)]
        latest = max(approved, default=int(version))
        if latest != int(version):
            self.log.warning(
                "%s version %s approved, but the newer approved version %s stays champion", model_name, version, latest
            )

    def set_version_tags(self, model_name: str, version: str, tags: dict[str, str]) -> None:
        """Add or replace metadata of a version (its approval status is kept)."""
        self._update(self._arn(model_name, version), set_tags=tags)

    def champion(self, model_name: str) -> RegisteredVersion | None:
        """The latest ``Approved`` version, or None when there is none yet."""
        approved = list(self._summaries(model_name, status=APPROVED))
        if not approved:
            return None
        latest = max(approved, key=lambda summary: int(summary.get("ModelPackageVersion") or 0))
        return self._describe(model_name, latest["ModelPackageArn"])

    def version(self, model_name: str, version: str) -> RegisteredVersion:
        """One version by number.

        :raises ModelVersionNotFound: there is no such version.
        """
        return self._describe(model_name, self._arn(model_name, version))

    def resolve(self, model_name: str, version_or_alias: str) -> RegisteredVersion:
        """A version by number, or by alias: ``champion`` (latest approved) or ``latest`` (newest).

        :raises ModelVersionNotFound: no such version, or the alias names none yet.
        """
        wanted = str(version_or_alias).strip()
        if wanted.isdigit():
            return self.version(model_name, wanted)
        found = None
        if wanted == CHAMPION:
            found = self.champion(model_name)
        elif wanted == LATEST:
            newest = next(iter(self._summaries(model_name)), None)
            found = self._describe(model_name, newest["ModelPackageArn"]) if newest else None
        else:
            raise ModelVersionNotFound(
                f"model {model_name!r}: unknown alias {wanted!r} (use a version number, {CHAMPION!r} or {LATEST!r})"
            )
        if found is None:
            raise ModelVersionNotFound(
                f"model {model_name!r} (model package group {self.group(model_name)}) has no {wanted} version yet"
            )
        return found

    # ------------------------------------------------------------------------------ deployment

    def _group_tags(self, group_arn: str) -> dict[str, str]:
        if group_arn in self._tags:
            return self._tags[group_arn]
        tags: dict[str, str] = {}
        kwargs: dict[str, Any] = {"ResourceArn": group_arn}
        while True:
            page = self._call("ListTags", **kwargs)
            tags.update({tag["Key"]: tag["Value"] for tag in page.get("Tags") or []})
            if not page.get("NextToken"):
                self._tags[group_arn] = tags
                return tags
            kwargs["NextToken"] = page["NextToken"]

    def live_version(self, model_name: str, endpoint: str) -> str | None:
        """The version recorded as live on an endpoint."""
        group_arn = self.group_arn(model_name)
        if group_arn is None:
            return None
        return self._group_tags(group_arn).get(LIVE_TAG.format(endpoint=endpoint))

    def record_deployment(self, model_name: str, version: str, endpoint: str) -> str | None:
        """Record which version is live on an endpoint; returns the version it replaced.

        The group's tag ``conveyor:live_on:<endpoint>`` names the version; the version's metadata
        gets ``live_on`` and the one it replaced loses it.
        """
        group_arn = self.ensure_group(model_name)
        key = LIVE_TAG.format(endpoint=endpoint)
        previous = self._group_tags(group_arn).get(key)
        if previous and previous != str(version):
            try:
                self._update(self._arn(model_name, previous), remove=(LIVE_ON,))
            except ModelVersionNotFound:
                self.log.warning("%s version %s, live before, is no longer registered", model_name, previous)
        self._update(self._arn(model_name, version), set_tags={LIVE_ON: endpoint})
        if previous is not None:  # add_tags replaces a key on AWS but appends on moto: delete it first on both
            self._call("DeleteTags", ResourceArn=group_arn, TagKeys=[key])
        self._call("AddTags", ResourceArn=group_arn, Tags=[{"Key": key, "Value": str(version)}])
        self._tags.setdefault(group_arn, {})[key] = str(version)
        return previous


def _registration_key(run_id: str) -> str:
    return f"[registration {run_id}]"


def _value(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.6g}"
    return str(value)[:METADATA_VALUE_MAX] or "-"


def _metadata(tags: dict[str, Any], metrics: dict[str, Any]) -> dict[str, str]:
    """CustomerMetadataProperties: the tags, then as many ``test_<metric>`` as fit (50 entries)."""
    metadata = {str(k)[:128]: _value(v) for k, v in tags.items() if v is not None and k != STATUS_TAG}
    for name, value in sorted(metrics.items()):
        if len(metadata) >= METADATA_MAX_ENTRIES:
            break
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metadata[f"test_{name}"[:128]] = _value(float(value))
    return metadata
