"""Build every pipeline's DAG family from its YAML file. Cheap: no heavy imports here.

The pipeline files are read here, once per parse; every operator receives the validated spec
(``spec``) it needs, so a task never reads the YAML again at run time.
"""

from __future__ import annotations

from pathlib import Path

from airflow.sdk import DAG

from conveyor import settings
from conveyor.errors import SpecError
from conveyor.factory.common import START, monitored
from conveyor.factory.ingest import ingest_dag
from conveyor.factory.monitor import monitor_dag
from conveyor.factory.serve import batch_dag, deploy_dag
from conveyor.factory.train import train_dag
from conveyor.spec import PipelineSpec, load_specs

__all__ = ["build_all", "build_for", "InvalidPipelinesDag"]


def build_for(spec: PipelineSpec) -> list[DAG]:
    """The DAG family of one pipeline: what its spec turns on."""
    dags = [ingest_dag(spec), train_dag(spec)]
    if spec.deploy.endpoint.enabled:
        dags.append(deploy_dag(spec))
    if spec.deploy.batch.enabled:
        dags.append(batch_dag(spec))
    if monitored(spec):
        dags.append(monitor_dag(spec))
    return dags


class InvalidPipelinesDag(DAG):
    """Carries the errors of invalid pipeline files into Airflow's import errors.

    The DAG processor validates every DAG before it keeps it; this one fails that check with the
    files' errors, so they show under *Import errors* while every valid pipeline still loads.
    """

    def __init__(self, errors: dict[Path, SpecError]):
        super().__init__(dag_id="conveyor__invalid_pipelines", schedule=None, start_date=START)
        self.spec_errors = [str(err) for err in errors.values()]

    def validate(self) -> None:
        raise SpecError("invalid pipeline file(s): " + " | ".join(self.spec_errors))


def build_all(folder: Path | None = None) -> dict[str, DAG]:
    """Every DAG of every valid pipeline in the folder, by dag_id; invalid files become one error.

    :param folder: the pipelines folder (``include/pipelines`` by default).
    """
    specs, errors = load_specs(folder or settings.pipelines_dir())
    dags: dict[str, DAG] = {}
    for spec in specs.values():
        for dag in build_for(spec):
            dags[dag.dag_id] = dag
    if errors:
        dags["conveyor__invalid_pipelines"] = InvalidPipelinesDag(errors)
    return dags
