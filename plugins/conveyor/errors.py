"""Conveyor's own errors: each says what failed, on which input, and where the report is.

Domain code raises these and never Airflow's exceptions; the operators decide the retry policy
(``conveyor.operators.base.airflow_errors``): a ``ConveyorError`` is deterministic (the same input
fails the same way, so the task fails at once), a ``TransientError`` may pass on a retry (network,
storage 5xx, a process killed from outside) and propagates so the task's retries apply.
"""

from __future__ import annotations

from typing import ClassVar


class ConveyorError(Exception):
    """Base of Conveyor's own errors: deterministic, not worth a retry."""

    retryable: ClassVar[bool] = False


class TransientError(ConveyorError):
    """A failure that may pass on a retry (network, storage 5xx, a process killed from outside)."""

    retryable = True


class SpecError(ConveyorError):
    """A pipeline file broke a rule of the spec model (names the file and the field)."""


class DropRejected(ConveyorError):
    """A drop could not be read as the spec says (names the file and the rule); not retried."""


class ValidationFailed(ConveyorError):
    """A dataset failed its expectation suite; lists the failing expectations and the report."""

    def __init__(self, dataset: str, failures: list[str], report_uri: str, limit: int = 10):
        self.failures = failures
        self.report_uri = report_uri
        shown = "\n".join(f"  - {item}" for item in failures[:limit])
        more = f"\n  ... and {len(failures) - limit} more" if len(failures) > limit else ""
        super().__init__(
            f"{dataset} failed validation: {len(failures)} expectation(s) failed\n{shown}{more}\nreport: {report_uri}"
        )


class IntegrityError(ConveyorError):
    """A model archive is not the one the registry recorded: its sha256 differs, or none was recorded.

    Names the model, the version, the archive, the expected and the actual sha256; never retried.

    :param model: the registered model.
    :param version: its version.
    :param source: the archive's URI.
    :param expected: the sha256 the registry recorded (None: none was, a version registered before hashes).
    :param actual: the sha256 of the bytes read.
    :param hint: what to do about it (appended to the message).
    """

    def __init__(self, model: str, version: str, source: str, expected: str | None, actual: str, hint: str = ""):
        self.model, self.version, self.source = model, version, source
        self.expected, self.actual = expected, actual
        if expected is None:
            what = f"the registry recorded no sha256 for it (registered before hashes were); its sha256 is {actual}"
        else:
            what = f"its sha256 is {actual}, the registry recorded {expected}"
        super().__init__(f"{model} version {version}: archive {source} refused, not loaded: {what}{hint}")
