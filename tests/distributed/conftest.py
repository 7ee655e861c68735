"""One distributed Airflow stack (CeleryExecutor on PostgreSQL and Redis) per test module.

The stack's components are real processes; their logs are under the module's tmp folder
(``celery-stack*/logs/``) and their tails are printed when a wait fails or the start-up does.
"""

from __future__ import annotations

import pytest

from celery_stack import AirflowStack, ServicesUnavailable, StackError, free_port, small_pipeline


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Airflow's api-server, scheduler, dag-processor, triggerer and a Celery worker, started.

    Pipelines: ``churn`` (auto approval, endpoint and batch) and ``churn_manual`` (manual approval,
    endpoint only), both small and quick; the warehouse is reached through a ``FaultyProxy``.
    """
    root = tmp_path_factory.mktemp("celery-stack")
    pipelines = {
        "churn": small_pipeline("churn", port=free_port()),
        "churn_manual": small_pipeline("churn_manual", port=free_port(), approval="manual", batch=False),
    }
    stack = AirflowStack(root, pipelines, warehouse_proxy=True)
    try:
        stack.start()
    except ServicesUnavailable as exc:
        stack.stop()
        pytest.skip(f"PostgreSQL or Redis is down and cannot be started here: {exc}")
    except BaseException as exc:
        if not isinstance(exc, StackError):  # a StackError's message already carries the log tails
            print(stack.diagnose())
        stack.stop()
        raise
    yield stack
    stack.stop()
