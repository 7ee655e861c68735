"""Benchmark: the orchestration overhead of the demo pipeline on Airflow's distributed set-up.

One run of the churn chain on real components (``tests/distributed/celery_stack.py``: api-server,
scheduler, dag-processor, triggerer and a Celery worker on PostgreSQL and Redis, the same stack
the distributed tests start): a drop lands, ``churn__ingest`` is triggered through the REST API,
``churn__train`` starts on the dataset Asset, ``churn__deploy`` on the model Asset, and
``churn__batch_predict`` is triggered through the REST API as soon as the deploy run succeeded.

* **wall**: from the first trigger (the client's clock just before ``POST …/dagRuns``) to the end
  of the last task (its ``end_date`` in the REST API; same machine, same clock);
* **baseline**: the sum of the tasks' own run times (``end_date - start_date`` of every task
  instance, read from the REST API in the same run). As Airflow records them, they start in the
  task process, so they include its parse of the DAG file (about 1 s), and the sensor's includes
  its wait in the triggerer;
* ``ratio`` = wall / sum of task run times (1.0 would be no orchestration overhead at all).

The overhead (wall - task time) is split along the chain, task by task, ordered by start time,
each task's wait counted from the moment its predecessor ended (the first task: the trigger):

* ``to_scheduled_s``: until the scheduler set it ``scheduled`` (includes creating the DAG run,
  for an Asset event or a REST trigger, and the scheduler's loop);
* ``to_queued_s``: ``scheduled`` → ``queued`` (handed to Celery);
* ``queue_wait_s``: ``queued`` → started (Redis, the worker, the task process and DAG parsing);
* ``client_s``: the benchmark's own delay between seeing the deploy run succeed and triggering
  the batch (polling every 0.5 s): not Airflow's, shown apart.

``--quick``: 800 rows, a 10 s gradient-boosting budget, 2,000 rows to score. Default: 5,000 rows,
the demo's trainer (every model type but the neural networks) with a 60 s budget, 20,000 rows.
Needs PostgreSQL and Redis (``scripts/services.sh up`` starts them). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT / "tests" / "distributed")]

from celery_stack import AirflowStack, free_port, now_utc, small_pipeline, utc  # noqa: E402

CHAIN = ("churn__ingest", "churn__train", "churn__deploy", "churn__batch_predict")
RUN_S = 1200


def run_chain(stack: AirflowStack, rows: int, batch_rows: int) -> dict:
    """Run the chain once; returns the trigger times and every run with its task instances."""
    from conveyor.demo import churn_frame

    api = stack.api
    for dag_id in CHAIN:
        api.unpause(dag_id)
    stack.write_drop("churn", "drop-0001", churn_frame(rows, seed=7))
    stack.write_drop(
        "churn", "batch-0001", churn_frame(batch_rows, seed=99).drop(columns=["churned"]), "inference", fmt="parquet"
    )
    runs: dict[str, dict] = {}
    triggered = now_utc()
    run_id = api.trigger("churn__ingest")["dag_run_id"]
    runs["churn__ingest"] = api.wait_run("churn__ingest", run_id, RUN_S)
    print(f"ingest done ({(now_utc() - triggered).total_seconds():.0f}s)", flush=True)
    for dag_id in ("churn__train", "churn__deploy"):
        run_id = api.wait_new_run(dag_id, set(), RUN_S)["dag_run_id"]
        runs[dag_id] = api.wait_run(dag_id, run_id, RUN_S)
        print(f"{dag_id} done ({(now_utc() - triggered).total_seconds():.0f}s)", flush=True)
    batch_triggered = now_utc()
    run_id = api.trigger("churn__batch_predict", {"input": "", "model": "champion"})["dag_run_id"]
    runs["churn__batch_predict"] = api.wait_run("churn__batch_predict", run_id, RUN_S)
    print(f"batch done ({(now_utc() - triggered).total_seconds():.0f}s)", flush=True)
    tasks = {dag_id: api.task_instances(dag_id, run["dag_run_id"]) for dag_id, run in runs.items()}
    return {"triggered": triggered, "batch_triggered": batch_triggered, "runs": runs, "tasks": tasks}


def seconds(later: datetime | None, earlier: datetime | None) -> float:
    return (later - earlier).total_seconds() if later and earlier else 0.0


def analyse(chain: dict) -> dict:
    """Wall time, task time and the overhead's breakdown (see the module's docstring)."""
    ran = [t for dag_id in CHAIN for t in chain["tasks"][dag_id] if t["start_date"] and t["end_date"]]
    ran.sort(key=lambda t: utc(t["start_date"]))
    first_batch = min((t for t in ran if t["dag_id"] == "churn__batch_predict"), key=lambda t: utc(t["start_date"]))
    breakdown = {"to_scheduled_s": 0.0, "to_queued_s": 0.0, "queue_wait_s": 0.0, "client_s": 0.0}
    per_task = []
    ready = chain["triggered"]
    for task in ran:
        start, end = utc(task["start_date"]), utc(task["end_date"])
        scheduled, queued = utc(task["scheduled_when"]), utc(task["queued_when"])
        if task is first_batch:  # the benchmark's own delay before its REST trigger is not Airflow's
            breakdown["client_s"] += max(0.0, seconds(chain["batch_triggered"], ready))
            ready = max(ready, chain["batch_triggered"])
        scheduled = scheduled if scheduled and scheduled >= ready else ready
        queued = queued if queued and queued >= scheduled else scheduled
        breakdown["to_scheduled_s"] += seconds(scheduled, ready)
        breakdown["to_queued_s"] += seconds(queued, scheduled)
        breakdown["queue_wait_s"] += max(0.0, seconds(start, queued))
        per_task.append(
            {
                "task": f"{task['dag_id']}.{task['task_id']}",
                "run_s": round(seconds(end, start), 2),
                "waited_s": round(max(0.0, seconds(start, ready)), 2),
                "try": task["try_number"],
            }
        )
        ready = max(ready, end)
    task_s = sum(seconds(utc(t["end_date"]), utc(t["start_date"])) for t in ran)
    wall_s = seconds(max(utc(t["end_date"]) for t in ran), chain["triggered"])
    return {
        "wall_s": round(wall_s, 2),
        "task_s": round(task_s, 2),
        "overhead_s": round(wall_s - task_s, 2),
        **{k: round(v, 2) for k, v in breakdown.items()},
        "tasks": len(ran),
        "per_task": per_task,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data and a 10 s training budget")
    parser.add_argument("--rows", type=int, help="rows of the training drop")
    parser.add_argument("--time-limit", type=int, help="training budget in seconds")
    parser.add_argument("--batch-rows", type=int, help="rows to score in batch")
    args = parser.parse_args(argv)
    rows = args.rows or (800 if args.quick else 5000)
    time_limit = args.time_limit or (10 if args.quick else 60)
    batch_rows = args.batch_rows or (2000 if args.quick else 20000)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-scheduling-") as tmp:
        spec = small_pipeline("churn", port=free_port(), time_limit=time_limit, gbm_only=args.quick)
        with AirflowStack(Path(tmp), {"churn": spec}) as stack:
            print(f"stack up in {time.monotonic() - started:.0f}s (logs: {stack.root / 'logs'})", flush=True)
            chain = run_chain(stack, rows, batch_rows)
            metadata = stack.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].split(":", 1)[0]
    figures = analyse(chain)
    for task in figures["per_task"]:
        print(f"  {task['task']:<36} waited {task['waited_s']:6.2f}s  ran {task['run_s']:7.2f}s  try {task['try']}")
    print(
        f"wall {figures['wall_s']:.1f}s, tasks {figures['task_s']:.1f}s, overhead {figures['overhead_s']:.1f}s "
        f"(to scheduled {figures['to_scheduled_s']:.1f}s, to queued {figures['to_queued_s']:.1f}s, "
        f"queue wait {figures['queue_wait_s']:.1f}s, client {figures['client_s']:.1f}s)",
        flush=True,
    )
    result = {
        "bench": "scheduling",
        "baseline": "sum of the chain's task run times (REST API task instances, end - start), same run",
        "ratio": round(figures["wall_s"] / figures["task_s"], 3),
        "quick": args.quick,
        "rows": rows,
        "time_limit": time_limit,
        "batch_rows": batch_rows,
        "executor": f"CeleryExecutor (1 worker, concurrency 2), Redis broker, metadata on {metadata}",
        **{k: v for k, v in figures.items() if k != "per_task"},
        "per_task": {t["task"]: {"run_s": t["run_s"], "waited_s": t["waited_s"]} for t in figures["per_task"]},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
