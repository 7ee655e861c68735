"""The monitor's operators on a real lake and a real MLflow registry (a per-test SQLite store) whose
champion is the session's real churn model: feedback drops (good, with bad rows, unreadable, not read
twice), drift checks of an input, a batch run and captured traffic (bad input recorded, not fatal),
and the retraining trigger."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from conveyor.lake import PROCESSED_MARKER, read_json
from conveyor.monitoring import decisions, records
from conveyor.monitoring.feedback import RULE_CLASS, RULE_DUPLICATE, RULE_LABELLED, RULE_UNKNOWN
from conveyor.operators.monitor import CheckDriftOperator, IngestFeedbackOperator, TriggerRetrainOperator
from conveyor.registry.mlflow import MlflowRegistryHook
from helpers import context, pipeline_spec_dict, write_drop

RUN_AFTER = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
SPEC = pipeline_spec_dict("churn")  # what the DAG factory hands every operator


def monitor_context(run_id: str = "scheduled__1") -> dict:
    return {**context(run_id), "dag_run": SimpleNamespace(run_after=RUN_AFTER)}


@pytest.fixture
def registry(mlflow_template, tmp_path, monkeypatch) -> MlflowRegistryHook:
    """This test's own MLflow store, the default one of every hook the operators create."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("CONVEYOR_STATE_DIR", str(tmp_path / "state"))
    return MlflowRegistryHook()


@pytest.fixture
def champion(lake, registry, churn_model) -> str:
    """The real churn model in the lake, registered and promoted as version 1; returns the version."""
    target = Path(lake.models("churn", "train-1").path) / "model.tar.gz"
    target.parent.mkdir(parents=True)
    shutil.copy(churn_model["archive"], target)
    run = registry.ensure_run("churn", "train-1", run_name="train-1", tags={"pipeline": "churn"})
    version = registry.register("churn", target.as_uri(), run, {"conveyor_run_id": "train-1"})
    registry.promote("churn", str(version.version))
    return str(version.version)


def store_observations(lake, ids: list[str], source_id: str = "b1") -> None:
    """Stored predictions (what feedback is joined with), as the drift task keeps them."""
    features = pd.DataFrame({"tenure_months": range(len(ids))})
    predictions = pd.DataFrame({"prediction": ["no"] * len(ids), "proba_no": 0.7, "proba_yes": 0.3})
    observed = records.observations(
        features,
        predictions,
        ids=ids,
        model_version="1",
        scored_at=RUN_AFTER.isoformat(),
        source="batch",
        source_id=source_id,
    )
    records.write_parquet(lake.monitor("churn", "observations", f"batch-{source_id}.parquet"), observed)


def ingest(run_id: str = "scheduled__1", spec: dict = SPEC) -> dict:
    return IngestFeedbackOperator(task_id="feedback", spec=spec).execute(monitor_context(run_id))


def csv(rows: list[tuple[str, str]], header: str = "id,label") -> bytes:
    return (header + "\n" + "".join(f"{i},{label}\n" for i, label in rows)).encode()


# ------------------------------------------------------------------------------------ spec


def test_the_monitor_dag_hands_every_operator_the_validated_spec():
    from airflow.sdk import literal

    from conveyor.factory.monitor import monitor_dag
    from conveyor.spec import PipelineSpec

    dag = monitor_dag(PipelineSpec.model_validate(SPEC))
    for task_id in ("drift", "feedback", "decide", "trigger_retrain"):
        task = dag.get_task(task_id)
        assert "spec" in task.template_fields and task.template_fields_renderers["spec"] == "json"
        assert type(task.spec) is type(literal(SPEC)) and task.spec.value == SPEC  # shown, never Jinja-rendered
        assert task.pipeline == "churn"


def test_the_decision_links_to_its_report_and_the_dag_serialises(lake, monkeypatch):
    from airflow.serialization.serialized_objects import DagSerialization

    from conveyor.factory.monitor import monitor_dag
    from conveyor.links import MonitorReportLink, report_url
    from conveyor.operators.monitor import RetrainDecisionOperator
    from conveyor.spec import PipelineSpec

    monkeypatch.delenv("AIRFLOW__API__BASE_URL", raising=False)
    key = SimpleNamespace(dag_id="churn__monitor", task_id="decide", run_id="scheduled__1", map_index=-1, try_number=1)
    operator = RetrainDecisionOperator(task_id="decide", spec=SPEC)
    assert MonitorReportLink().get_link(operator, ti_key=key) == ""  # no report yet
    page = lake.reports("churn", "scheduled__1") / "monitor" / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text("<html></html>")
    assert MonitorReportLink().get_link(operator, ti_key=key) == report_url("churn__monitor", "scheduled__1", "monitor")

    tasks = DagSerialization.to_dict(monitor_dag(PipelineSpec.model_validate(SPEC)))["dag"]["tasks"]
    (decide,) = [t.get("__var", t) for t in tasks if t.get("__var", t)["task_id"] == "decide"]
    assert "Monitoring report" in decide["_operator_extra_links"]


def test_a_deterministic_domain_error_fails_the_task_and_a_transient_one_is_retried(lake, monkeypatch):
    from types import SimpleNamespace

    import conveyor.registry
    from conveyor.errors import TransientError
    from conveyor.registry.base import ModelVersionNotFound

    def failing(error: Exception):
        def champion(name: str):
            raise error

        return lambda spec: SimpleNamespace(champion=champion)

    write_drop(lake, "feedback/f1", {"labels.csv": csv([("C-1", "yes")])})
    monkeypatch.setattr(conveyor.registry, "registry_hook", failing(ModelVersionNotFound("churn: no alias champion")))
    with pytest.raises(AirflowFailException, match="no alias champion") as caught:
        ingest()
    assert isinstance(caught.value.__cause__, ModelVersionNotFound)
    monkeypatch.setattr(conveyor.registry, "registry_hook", failing(TransientError("registry: 503")))
    with pytest.raises(TransientError, match="503"):
        ingest()
    assert not (lake.landing("churn", "feedback", "f1") / PROCESSED_MARKER).exists()


def test_a_storage_failure_leaves_a_feedback_drop_in_landing_to_be_retried(lake, monkeypatch):
    """An S3 503 while a good drop is read: the task is retried (not failed), the drop is not quarantined."""
    from airflow.sdk import ObjectStoragePath
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    import conveyor.operators.monitor as monitor_operators
    import conveyor.registry

    champion = SimpleNamespace(version=1, tags={})
    monkeypatch.setattr(conveyor.registry, "registry_hook", lambda spec: SimpleNamespace(champion=lambda n: champion))
    monkeypatch.setattr(monitor_operators, "champion_metadata", lambda *a: SimpleNamespace(class_labels=["no", "yes"]))
    store_observations(lake, ["C-1"])
    write_drop(lake, "feedback/f1", {"labels.csv": csv([("C-1", "yes")])})
    response = {"Error": {"Code": "SlowDown", "Message": "Reduce your request rate."}}
    slow_down = translate_boto_error(ClientError({**response, "ResponseMetadata": {"HTTPStatusCode": 503}}, "Get"))
    real = ObjectStoragePath.read_bytes

    def read_bytes(self):
        if self.name == "labels.csv":
            raise slow_down
        return real(self)

    monkeypatch.setattr(ObjectStoragePath, "read_bytes", read_bytes)
    with pytest.raises(OSError, match="Reduce your request rate") as caught:
        ingest()
    assert caught.value is slow_down and not isinstance(caught.value, AirflowFailException)
    assert (lake.landing("churn", "feedback", "f1") / "labels.csv").exists()
    assert not (lake.landing("churn", "feedback", "f1") / PROCESSED_MARKER).exists()
    assert not lake.quarantine("churn", "feedback/f1").exists()

    monkeypatch.setattr(ObjectStoragePath, "read_bytes", real)  # the store is back: the retry takes the drop
    assert ingest()["accepted"] == 1 and not lake.quarantine("churn", "feedback/f1").exists()


# --------------------------------------------------------------------------------- feedback


@pytest.mark.slow
def test_a_good_drop_is_accepted_and_not_read_twice(lake, champion):
    store_observations(lake, [f"C-{n}" for n in range(10)])
    write_drop(lake, "feedback/f1", {"labels.csv": csv([("C-1", "yes"), ("C-2", "no"), ("C-3", "YES")])})
    counts = ingest()
    assert {
        k: counts[k]
        for k in ("drops", "received", "accepted", "unknown_ids", "duplicates", "out_of_set", "rejected_drops")
    } == {
        "drops": 1,
        "received": 3,
        "accepted": 3,
        "unknown_ids": 0,
        "duplicates": 0,
        "out_of_set": 0,
        "rejected_drops": 0,
    }
    labels = records.load_labels(lake, "churn")
    assert labels.to_dict("records") == [
        {"id": f"C-{n}", "label": label, "received_at": RUN_AFTER.isoformat(), "drop": "f1"}
        for n, label in ((1, "yes"), (2, "no"), (3, "yes"))
    ]  # "YES" is the class "yes"
    receipt = read_json(lake.landing("churn", "feedback", "f1") / PROCESSED_MARKER)
    assert receipt == {"run_id": "scheduled__1", "accepted": 3, "rejected": 0}
    assert not lake.quarantine("churn", "feedback/f1").exists()

    again = ingest("scheduled__2")
    assert again["drops"] == 0 and again["received"] == 0
    assert len(records.load_labels(lake, "churn")) == 3


@pytest.mark.slow
def test_bad_rows_are_quarantined_with_their_rule_and_good_ones_kept(lake, champion):
    first = {**SPEC, "monitor": {**SPEC["monitor"], "feedback_duplicates": "first"}}  # later labels are rejected
    store_observations(lake, [f"C-{n}" for n in range(10)])
    write_drop(lake, "feedback/f1", {"labels.csv": csv([("C-1", "yes")])})
    ingest(spec=first)
    rows = [("C-2", "no"), ("NOPE", "yes"), ("C-2", "yes"), ("C-3", "maybe"), ("C-1", "no"), ("C-4", "yes")]
    write_drop(
        lake,
        "feedback/f2",
        {
            "part-1.csv": csv(rows[:3], header="customer_id,churned"),
            "part-2.jsonl": "".join(json.dumps({"id": i, "label": label}) + "\n" for i, label in rows[3:]).encode(),
        },
    )
    counts = ingest("scheduled__2", spec=first)
    assert {k: counts[k] for k in ("drops", "received", "accepted", "unknown_ids", "duplicates", "out_of_set")} == {
        "drops": 1,
        "received": 6,
        "accepted": 2,
        "unknown_ids": 1,
        "duplicates": 2,
        "out_of_set": 1,
    }
    assert {(e["id"], e["rule"].split(" [")[0]) for e in counts["rejected_examples"]} == {
        ("NOPE", RULE_UNKNOWN),
        ("C-2", RULE_DUPLICATE),
        ("C-3", RULE_CLASS),
        ("C-1", RULE_LABELLED),
    }

    rejected = pd.read_csv(Path(lake.quarantine("churn", "feedback/f2").path) / "rejected.csv", dtype=str)
    assert list(rejected.columns) == ["id", "label", "file", "rule"]
    assert rejected[["id", "label", "file"]].values.tolist() == [
        ["NOPE", "yes", "part-1.csv"],
        ["C-2", "yes", "part-1.csv"],
        ["C-3", "maybe", "part-2.jsonl"],
        ["C-1", "no", "part-2.jsonl"],
    ]
    assert rejected["rule"].tolist() == [RULE_UNKNOWN, RULE_DUPLICATE, f"{RULE_CLASS} ['no', 'yes']", RULE_LABELLED]

    labels = records.load_labels(lake, "churn")
    assert labels[labels["drop"] == "f2"][["id", "label"]].values.tolist() == [["C-2", "no"], ["C-4", "yes"]]
    assert labels["id"].is_unique
    assert read_json(lake.landing("churn", "feedback", "f2") / PROCESSED_MARKER)["rejected"] == 4
    assert (Path(lake.landing("churn", "feedback", "f2").path) / "part-1.csv").exists()  # bytes stay in landing


@pytest.mark.slow
def test_an_unreadable_drop_is_moved_to_quarantine_whole(lake, champion):
    store_observations(lake, ["C-1"])
    write_drop(lake, "feedback/f3", {"labels.csv": b"ident,truth\nC-1,yes\n"})
    write_drop(lake, "feedback/f4", {"labels.csv": csv([("C-1", "no")])})
    counts = ingest()
    assert counts["drops"] == 2 and counts["rejected_drops"] == 1 and counts["accepted"] == 1
    assert "drop f3: labels.csv: a feedback file needs an id column" in counts["rejected_examples"][0]["rule"]
    quarantined = Path(lake.quarantine("churn", "feedback/f3").path)
    assert (quarantined / "labels.csv").read_bytes() == b"ident,truth\nC-1,yes\n"
    assert (quarantined / "_SUCCESS").exists()
    report = json.loads((quarantined / "_report.json").read_text())
    assert report["drop"] == "f3" and "found ['ident', 'truth']" in report["rule"]
    assert not lake.landing("churn", "feedback", "f3").exists()
    assert records.load_labels(lake, "churn")["drop"].tolist() == ["f4"]
    assert ingest("scheduled__2")["drops"] == 0


@pytest.mark.slow
def test_the_champions_classes_come_from_the_metadata_sidecar_without_downloading_the_model(
    lake, registry, churn_model
):
    """A registered archive that cannot be read at all: its sidecar alone gives the class labels."""
    folder = Path(lake.models("churn", "train-1").path)
    folder.mkdir(parents=True)
    (folder / "model.tar.gz").write_bytes(b"not an archive: downloading it would fail")
    shutil.copy(churn_model["dir"] / "metadata.json", folder / "metadata.json")
    run = registry.ensure_run("churn", "train-1", run_name="train-1", tags={"pipeline": "churn"})
    version = registry.register("churn", (folder / "model.tar.gz").as_uri(), run, {"conveyor_run_id": "train-1"})
    registry.promote("churn", str(version.version))
    store_observations(lake, ["C-1", "C-2"])
    write_drop(lake, "feedback/f1", {"labels.csv": csv([("C-1", "Yes"), ("C-2", "perhaps")])})
    counts = ingest()
    assert counts["accepted"] == 1 and counts["out_of_set"] == 1
    assert records.load_labels(lake, "churn")["label"].tolist() == ["yes"]


def test_an_incomplete_drop_waits_and_feedback_without_a_champion_is_skipped(lake, registry):
    write_drop(lake, "feedback/f1", {"labels.csv": csv([("C-1", "yes")])}, marker=False)
    assert ingest()["drops"] == 0
    write_drop(lake, "feedback/f2", {"labels.csv": csv([("C-1", "yes")])})
    with pytest.raises(AirflowSkipException, match="no champion model yet"):
        ingest()
    assert not (lake.landing("churn", "feedback", "f2") / PROCESSED_MARKER).exists()


# ------------------------------------------------------------------------------------ drift


def write_input(tmp_path: Path, name: str, frame: pd.DataFrame | None) -> str:
    """An input file inside the test's lake (``tmp_path / "lake"``, the ``lake`` fixture's root); its URI."""
    path = tmp_path / "lake" / "landing" / "churn" / "inputs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if frame is None:
        path.write_bytes(b"")
    else:
        frame.to_csv(path, index=False)
    return path.as_uri()


def check_input(uri: str, run_id: str = "manual__check") -> dict:
    result = CheckDriftOperator(task_id="drift", spec=SPEC, input_uri=uri).execute(monitor_context(run_id))
    assert len(result["checks"]) == 1
    return result["checks"][0]


def stored_check(lake, source: str, ident: str) -> dict:
    return read_json(lake.monitor("churn", "checks", f"{decisions.source_key(source, ident)}.json"))


@pytest.mark.slow
def test_an_input_with_a_renamed_column_or_no_rows_is_recorded_not_fatal(lake, champion, churn_model, tmp_path):
    test = churn_model["test"].drop(columns=["churned"])
    renamed = write_input(tmp_path, "renamed.csv", test.rename(columns={"contract": "contract_type"}))
    result = check_input(renamed)
    assert result["rows"] == 0 and result["drifted"] is False
    assert "missing ['contract'], unexpected ['contract_type']" in result["error"]
    assert result["error"].startswith(f"input {renamed}: ")
    assert stored_check(lake, "input", renamed)["error"] == result["error"]

    header_only = write_input(tmp_path, "header.csv", test.iloc[0:0])
    assert "batch has no rows" in check_input(header_only)["error"]
    empty = write_input(tmp_path, "empty.csv", None)
    assert check_input(empty)["error"].startswith(f"input {empty}: ")
    missing = (tmp_path / "lake" / "nowhere").as_uri()
    assert "no CSV or Parquet file" in check_input(missing)["error"]


@pytest.fixture
def http_service():
    """A local HTTP service that counts the requests it gets (what a worker must never be made to call)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"a,b\n1,2\n")

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def test_an_input_outside_the_lake_fails_the_task_before_anything_is_read(lake, tmp_path, http_service):
    url, hits = http_service
    outside = tmp_path / "outside.csv"
    outside.write_text("tenure_months\n1\n")
    for given, rule in (
        (f"{url}/rows.csv", "http:// is not the lake's scheme"),
        ("file:///etc", "not below the lake's root"),
        (str(outside), "not below the lake's root"),
        ("../../etc/passwd", "not below the lake's root"),
        ("s3://other-bucket/rows.csv", "s3:// is not the lake's scheme"),
    ):
        with pytest.raises(AirflowFailException, match=f"^Param 'input': .* is refused: .*{rule}"):
            CheckDriftOperator(task_id="drift", spec=SPEC, input_uri=given).execute(monitor_context())
    assert hits == []  # the worker never called the service
    assert not lake.monitor("churn", "checks").exists()  # and nothing was recorded


@pytest.mark.slow
def test_an_input_is_compared_with_the_champions_baseline(lake, champion, churn_model, tmp_path):
    from conveyor.demo import churn_frame

    same = write_input(tmp_path, "same.csv", churn_model["test"])
    steady = check_input(same)
    assert steady["error"] is None and steady["rows"] == len(churn_model["test"]) and steady["drift_share"] < 0.25
    report = stored_check(lake, "input", same)
    assert report["model_version"] == champion and set(report["report"]["features"]) >= {"contract", "tenure_months"}

    shifted = write_input(tmp_path, "shifted.csv", churn_frame(600, seed=21, shifted=True).drop(columns="churned"))
    moved = check_input(shifted)
    assert moved["drifted"] is True and moved["drift_share"] > 0.25
    drifted = stored_check(lake, "input", shifted)["report"]["drifted_features"]
    assert {"contract", "internet_service", "support_calls"} <= set(drifted)


@pytest.mark.slow
def test_an_input_without_a_champion_is_recorded(lake, registry, churn_model, tmp_path):
    uri = write_input(tmp_path, "same.csv", churn_model["test"])
    assert "churn has no champion model" in check_input(uri)["error"]


def write_batch_run(lake, run: str, inputs: pd.DataFrame, version: str, source: str | None = None) -> None:
    """A finished batch prediction run as conveyor.batch.scoring leaves it (input file, parts, _SUCCESS.json)."""
    folder = Path(lake.path("predictions", "churn", run).path)
    folder.mkdir(parents=True)
    if source is None:
        source = str(folder.parent.parent.parent / "landing" / "churn" / "inference" / run / "part.csv")
        Path(source).parent.mkdir(parents=True)
        inputs.to_csv(source, index=False)
    predictions = pd.DataFrame(
        {"customer_id": inputs["customer_id"], "prediction": ["no"] * len(inputs), "proba_no": 0.8, "proba_yes": 0.2}
    )
    predictions.to_parquet(folder / "part-00000.parquet", index=False)
    (folder / "_SUCCESS.json").write_text(
        json.dumps(
            {
                "rows": len(inputs),
                "parts": ["part-00000.parquet"],
                "model": "churn",
                "version": version,
                "run_id": run,
                "scored_at": RUN_AFTER.isoformat(),
                "source": source,
            }
        )
    )


@pytest.mark.slow
def test_batch_runs_are_checked_once_and_kept_as_observations(lake, champion, churn_model):
    inputs = churn_model["test"].drop(columns=["churned"]).iloc[:100]
    write_batch_run(lake, "b1", inputs, champion)
    write_batch_run(lake, "b2", inputs.rename(columns={"age": "customer_age"}), champion)
    write_batch_run(lake, "b3", inputs, champion, source=str(Path(lake.root.removeprefix("file://")) / "gone.csv"))
    result = CheckDriftOperator(task_id="drift", spec=SPEC).execute(monitor_context("scheduled__1"))
    checks = {c["id"]: c for c in result["checks"]}
    assert set(checks) == {"b1", "b2", "b3"}
    assert checks["b1"]["error"] is None and checks["b1"]["rows"] == 100
    assert "missing ['age'], unexpected ['customer_age']" in checks["b2"]["error"]
    assert "no longer exists" in checks["b3"]["error"]
    report = stored_check(lake, "batch", "b1")["report"]
    assert report["prediction"]["problem"] == "classification"  # the predictions are compared too,
    assert report["prediction"]["reference"] == "predictions"  # with the trainer's validation predictions
    observed = records.load_observations(lake, "churn")
    assert observed["_id"].tolist() == inputs["customer_id"].astype(str).tolist()
    assert set(observed["source_id"]) == {"b1"} and set(observed["model_version"]) == {champion}
    assert records.known_ids(lake, "churn") == set(inputs["customer_id"].astype(str))

    again = CheckDriftOperator(task_id="drift", spec=SPEC).execute(monitor_context("scheduled__2"))
    assert again["checks"] == []


@pytest.mark.slow
def test_captured_traffic_is_checked_and_its_offsets_kept(lake, champion, churn_model):
    from conveyor.model.artifacts import LoadedModel
    from conveyor.serving.app import Capture

    model = LoadedModel(churn_model["dir"])
    capture = Capture(Path(lake.capture("churn").path), 1.0, "churn")
    rows = churn_model["test"].iloc[:40]
    for n in range(0, 40, 4):
        body = rows.iloc[n : n + 4][model.feature_names].to_csv(index=False, header=False).encode()
        capture.write(
            champion,
            "text/csv",
            "application/json",
            body,
            model.invoke(body, "text/csv"),
            "application/json",
            f"req-{n}",
        )
    result = CheckDriftOperator(task_id="drift", spec=SPEC).execute(monitor_context("scheduled__1"))
    assert len(result["checks"]) == 1
    only = result["checks"][0]
    assert only["source"] == "capture" and only["error"] is None and only["rows"] == 40
    assert only["id"].endswith(f"/v{champion}")
    observed = records.load_observations(lake, "churn")
    assert observed["_id"].tolist() == [f"req-{n}#{k}" for n in range(0, 40, 4) for k in range(4)]
    offsets = read_json(lake.monitor("churn", "capture_offsets.json"))
    assert list(offsets.values()) == [sum(f.stat().st_size for f in Path(lake.capture("churn").path).rglob("*.jsonl"))]
    assert CheckDriftOperator(task_id="drift", spec=SPEC).execute(monitor_context("scheduled__2"))["checks"] == []

    # Traffic of a version the registry no longer knows is recorded with the error; the rest goes on.
    body = rows.iloc[:2][model.feature_names].to_csv(index=False, header=False).encode()
    capture.write("99", "text/csv", "application/json", body, model.invoke(body, "text/csv"), "application/json", "x")
    (unknown,) = CheckDriftOperator(task_id="drift", spec=SPEC).execute(monitor_context("scheduled__3"))["checks"]
    assert unknown["id"].endswith("/v99") and unknown["error"] and unknown["rows"] == 0


# --------------------------------------------------------------------------------- decision


@pytest.mark.slow
def test_poor_live_accuracy_retrains_once_with_the_labelled_rows(lake, champion, churn_model):
    import numpy as np

    from conveyor.model.metadata import read as read_metadata
    from conveyor.operators.monitor import RetrainDecisionOperator

    test = churn_model["test"].iloc[:240]
    features = read_metadata(churn_model["dir"]).feature_names
    p_yes = np.random.default_rng(0).random(len(test))  # a model no better than chance on the new data
    predictions = pd.DataFrame(
        {"prediction": np.where(p_yes > 0.5, "yes", "no"), "proba_no": 1 - p_yes, "proba_yes": p_yes}
    )
    observed = records.observations(
        test[features],
        predictions,
        ids=test["customer_id"],
        model_version=champion,
        scored_at=RUN_AFTER.isoformat(),
        source="batch",
        source_id="b1",
    )
    records.write_parquet(lake.monitor("churn", "observations", "batch-b1.parquet"), observed)
    truth = test[["customer_id", "churned"]].itertuples(index=False)
    write_drop(lake, "feedback/f1", {"labels.csv": csv(list(truth))})
    feedback = ingest()
    assert feedback["accepted"] == 240

    def decide(run_id: str) -> dict:
        op = RetrainDecisionOperator(task_id="decide", spec=SPEC, drift={"checks": []}, feedback=feedback)
        return op.execute(monitor_context(run_id))

    decision = decide("scheduled__1")
    assert decision["retrain"] is True and decision["live"]["labels"] == 240 and decision["live"]["value"] < 0.65
    assert decision["reasons"] == [
        f"live roc_auc of version {champion} is {decision['live']['value']:.4f} < 0.65 over "
        "240 new labels (at least 200 needed)"
    ]
    rows = pd.read_parquet(decision["labelled_uri"].removeprefix("file://"))
    assert list(rows.columns) == [*features, "customer_id", "churned"] and len(rows) == decision["labelled_rows"] == 240
    assert rows["churned"].tolist() == test["churned"].tolist()
    assert Path(decision["report"].removeprefix("file://")).is_file()
    trigger = read_json(lake.monitor("churn", "triggers", "scheduled__1.json"))
    assert trigger["retrain"] is True and trigger["reasons"] == decision["reasons"]

    # The same labels are not new any more: the next run has no reason, so nothing to suppress either.
    again = decide("scheduled__2")
    assert again["retrain"] is False and again["live"]["labels"] == 0 and again["reasons"] == []
    assert [t["retrain"] for t in decisions.load_triggers(lake, "churn")] == [True, False]


# ---------------------------------------------------------------------------------- trigger


def test_trigger_skips_without_a_retrain_decision():
    for decision, why in (
        (None, "no reason to"),
        ({"retrain": False, "reasons": []}, "no reason to"),
        ({"retrain": False, "reasons": ["drift"], "suppressed_by_cooldown": True}, "cool-down"),
    ):
        with pytest.raises(AirflowSkipException, match=f"not retraining churn: .*{why}"):
            TriggerRetrainOperator(task_id="trigger", spec=SPEC, decision=decision).execute(context())


def test_trigger_sets_the_retrain_events_extra():
    from conveyor.assets import retrain_asset

    decision = {
        "retrain": True,
        "reasons": ["live roc_auc of version 1 is 0.5 < 0.65"],
        "report": "file:///r/index.html",
        "labelled_uri": "file:///lake/monitor/churn/retrain/scheduled__1/labelled.parquet",
        "labelled_rows": 12,
    }
    ctx = context("scheduled__1")
    extra = TriggerRetrainOperator(task_id="trigger", spec=SPEC, decision=decision).execute(ctx)
    assert extra == {
        "reasons": decision["reasons"],
        "labelled_uri": decision["labelled_uri"],
        "labelled_rows": 12,
        "monitor_run": "scheduled__1",
        "report": "file:///r/index.html",
    }
    assert ctx["outlet_events"][retrain_asset("churn")].extra == extra
    json.dumps(extra)

    # The name comes from the spec the task was built with: no pipeline file is read at run time.
    ghost = TriggerRetrainOperator(task_id="trigger", spec={**SPEC, "name": "ghost"}, decision=decision)
    ghost.execute(ctx)
    assert ctx["outlet_events"][retrain_asset("ghost")].extra["reasons"] == decision["reasons"]


def test_a_retraining_event_hands_its_labelled_rows_to_the_split():
    from conveyor.operators.train import labelled_source

    dataset_event = SimpleNamespace(extra={"version": "v-1"})
    retrain_event = SimpleNamespace(extra={"labelled_uri": "file:///lake/monitor/churn/retrain/r1/labelled.parquet"})
    both = {"churn.dataset": [dataset_event], "churn.retrain": [retrain_event]}
    assert labelled_source({"triggering_asset_events": both}) == retrain_event.extra["labelled_uri"]
    assert labelled_source({"triggering_asset_events": {"churn.dataset": [dataset_event]}}) is None
    assert labelled_source({"triggering_asset_events": {"churn.retrain": [SimpleNamespace(extra=None)]}}) is None
    assert labelled_source({}) is None
