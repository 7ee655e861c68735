"""Domain errors: each says what failed, on which input, and where the report is."""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowFailException


class ConveyorError(Exception):
    """Base of Conveyor's own errors."""


class SpecError(ConveyorError):
    """A pipeline file broke a rule of the spec model (names the file and the field)."""


class DropRejected(AirflowFailException):
    """A drop could not be read as the spec says (names the file and the rule); not retried."""


class ValidationFailed(AirflowFailException):
    """A dataset failed its expectation suite; lists the failing expectations and the report."""

    def __init__(self, dataset: str, failures: list[str], report_uri: str, limit: int = 10):
        self.failures = failures
        self.report_uri = report_uri
        shown = "\n".join(f"  - {item}" for item in failures[:limit])
        more = f"\n  ... and {len(failures) - limit} more" if len(failures) > limit else ""
        super().__init__(
            f"{dataset} failed validation: {len(failures)} expectation(s) failed\n{shown}{more}\n"
            f"report: {report_uri}"
        )
