"""What every SageMaker step shares: AWS errors, S3 URIs, resource names and the serving images.

AWS errors: an expired or invalid credential becomes :class:`AwsCredentialsExpired` (a
``TransientError``, retried: the connection may be refreshed by then), a missing IAM permission
:class:`AwsPermissionDenied` (deterministic, not retried), both naming the connection and the API
call. Other botocore errors pass through unchanged.

Default serving images (``sagemaker.inference_image_uri`` overrides them), in the AWS Deep Learning
Containers registry ``763104351884.dkr.ecr.<region>.amazonaws.com``:

| trainer | inference |
|---|---|
| ``autogluon`` | ``autogluon:1.6.3-cpu-amzn2023`` |
| ``resnet`` | ``pytorch-inference:2.9.0-cpu-py312-ubuntu22.04-sagemaker`` |
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from conveyor.errors import ConveyorError, TransientError

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

DLC_REGISTRY = "763104351884.dkr.ecr.{region}.amazonaws.com"
INFERENCE_IMAGES = {
    "autogluon": "autogluon:1.6.3-cpu-amzn2023",
    "resnet": "pytorch-inference:2.9.0-cpu-py312-ubuntu22.04-sagemaker",
}
CONTENT_TYPES = {
    "autogluon": ["text/csv", "application/json"],
    "resnet": ["image/jpeg", "image/png", "application/x-image", "application/json"],
}
RESPONSE_TYPES = ["application/json", "text/csv"]

_CREDENTIAL_ERRORS = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
    }
)
_PERMISSION_ERRORS = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"})


class AwsCredentialsExpired(TransientError):
    """The AWS connection's credentials expired or were refused (transient: the task is retried)."""


class AwsPermissionDenied(ConveyorError):
    """The role behind the AWS connection lacks an IAM permission (deterministic: not retried)."""


class NotOnS3(ConveyorError):
    """A location SageMaker must read or write is not on S3 (the lake must be on S3)."""


def error_code(exc: Exception) -> str:
    """The AWS error code of a botocore ``ClientError`` ('' for anything else).

    :param exc: the exception.
    """
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Code") or "")


def error_message(exc: Exception) -> str:
    """The AWS error message of a botocore ``ClientError`` (``str(exc)`` for anything else).

    :param exc: the exception.
    """
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Message") or exc)


@contextlib.contextmanager
def aws_errors(action: str, conn_id: str | None) -> Iterator[None]:
    """Turn credential and permission errors of AWS calls into Conveyor's clear errors.

    :param action: the API call(s) made inside, e.g. ``sagemaker:CreateTrainingJob``.
    :param conn_id: the Airflow connection the calls use.
    :raises AwsCredentialsExpired: the credentials expired or were refused.
    :raises AwsPermissionDenied: the role may not make the call.
    """
    from botocore.exceptions import ClientError, NoCredentialsError, TokenRetrievalError

    try:
        yield
    except ClientError as exc:
        code = error_code(exc)
        if code in _CREDENTIAL_ERRORS:
            raise AwsCredentialsExpired(
                f"{action}: the credentials of AWS connection {conn_id!r} were refused ({code}: "
                f"{error_message(exc)}); refresh them (the task is retried)"
            ) from exc
        if code in _PERMISSION_ERRORS:
            raise AwsPermissionDenied(
                f"{action}: the role of AWS connection {conn_id!r} lacks the permission ({code}: "
                f"{error_message(exc)}); see docs/aws.md for the IAM policy each step needs"
            ) from exc
        raise
    except (NoCredentialsError, TokenRetrievalError) as exc:
        raise AwsCredentialsExpired(f"{action}: AWS connection {conn_id!r} has no usable credentials: {exc}") from exc


def plain_s3_uri(location: str | ObjectStoragePath) -> str:
    """``s3://bucket/key`` for an S3 ``ObjectStoragePath`` or URI (whose text may carry ``conn@``).

    :param location: an S3 path of the lake or an ``s3://`` URI.
    :raises NotOnS3: the location is not on S3 (SageMaker reads and writes only S3).
    """
    if not isinstance(location, str):
        if location.protocol not in ("s3", "s3a"):
            raise NotOnS3(f"{location}: SageMaker needs the lake on S3 (CONVEYOR_LAKE_URI=s3://...)")
        return "s3://" + location.path
    match = re.match(r"^s3a?://(?:[^@/]+@)?(.+)$", location)
    if not match:
        raise NotOnS3(f"{location}: SageMaker needs an s3:// location (the lake must be on S3)")
    return "s3://" + match.group(1)


def sagemaker_name(text: str, limit: int) -> str:
    """A SageMaker resource name part: letters, digits and '-', at most ``limit`` characters.

    :param text: e.g. a pipeline name (``_`` becomes ``-``).
    :param limit: the longest result.
    """
    return re.sub(r"-+", "-", re.sub(r"[^a-zA-Z0-9-]", "-", text))[:limit].strip("-") or "conveyor"


def model_package_group(pipeline: str, prefix: str = "") -> str:
    """The model package group of a pipeline: ``<prefix><pipeline with '-' for '_'>``.

    :param pipeline: the pipeline's name.
    :param prefix: ``sagemaker.name_prefix``.
    """
    return sagemaker_name(f"{prefix}{pipeline}", 63)


def inference_image(kind: str, region: str, override: str | None = None) -> str:
    """The serving container of a trainer's models: the override, else the AWS framework image.

    :param kind: the trainer (``autogluon`` or ``resnet``).
    :param region: the AWS region of the endpoint or transform job.
    :param override: ``sagemaker.inference_image_uri``.
    """
    return override or f"{DLC_REGISTRY.format(region=region)}/{INFERENCE_IMAGES[kind]}"
