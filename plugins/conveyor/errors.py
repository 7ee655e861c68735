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
