"""Build every pipeline's DAG family from its YAML file. Cheap: no heavy imports here.

The pipeline files are read here, once per parse; every operator receives the validated spec
(``spec``) it needs, so a task never reads the YAML again at run time.

One pipeline never takes the others down. Airflow records import errors per DAG *file* and marks
every DAG of a file with an import error stale (hidden, never scheduled), so the DAG file
``dags/conveyor_pipelines.py`` never raises: it holds the DAGs of every pipeline that built. The
errors (a spec rule, a clash with another pipeline, or any exception while building a pipeline's
DAGs) are raised by ``dags/conveyor_pipeline_errors.py``, a DAG file with no DAGs: one import error
naming each broken YAML file and field, hiding nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from airflow.sdk import DAG

from conveyor import settings
from conveyor.errors import SpecError
from conveyor.factory.common import monitored
from conveyor.factory.ingest import ingest_dag
from conveyor.factory.monitor import monitor_dag
from conveyor.factory.serve import batch_dag, deploy_dag
from conveyor.factory.train import train_dag
from conveyor.spec import PipelineSpec, load_specs

__all__ = ["Built", "build_all", "build_for", "build_pipelines", "raise_pipeline_errors"]


def family(spec: PipelineSpec) -> list[tuple[str, Callable[[PipelineSpec], DAG]]]:
    """The DAGs a spec turns on, as (kind, builder) pairs.

    :param spec: the pipeline.
    """
    kinds: list[tuple[str, Callable[[PipelineSpec], DAG]]] = [("ingest", ingest_dag), ("train", train_dag)]
    if spec.deploy.endpoint.enabled:
        kinds.append(("deploy", deploy_dag))
    if spec.deploy.batch.enabled:
        kinds.append(("batch_predict", batch_dag))
    if monitored(spec):
        kinds.append(("monitor", monitor_dag))
    return kinds


def build_for(spec: PipelineSpec) -> list[DAG]:
    """The DAG family of one pipeline: what its spec turns on, each DAG validated as the DagBag will.

    :param spec: the pipeline.
    :raises SpecError: naming the pipeline file and the DAG, when any DAG of the family fails to build.
    """
    dags = []
    for kind, build in family(spec):
        try:
            dag = build(spec)
            dag.validate()  # the DagBag's own check: a failure here would be an error of the whole file
        except Exception as exc:
            where = spec.source or f"pipeline {spec.name!r}"
            raise SpecError(
                f"{where}: DAG {spec.name}__{kind} could not be built: {type(exc).__name__}: {exc}"
            ) from exc
        dags.append(dag)
    return dags


class Built(NamedTuple):
    """Every DAG of every pipeline that built, by dag_id, and the error of every pipeline file that did not."""

    dags: dict[str, DAG]
    errors: dict[Path, SpecError]


def build_pipelines(folder: Path | None = None) -> Built:
    """Read every pipeline file and build each one's DAGs; a failing pipeline leaves the others whole.

    :param folder: the pipelines folder (``include/pipelines`` by default).
    """
    specs, errors = load_specs(folder or settings.pipelines_dir())
    dags: dict[str, DAG] = {}
    for spec in specs.values():
        try:
            family_dags = build_for(spec)
        except SpecError as exc:
            errors[spec.source or Path(spec.name)] = exc
            continue
        dags.update((dag.dag_id, dag) for dag in family_dags)
    return Built(dags, dict(sorted(errors.items())))


def build_all(folder: Path | None = None) -> dict[str, DAG]:
    """Every DAG of every pipeline that builds, by dag_id (``dags/conveyor_pipelines.py``).

    :param folder: the pipelines folder (``include/pipelines`` by default).
    """
    return build_pipelines(folder).dags


def raise_pipeline_errors(folder: Path | None = None) -> None:
    """Raise one error listing every pipeline file that failed (``dags/conveyor_pipeline_errors.py``).

    :param folder: the pipelines folder (``include/pipelines`` by default).
    :raises SpecError: naming each broken file and field; nothing when every pipeline builds.
    """
    errors = build_pipelines(folder).errors
    if errors:
        lines = "\n".join(f"- {err}" for err in errors.values())
        raise SpecError(
            f"{len(errors)} pipeline file(s) refused; their DAGs are not loaded, every other pipeline is:\n{lines}"
        )
