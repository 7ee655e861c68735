"""GPU routing: the train task of a pipeline that asks for a GPU goes to the GPU Celery queue."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor import settings
from conveyor.factory import train as factory
from conveyor.spec import PipelineSpec, load_spec

PROJECT = Path(__file__).resolve().parents[3]


def churn_with_gpu(gpu: bool) -> PipelineSpec:
    """The demo churn spec with ``trainer.gpu`` set.

    :param gpu: whether the trainer asks for a GPU.
    """
    spec = load_spec(PROJECT / "include" / "pipelines" / "churn.yaml")
    return spec.model_copy(update={"trainer": spec.trainer.model_copy(update={"gpu": gpu})})


def default_queue() -> str:
    from airflow.configuration import conf

    return conf.get("operators", "default_queue")


def test_gpu_trainer_goes_to_the_gpu_queue(monkeypatch):
    monkeypatch.delenv("CONVEYOR_GPU_QUEUE", raising=False)
    dag = factory.train_dag(churn_with_gpu(True))
    assert dag.get_task("train").queue == "gpu" == settings.GPU_QUEUE_DEFAULT


def test_only_the_train_task_is_routed(monkeypatch):
    monkeypatch.delenv("CONVEYOR_GPU_QUEUE", raising=False)
    dag = factory.train_dag(churn_with_gpu(True))
    others = {task.task_id: task.queue for task in dag.tasks if task.task_id != "train"}
    assert others and set(others.values()) == {default_queue()}, others


def test_cpu_trainer_stays_on_the_default_queue(monkeypatch):
    monkeypatch.setenv("CONVEYOR_GPU_QUEUE", "gpu")
    dag = factory.train_dag(churn_with_gpu(False))
    assert dag.get_task("train").queue == default_queue() != "gpu"


def test_queue_name_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CONVEYOR_GPU_QUEUE", "a100")
    assert factory.train_dag(churn_with_gpu(True)).get_task("train").queue == "a100"
    monkeypatch.setenv("CONVEYOR_GPU_QUEUE", "")  # empty: the default, never an empty queue name
    assert factory.train_dag(churn_with_gpu(True)).get_task("train").queue == "gpu"


@pytest.mark.parametrize("name", ["churn", "shapes"])
def test_shipped_pipelines_route_as_their_spec_says(name, monkeypatch):
    monkeypatch.delenv("CONVEYOR_GPU_QUEUE", raising=False)
    spec = load_spec(PROJECT / "include" / "pipelines" / f"{name}.yaml")
    expected = "gpu" if spec.trainer.gpu else default_queue()
    assert factory.train_dag(spec).get_task("train").queue == expected
