"""``POST /feedback`` on the model server: ``write_feedback`` (one complete drop, marker last, labels
checked against the live model's classes) and the route through FastAPI's TestClient, with and without
a live model (a tiny handler module: no AutoGluon)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from conveyor.model.metadata import Feature, ModelMetadata
from conveyor.serving import endpoint_state as es
from conveyor.serving.app import create_app
from conveyor.serving.auth import endpoint_credentials
from conveyor.serving.feedback import MAX_FEEDBACK_BYTES, write_feedback
from helpers import wait_until

AUTH_ENV = ("CONVEYOR_ENDPOINT_ACCESS_KEY_ID", "CONVEYOR_ENDPOINT_SECRET_ACCESS_KEY", "CONVEYOR_ENDPOINT_TOKEN")


def client_for(app, **kwargs) -> TestClient:
    """A TestClient that sends the endpoint's bearer token (``create_app`` generated the credentials)."""
    return TestClient(app, headers={"Authorization": f"Bearer {endpoint_credentials().token}"}, **kwargs)


HANDLERS = """
import json

def model_fn(model_dir):
    return json.load(open(model_dir + "/metadata.json"))

def input_fn(body, content_type):
    return [float(v) for v in (body.decode() if isinstance(body, bytes) else body).split(",")]

def predict_fn(data, model):
    return ["yes" if v > 0 else "no" for v in data]

def output_fn(prediction, accept):
    return json.dumps({"predictions": prediction})
"""


def live_model(classes: list) -> SimpleNamespace:
    """What ``write_feedback`` reads of the live model: its metadata's class labels."""
    metadata = ModelMetadata(
        trainer="tiny", problem_type="binary", label="y", features=(Feature("x", "float64"),), class_labels=classes
    )
    return SimpleNamespace(loaded=SimpleNamespace(metadata=metadata))


def drops(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.exists() else []


def records(drop: Path) -> list[dict]:
    return [json.loads(line) for line in (drop / "feedback.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- write_feedback


def test_write_feedback_writes_one_complete_drop_marker_last(tmp_path, monkeypatch):
    written: list[str] = []
    original = Path.write_text

    def recording(self, *args, **kwargs):
        written.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", recording)
    body = json.dumps({"feedback": [{"id": "req-1", "label": "1.0"}, {"id": 7, "label": 0}]}).encode()
    result = write_feedback(tmp_path / "feedback", body, live_model([0, 1]))
    assert written == ["feedback.jsonl", "_SUCCESS"]
    (drop,) = drops(tmp_path / "feedback")
    assert result == {"name": drop.name, "records": 2} and drop.name.startswith("api-")
    assert records(drop) == [{"id": "req-1", "label": "1"}, {"id": "7", "label": "0"}]  # canonical labels
    assert sorted(p.name for p in drop.iterdir()) == ["_SUCCESS", "feedback.jsonl"]

    second = write_feedback(tmp_path / "feedback", b'{"id": "req-2", "label": "Yes"}', live_model(["no", "yes"]))
    assert second["name"] != drop.name and len(drops(tmp_path / "feedback")) == 2
    assert records(tmp_path / "feedback" / second["name"]) == [{"id": "req-2", "label": "yes"}]


def test_the_drop_is_what_the_monitor_reads(tmp_path, lake):
    from conveyor.data.drops import drop_files, find_complete_drops
    from conveyor.monitoring.feedback import read_drop
    from conveyor.spec import get_spec

    folder = Path(lake.landing("churn", "feedback").path)
    write_feedback(
        folder,
        json.dumps([{"id": "a", "label": "yes"}, {"id": "b", "label": "NO"}]).encode(),
        live_model(["no", "yes"]),
    )
    root = lake.landing("churn", "feedback")
    (name,) = find_complete_drops(root, "_SUCCESS")
    rows = read_drop(drop_files(root / name, "_SUCCESS"), get_spec("churn"))
    assert list(zip(rows["id"], rows["label"], strict=True)) == [("a", "yes"), ("b", "no")]


def test_labels_outside_the_class_set_write_nothing(tmp_path):
    body = json.dumps([{"id": "a", "label": "yes"}, {"id": "b", "label": "maybe"}]).encode()
    with pytest.raises(ValueError, match=r"record 2: label 'maybe' is outside the class set \['no', 'yes'\]"):
        write_feedback(tmp_path / "feedback", body, live_model(["no", "yes"]))
    assert drops(tmp_path / "feedback") == []


def test_bad_bodies_are_refused(tmp_path):
    for body, message in (
        (b"{not json", "the body is not JSON"),
        (b"\xff\xfe", "the body is not JSON"),
        (b"[]", "feedback must be"),
        (b'[{"id": "a"}]', "needs 'id' and 'label'"),
        (b'{"id": "", "label": "yes"}', "must not be empty"),
        (b"[" * 100_000 + b"]" * 100_000, "nests JSON arrays or objects too deeply"),
    ):
        with pytest.raises(ValueError, match=message):
            write_feedback(tmp_path / "feedback", body, live_model(["no", "yes"]))
    assert drops(tmp_path / "feedback") == []


def test_without_a_live_model_labels_are_kept_as_sent(tmp_path):
    result = write_feedback(tmp_path / "feedback", b'{"id": "a", "label": "anything"}', None)
    assert records(tmp_path / "feedback" / result["name"]) == [{"id": "a", "label": "anything"}]


# ------------------------------------------------------------------------------------ route


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CONVEYOR_STATE_DIR", str(tmp_path / "state"))
    for name in (
        "CONVEYOR_CAPTURE_DIR",
        "CONVEYOR_CAPTURE_SHARE",
        "CONVEYOR_MAX_BODY_BYTES",
        "CONVEYOR_ENDPOINT",
        "CONVEYOR_FEEDBACK_DIR",
        *AUTH_ENV,
    ):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "state"


def make_model(root: Path, classes: list[str]) -> Path:
    (root / "code").mkdir(parents=True)
    (root / "code" / "inference.py").write_text(HANDLERS)
    (root / "metadata.json").write_text(
        json.dumps(
            {
                "trainer": "tiny",
                "problem_type": "binary",
                "label": "y",
                "features": [{"name": "x", "dtype": "float64"}],
                "class_labels": classes,
            }
        )
    )
    return root


def test_feedback_is_off_without_a_feedback_folder(state):
    with client_for(create_app("ep", poll_interval=0.02)) as client:
        answer = client.post("/feedback", json={"id": "a", "label": "yes"})
    assert answer.status_code == 404 and "feedback is not enabled" in answer.json()["error"]


def test_feedback_needs_credentials(state, tmp_path, monkeypatch):
    folder = tmp_path / "landing" / "ep" / "feedback"
    monkeypatch.setenv("CONVEYOR_FEEDBACK_DIR", str(folder))
    with client_for(create_app("ep", poll_interval=0.02)) as client:
        anonymous = client.post("/feedback", json={"id": "a", "label": "yes"}, headers={"Authorization": ""})
        wrong = client.post("/feedback", json={"id": "a", "label": "yes"}, headers={"Authorization": "Bearer nope"})
    assert (
        anonymous.status_code == 401 and anonymous.headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"
    )
    assert wrong.status_code == 403 and "bearer token is not valid" in wrong.json()["message"]
    assert drops(folder) == []  # nothing written for an anonymous caller


def test_the_route_checks_labels_against_the_live_model(state, tmp_path, monkeypatch):
    folder = tmp_path / "landing" / "ep" / "feedback"
    monkeypatch.setenv("CONVEYOR_FEEDBACK_DIR", str(folder))
    with client_for(create_app("ep", poll_interval=0.02)) as client:
        # No live model yet: nothing to check labels against; they are accepted as sent.
        early = client.post("/feedback", json={"id": "a", "label": "later"})
        assert early.status_code == 202 and early.json()["accepted"] == 1

        es.stage_candidate("ep", "v1", make_model(tmp_path / "v1", ["no", "yes"]))
        es.promote_candidate("ep")
        wait_until(lambda: client.get("/ping").status_code == 200)

        answer = client.post("/feedback", json={"feedback": [{"id": "b", "label": "YES"}, {"id": "c", "label": "no"}]})
        assert answer.status_code == 202
        assert answer.json() == {"accepted": 2, "drop": answer.json()["drop"]}
        assert records(folder / answer.json()["drop"]) == [{"id": "b", "label": "yes"}, {"id": "c", "label": "no"}]

        refused = client.post("/feedback", json=[{"id": "d", "label": "maybe"}])
        assert refused.status_code == 400
        assert refused.json()["error"] == "feedback: record 1: label 'maybe' is outside the class set ['no', 'yes']"
        garbage = client.post("/feedback", content=b"{oops", headers={"Content-Type": "application/json"})
        assert garbage.status_code == 400 and "not JSON" in garbage.json()["error"]
        empty = client.post("/feedback", json=[])
        assert empty.status_code == 400 and "feedback must be" in empty.json()["error"]
        huge = client.post(
            "/feedback", content=b"[" + b" " * MAX_FEEDBACK_BYTES + b"]", headers={"Content-Type": "application/json"}
        )
        assert huge.status_code == 413
        # The server keeps serving after bad requests.
        assert client.post("/invocations", content=b"1,-1", headers={"Content-Type": "text/csv"}).json() == {
            "predictions": ["yes", "no"]
        }
    assert len(drops(folder)) == 2
