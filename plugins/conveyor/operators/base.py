"""What every Conveyor operator shares: the spec it was built with, and the retry policy of errors.

Operators receive the validated pipeline spec from the DAG factory (``spec``: the JSON dict of
``PipelineSpec``, wrapped in ``literal()`` so Jinja leaves its strings alone, listed in
``template_fields`` so it shows in the task's Rendered Template); no task reads the pipeline file at
run time. Domain errors are
translated here, once: a deterministic ``ConveyorError`` becomes ``AirflowFailException`` (the task
fails now, no retry); a ``TransientError`` or any other exception propagates so retries apply.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from airflow.sdk.exceptions import AirflowFailException

from conveyor.errors import ConveyorError
from conveyor.links import RAN_HERE

if TYPE_CHECKING:
    from conveyor.spec import PipelineSpec

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def airflow_errors() -> Iterator[None]:
    """Translate Conveyor's deterministic errors into ``AirflowFailException`` (cause kept)."""
    try:
        yield
    except ConveyorError as exc:
        if exc.retryable:
            raise
        raise AirflowFailException(str(exc)) from exc


def translate_errors(method: F) -> F:
    """Decorate ``execute``/``execute_complete``/``poke`` with :func:`airflow_errors`."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if args:  # the operator: its report links then know this process ran it (conveyor.links)
            with contextlib.suppress(AttributeError, TypeError):
                object.__setattr__(args[0], RAN_HERE, True)
        with airflow_errors():
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def pipeline_spec(spec: PipelineSpec | dict[str, Any]) -> PipelineSpec:
    """The validated spec an operator was built with (a dict after DAG serialisation).

    :param spec: the spec as the factory passed it (``PipelineSpec.model_dump(mode="json")``) or a model.
    """
    from conveyor.spec import PipelineSpec

    spec = getattr(spec, "value", spec)  # an unrendered ``literal(...)`` (an operator run outside a DAG run)
    if isinstance(spec, PipelineSpec):
        return spec
    return PipelineSpec.model_validate(spec)


def first_try(context: Any) -> bool:
    """Whether this is the task instance's first try of its run (Airflow numbers tries from 1; a retry or a
    cleared task runs as a later one, a resumed deferral keeps its number): nothing an earlier try of this task
    would have written or started can exist. False when the context has no task instance (a test calling
    ``execute`` directly), so the callers then look for what an earlier try left.

    :param context: the task context.
    """
    return getattr(context.get("ti"), "try_number", None) == 1
