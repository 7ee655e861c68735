"""The monitor's records (conveyor.monitoring.records): labelled predictions (observations joined with
labels), reading captured endpoint traffic (offsets, real model requests and responses, image requests),
and unchecked batch runs.

(Named ``test_monitoring_records`` because ``tests/unit/reports/test_monitoring.py`` exists: two test
modules of one name cannot be collected in one session without packages.)"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conveyor.lake import write_json
from conveyor.monitoring import decisions, records
from conveyor.monitoring.checks import capture_groups


def test_joined_takes_the_first_observation_of_an_id():
    observed = pd.DataFrame(
        {
            "_id": ["a", None, "b", "a", "c"],
            "prediction": ["yes", "no", "no", "no", "yes"],
            "source_id": ["r1", "r1", "r1", "r2", "r2"],
        }
    )
    labels = pd.DataFrame(
        {"id": ["a", "b", "zzz"], "label": ["yes", "yes", "no"], "received_at": ["t"] * 3, "drop": ["f1"] * 3}
    )
    rows = records.joined(observed, labels)
    assert list(zip(rows["_id"], rows["prediction"], rows["source_id"], rows["_label"])) == [
        ("a", "yes", "r1", "yes"),
        ("b", "no", "r1", "yes"),
    ]
    assert records.joined(None, labels).empty
    assert records.joined(observed, labels.iloc[0:0]).empty


# ---------------------------------------------------------------------------------- capture


def test_capture_slices_take_whole_lines_and_continue_from_the_offset(lake):
    root = Path(lake.capture("churn").path)
    first = root / "2026-03-01" / "111.jsonl"
    first.parent.mkdir(parents=True)
    lines = [json.dumps({"n": n}) + "\n" for n in range(3)]
    first.write_text("".join(lines) + '{"n": 3, "pa')
    assert records.capture_slices(lake, "missing") == ([], {})

    slices, offsets = records.capture_slices(lake, "churn")
    end = len("".join(lines).encode())
    assert slices == [(f"2026-03-01/111@0-{end}", [{"n": 0}, {"n": 1}, {"n": 2}])]
    assert offsets == {"2026-03-01/111.jsonl": end}
    # Until the monitor records the offsets, the same lines are offered again (a failed run loses nothing).
    assert records.capture_slices(lake, "churn")[0] == slices
    write_json(lake.monitor("churn", "capture_offsets.json"), offsets)
    assert records.capture_slices(lake, "churn") == ([], offsets)  # only a partial line is new

    with first.open("a") as handle:
        handle.write('rt": 1}\n{"n": 4}\n')
    second = root / "2026-03-02" / "222.jsonl"
    second.parent.mkdir()
    second.write_text('{"n": 5}\n')
    slices, offsets = records.capture_slices(lake, "churn")
    total = first.stat().st_size
    assert slices == [
        (f"2026-03-01/111@{end}-{total}", [{"n": 3, "part": 1}, {"n": 4}]),
        ("2026-03-02/222@0-9", [{"n": 5}]),
    ]
    assert offsets == {"2026-03-01/111.jsonl": total, "2026-03-02/222.jsonl": 9}


def test_a_corrupt_capture_line_is_left_out_not_fatal(lake):
    path = Path(lake.capture("churn").path) / "2026-03-01" / "1.jsonl"
    path.parent.mkdir(parents=True)
    # a worker killed half-way through a line, then the next line appended after it
    path.write_text('{"n": 0}\n{"n": 1, "tr{"n": 2}\n["not", "a record"]\n{"n": 3}\n')
    slices, offsets = records.capture_slices(lake, "churn")
    assert [lines for _, lines in slices] == [[{"n": 0}, {"n": 3}]]
    assert offsets == {"2026-03-01/1.jsonl": path.stat().st_size}


def loaded_model(churn_model):
    from conveyor.model.artifacts import LoadedModel

    return LoadedModel(churn_model["dir"])


def captured(lake, model, requests: list[tuple[bytes, str, str, str | None]]) -> list[dict]:
    """Answer requests with the real model and capture them as the endpoint does; read them back."""
    from conveyor.serving.app import Capture

    capture = Capture(Path(lake.capture("churn").path), 1.0, "churn")
    for body, content_type, accept, inference_id in requests:
        answer = model.invoke(body, content_type, accept)
        capture.write("1", content_type, accept, body, answer, accept, inference_id)
    slices, _ = records.capture_slices(lake, "churn")
    return [record for _, lines in slices for record in lines]


@pytest.mark.slow
def test_capture_rows_parse_real_requests_and_responses(lake, churn_model):
    model = loaded_model(churn_model)
    test = churn_model["test"]
    features = model.feature_names
    rows = test.iloc[:6]
    with_id = rows.iloc[:2][["customer_id", *features]].to_csv(index=False).encode()  # header + id column
    no_id = rows.iloc[2:3][features].to_csv(index=False, header=False).encode()
    three = rows.iloc[3:6][features].to_csv(index=False, header=False).encode()
    json_id = json.dumps(
        {"instances": [{**rows.iloc[0][features].to_dict(), "customer_id": "J,1"}]}, default=lambda v: v.item()
    ).encode()
    anonymous = json.dumps({"instances": [rows.iloc[1][features].to_dict()]}, default=lambda v: v.item()).encode()
    lines = captured(
        lake,
        model,
        [
            (with_id, "text/csv", "text/csv", "ignored-because-the-id-column-is-there"),
            (no_id, "text/csv", "text/csv", "req-1"),
            (three, "text/csv", "application/json", "req-2"),
            (json_id, "application/json", "text/csv", None),
            (anonymous, "application/json", "application/json", None),
        ],
    )
    assert len(lines) == 5
    versions_asked = []

    def model_for(version: str):
        versions_asked.append(version)
        return model

    frame, predictions, ids, versions, times = records.capture_rows(lines, model_for, "customer_id")
    assert ids == [*rows.iloc[:2]["customer_id"], "req-1", "req-2#0", "req-2#1", "req-2#2", "J,1", None]
    assert len(frame) == len(predictions) == 8 and versions == ["1"] * 8 and set(versions_asked) == {"1"}
    assert times == [r["timestamp"] for r, n in zip(lines, (2, 1, 3, 1, 1)) for _ in range(n)]
    assert (
        frame[features]
        .iloc[:2]
        .reset_index(drop=True)
        .astype(str)
        .equals(rows.iloc[:2][features].reset_index(drop=True).astype(str))
    )
    expected = model.predict_frame(pd.concat([rows.iloc[:6], rows.iloc[:2]])[features].reset_index(drop=True))
    assert predictions["prediction"].astype(str).tolist() == expected["prediction"].astype(str).tolist()
    for label in ("no", "yes"):
        assert predictions[f"proba_{label}"].to_numpy() == pytest.approx(expected[f"proba_{label}"].to_numpy())

    observed = records.observations(
        frame[features], predictions, ids=ids, model_version=versions, scored_at=times, source="capture", source_id="s1"
    )
    assert observed["_id"].tolist() == ids and observed["source"].unique().tolist() == ["capture"]
    assert {"prediction", "proba_no", "proba_yes", "model_version", "scored_at", "source_id"} <= set(observed.columns)


@pytest.mark.slow
def test_a_response_that_does_not_match_its_request_is_left_out(lake, churn_model):
    model = loaded_model(churn_model)
    features = model.feature_names
    body = churn_model["test"].iloc[:3][features].to_csv(index=False, header=False).encode()
    lines = captured(lake, model, [(body, "text/csv", "text/csv", "a"), (body, "text/csv", "application/json", "b")])
    answer = lines[0]["response"]["body"]["data"]
    lines[0]["response"]["body"]["data"] = "".join(answer.splitlines(keepends=True)[:2])  # 2 answers, 3 rows
    frame, predictions, ids, versions, _ = records.capture_rows(lines, lambda v: model, "customer_id")
    assert ids == ["b#0", "b#1", "b#2"] and len(frame) == len(predictions) == 3
    assert records.capture_rows(lines[:1], lambda v: model, "customer_id")[0].empty


def test_capture_groups_split_a_slice_by_the_version_that_answered():
    slices = [
        ("a@0-9", [{"version": "2", "n": 0}, {"version": "1", "n": 1}, {"version": 2, "n": 2}]),
        ("b@0-3", [{"version": "1", "n": 3}]),
        ("c@0-0", []),
    ]
    assert capture_groups(slices) == [
        ("a@0-9", "1", [{"version": "1", "n": 1}]),
        ("a@0-9", "2", [{"version": "2", "n": 0}, {"version": 2, "n": 2}]),
        ("b@0-3", "1", [{"version": "1", "n": 3}]),
    ]


# ------------------------------------------------------------------------------- batch runs


def test_unchecked_batch_runs_are_finished_and_not_yet_checked(lake):
    assert records.unchecked_batch_runs(lake, "churn") == []
    root = Path(lake.path("predictions", "churn").path)
    for run in ("run-b", "run-a", "running", "checked"):
        (root / run).mkdir(parents=True)
        if run != "running":
            (root / run / "_SUCCESS.json").write_text("{}")
    (root / "stray.parquet").write_bytes(b"")
    decisions.save_check(lake, "churn", {"source": "batch", "id": "checked", "rows": 1, "report": None, "error": None})
    assert records.unchecked_batch_runs(lake, "churn") == ["run-a", "run-b"]


def _resnet_handlers():
    """The resnet inference module's request decoding (no model needed for it)."""
    from conveyor.model import artifacts
    from scripts import load_script

    return load_script(artifacts.inference_code("resnet") / "inference.py", "resnet_inference_for_monitor")


def _png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_captured_image_requests_become_the_statistics_the_image_baseline_holds():
    import base64
    from types import SimpleNamespace

    from conveyor.model.metadata import Feature, ModelMetadata
    from conveyor.monitoring.drift import image_drift

    handlers = _resnet_handlers()
    red = _png((255, 0, 0), (32, 24))
    stats = records.image_request_stats(red, "image/png", handlers)
    assert stats.to_dict("records") == [
        pytest.approx(
            {
                "width": 32.0,
                "height": 24.0,
                "brightness": 76 / 255,
                "mean_red": 1.0,
                "mean_green": 0.0,
                "mean_blue": 0.0,
            },
            abs=1e-3,
        )
    ]
    body = json.dumps(
        {
            "instances": [
                {"b64": base64.b64encode(_png((0, 0, 255), (32, 24))).decode()},
                {"b64": base64.b64encode(red).decode()},
            ]
        }
    ).encode()
    assert len(records.image_request_stats(body, "application/json", handlers)) == 2
    with pytest.raises(ValueError, match="image"):
        records.image_request_stats(b"not an image", "image/png", handlers)

    # Captured lines of an image endpoint -> rows of statistics with their predictions and ids.
    def line(body: bytes, media: str, answer: list[str], inference_id: str | None) -> dict:
        encoded = {"encoding": "base64", "data": base64.b64encode(body).decode()}
        response = json.dumps({"predictions": [{"prediction": a, "probabilities": {a: 1.0}} for a in answer]})
        return {
            "version": "3",
            "timestamp": "2026-11-21T10:00:00+00:00",
            "inference_id": inference_id,
            "request": {"content_type": media, "body": encoded},
            "response": {"content_type": "application/json", "body": {"encoding": "text", "data": response}},
        }

    metadata = ModelMetadata(
        trainer="resnet",
        problem_type="multiclass",
        label="label",
        features=(Feature("image", "object"),),
        class_labels=["circle", "square"],
    )
    loaded = SimpleNamespace(handlers=handlers, metadata=metadata, model=None)
    features, predictions, ids, versions, _ = records.capture_rows(
        [line(red, "image/png", ["circle"], "img-1"), line(body, "application/json", ["square", "circle"], "img-2")],
        lambda version: loaded,
        None,
        images=True,
    )
    assert len(features) == 3 and ids == ["img-1", "img-2#0", "img-2#1"] and versions == ["3"] * 3
    assert predictions["prediction"].tolist() == ["circle", "square", "circle"]

    # Against a baseline of grey 32x24 images, pure red and blue images drift in brightness and colour.
    grey = {
        "kind": "numeric",
        "count": 50,
        "missing_rate": 0.0,
        "mean": 0.5,
        "std": 0.05,
        "min": 0.4,
        "max": 0.6,
        "quantiles": {"p01": 0.41, "p05": 0.42, "p25": 0.47, "p50": 0.5, "p75": 0.53, "p95": 0.58, "p99": 0.59},
        "histogram": {"edges": [0.4, 0.45, 0.5, 0.55, 0.6], "counts": [10, 15, 15, 10]},
    }
    size = {
        **grey,
        "mean": 32.0,
        "std": 0.0,
        "min": 32.0,
        "max": 32.0,
        "histogram": {"edges": [32.0, 32.0], "counts": [50]},
    }
    baseline = {
        "kind": "image",
        "width": size,
        "height": {
            **size,
            "mean": 24.0,
            "min": 24.0,
            "max": 24.0,
            "histogram": {"edges": [24.0, 24.0], "counts": [50]},
        },
        "brightness": grey,
        "pixel": {"channels": ["red", "green", "blue"], "mean": [0.5] * 3, "std": [0.1] * 3},
        "label_distribution": {"circle": 0.5, "square": 0.5},
    }
    report = image_drift(baseline, features, predictions["prediction"])
    assert {"brightness", "mean_red", "mean_green"} <= set(report["drifted_features"])
    assert "width" not in report["drifted_features"]


def test_labels_and_offsets_written_half_way_keep_the_old_ones_and_leave_no_temp_file(lake):
    """A full disk while the monitor rewrites its records (issue 17 item 10): the old labels and offsets stay whole."""
    import os
    import subprocess
    import sys
    import textwrap

    from conveyor.lake import read_json

    labels = pd.DataFrame({"id": ["C-1"], "label": ["yes"], "received_at": ["t"], "drop": ["f1"]})
    records.save_labels(lake, "churn", "f1", labels)
    offsets = lake.monitor("churn", "capture_offsets.json")
    write_json(offsets, {"v1/a.jsonl": 120})
    plugins = Path(__file__).resolve().parents[3] / "plugins"
    code = f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # files cannot grow past 20 kB: a full disk
        import pandas as pd
        from conveyor.lake import Lake, write_json
        from conveyor.monitoring import records
        lake = Lake({lake.root!r})
        ids = [f"C-{{n}}" for n in range(20_000)]
        many = pd.DataFrame({{"id": ids, "label": "no", "received_at": "t", "drop": "f1"}})
        offsets = {{f"v/{{n}}": n for n in range(5000)}}
        for write in (lambda: records.save_labels(lake, "churn", "f1", many),
                      lambda: write_json(lake.monitor("churn", "capture_offsets.json"), offsets)):
            try:
                write()
            except OSError as error:
                print("failed", error.errno)
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env)
    assert result.stdout.count("failed") == 2, result.stderr[-2000:]
    assert records.load_labels(lake, "churn").to_dict("records") == labels.to_dict("records")
    assert read_json(offsets) == {"v1/a.jsonl": 120}
    left = [p.name for p in Path(lake.monitor("churn").path).rglob("*") if p.name.endswith(".tmp")]
    assert left == []
