"""The monitor's records and decisions (conveyor.monitoring.records): the retraining decision and its cool-down,
the live metric, labelled rows for retraining, reading captured endpoint traffic (offsets, real model
requests and responses), history lines and unchecked batch runs.

(Named ``test_monitoring_records`` because ``tests/unit/reports/test_monitoring.py`` exists: two test
modules of one name cannot be collected in one session without packages.)"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conveyor.monitoring import records as monitoring
from conveyor.lake import write_json
from conveyor.spec import get_spec

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def spec():
    return get_spec("churn")


def with_monitor(spec, **changes):
    """The churn spec with other monitor settings."""
    return spec.model_copy(update={"monitor": spec.monitor.model_copy(update=changes)})


def check(share: float, drifted: list[str], features: int = 4, prediction: dict | None = None, source: str = "batch",
          ident: str = "run-1") -> dict:
    names = drifted + [f"f{i}" for i in range(features - len(drifted))]
    return {"source": source, "id": ident, "rows": 100, "error": None,
            "report": {"drift_share": share, "drifted_features": drifted, "features": {n: {} for n in names},
                       "prediction": prediction, "drifted": bool(drifted) or bool(prediction and prediction["drifted"])}}


NO_LIVE = {"metric": "roc_auc", "value": None, "labels": 0, "version": "1"}


# ---------------------------------------------------------------------------------- decide


def test_drift_share_above_the_limit_retrains_and_says_why(spec):
    s = with_monitor(spec, max_drift_share=0.25)
    decision = monitoring.decide(s, [check(0.5, ["contract", "tenure_months"])], NO_LIVE, [], NOW)
    assert decision["retrain"] is True and decision["suppressed_by_cooldown"] is False
    assert decision["reasons"] == ["data drift in batch run-1: 2 of 4 features drifted (50% > 25%): contract, tenure_months"]
    assert decision["last_trigger"] is None and decision["cooldown_until"] is None
    assert decision["at"] == NOW.isoformat()
    assert decision["thresholds"]["max_drift_share"] == 0.25 and decision["thresholds"]["cooldown_hours"] == 24
    json.dumps(decision, allow_nan=False)


def test_drift_share_at_or_below_the_limit_does_not(spec):
    s = with_monitor(spec, max_drift_share=0.25, retrain_on_prediction_drift=False)
    for share, drifted in ((0.25, ["a"]), (0.0, [])):
        decision = monitoring.decide(s, [check(share, drifted)], NO_LIVE, [], NOW)
        assert decision["retrain"] is False and decision["reasons"] == []
    errored = {"source": "input", "id": "x.csv", "rows": 0, "report": None, "error": "input x.csv: missing"}
    assert monitoring.decide(s, [errored], NO_LIVE, [], NOW)["reasons"] == []


def test_a_source_with_too_few_rows_gets_no_drift_verdict(spec):
    s = with_monitor(spec, max_drift_share=0.25, min_rows=100)
    small = check(1.0, ["a", "b", "c", "d"], prediction={"drifted": True, "reasons": ["psi 1.2 > 0.2"]}) | {"rows": 99}
    decision = monitoring.decide(s, [small], NO_LIVE, [], NOW)
    assert decision["retrain"] is False and decision["reasons"] == []
    assert decision["notes"] == ["batch run-1: 99 rows, fewer than monitor.min_rows (100): reported, no drift verdict"]
    assert monitoring.decide(s, [small | {"rows": 100}], NO_LIVE, [], NOW)["retrain"] is True


def test_prediction_drift_retrains_only_when_the_spec_says_so(spec):
    moved = {"drifted": True, "reasons": ["psi 0.412 > 0.2"]}
    checks = [check(0.0, [], prediction=moved, source="capture", ident="2026-03-10/1@0-10/v1")]
    on = monitoring.decide(with_monitor(spec, retrain_on_prediction_drift=True), checks, NO_LIVE, [], NOW)
    assert on["retrain"] and on["reasons"] == ["prediction drift in capture 2026-03-10/1@0-10/v1: psi 0.412 > 0.2"]
    off = monitoring.decide(with_monitor(spec, retrain_on_prediction_drift=False), checks, NO_LIVE, [], NOW)
    assert not off["retrain"] and off["reasons"] == []


def test_live_metric_counts_only_with_enough_new_labels(spec):
    s = with_monitor(spec, min_live_metric=0.65, min_new_labels=200)
    poor = {"metric": "roc_auc", "value": 0.58, "labels": 199, "version": "3"}
    assert monitoring.decide(s, [], poor, [], NOW)["retrain"] is False
    decision = monitoring.decide(s, [], poor | {"labels": 200}, [], NOW)
    assert decision["retrain"] is True
    assert decision["reasons"] == ["live roc_auc of version 3 is 0.5800 < 0.65 over 200 new labels (at least 200 needed)"]
    good = {"metric": "roc_auc", "value": 0.65, "labels": 5000, "version": "3"}
    assert monitoring.decide(s, [], good, [], NOW)["retrain"] is False  # not below
    assert monitoring.decide(s, [], poor | {"labels": 500, "value": None}, [], NOW)["retrain"] is False
    unset = with_monitor(spec, min_live_metric=None)
    assert monitoring.decide(unset, [], poor | {"labels": 500}, [], NOW)["retrain"] is False


def test_cool_down_suppresses_and_is_recorded(spec):
    s = with_monitor(spec, max_drift_share=0.25, cooldown_hours=24)
    fired = {"at": (NOW - timedelta(hours=6)).isoformat(), "retrain": True}
    older = {"at": (NOW - timedelta(hours=60)).isoformat(), "retrain": True}
    suppressed_before = {"at": (NOW - timedelta(hours=1)).isoformat(), "retrain": False}
    checks = [check(0.75, ["a", "b", "c"])]
    decision = monitoring.decide(s, checks, NO_LIVE, [older, fired, suppressed_before], NOW)
    assert decision["retrain"] is False and decision["suppressed_by_cooldown"] is True
    assert decision["reasons"]  # the reasons are kept although nothing fired
    assert decision["last_trigger"] == fired["at"]
    assert decision["cooldown_until"] == (NOW + timedelta(hours=18)).isoformat()
    later = monitoring.decide(s, checks, NO_LIVE, [older, fired], NOW + timedelta(hours=19))
    assert later["retrain"] is True and later["suppressed_by_cooldown"] is False
    calm = monitoring.decide(s, [check(0.0, [])], NO_LIVE, [fired], NOW)
    assert calm["suppressed_by_cooldown"] is False and calm["retrain"] is False  # nothing to suppress
    assert monitoring.last_fired([suppressed_before]) is None


# ------------------------------------------------------------------------------ live metric


def labelled_rows(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 120
    truth = rng.choice(["no", "yes"], n, p=[0.6, 0.4])
    p_yes = np.clip(np.where(truth == "yes", 0.65, 0.35) + rng.normal(0, 0.25, n), 0, 1)
    days = np.array(["2026-03-01T08:00:00+00:00", "2026-03-02T23:59:00+00:00", "2026-03-02T01:00:00+01:00"])[
        np.arange(n) % 3]
    return pd.DataFrame({
        "_id": [f"C-{i}" for i in range(n)], "_label": truth, "prediction": np.where(p_yes >= 0.5, "yes", "no"),
        "proba_no": 1 - p_yes, "proba_yes": p_yes, "scored_at": days,
        "model_version": np.where(np.arange(n) < 90, "1", "2"), "tenure_months": np.arange(n),
    })


def test_score_is_the_binary_roc_auc_from_probabilities():
    from sklearn.metrics import roc_auc_score

    rows = labelled_rows()
    value = monitoring.score(rows, "binary", "roc_auc", ["no", "yes"], "yes")
    assert value == pytest.approx(roc_auc_score(rows["_label"] == "yes", rows["proba_yes"]))
    accuracy = monitoring.score(rows, "binary", "accuracy", ["no", "yes"], "yes")
    assert accuracy == pytest.approx((rows["_label"] == rows["prediction"]).mean())
    assert monitoring.score(rows.iloc[0:0], "binary", "roc_auc", ["no", "yes"], "yes") is None
    one_class = rows[rows["_label"] == "yes"]
    assert monitoring.score(one_class, "binary", "roc_auc", ["no", "yes"], "yes") is None


def test_score_of_a_regressor():
    rows = pd.DataFrame({"_label": ["1.0", "2.0", "4.0"], "prediction": ["1.5", "2.0", "3.0"]})
    rmse = monitoring.score(rows, "regression", "rmse", None, None)
    assert rmse == pytest.approx(np.sqrt((0.25 + 0 + 1) / 3))


def test_live_series_per_day_and_version():
    from sklearn.metrics import roc_auc_score

    rows = labelled_rows()
    series = monitoring.live_series(rows, "binary", "roc_auc", ["no", "yes"], "yes")
    # "2026-03-02T01:00:00+01:00" is 2026-03-02 00:00 UTC: the same UTC day as 23:59 UTC
    days = pd.to_datetime(rows["scored_at"], utc=True).dt.strftime("%Y-%m-%d")
    assert [(s["day"], s["model_version"]) for s in series] == [
        ("2026-03-01", "1"), ("2026-03-01", "2"), ("2026-03-02", "1"), ("2026-03-02", "2")]
    for line in series:
        group = rows[(days == line["day"]) & (rows["model_version"] == line["model_version"])]
        assert line["labels"] == len(group) and line["metric"] == "roc_auc"
        assert line["value"] == pytest.approx(roc_auc_score(group["_label"] == "yes", group["proba_yes"]))
    assert sum(line["labels"] for line in series) == len(rows)
    assert monitoring.live_series(rows.iloc[0:0], "binary", "roc_auc", ["no", "yes"], "yes") == []
    single = rows.assign(_label="no")
    assert {line["value"] for line in monitoring.live_series(single, "binary", "roc_auc", ["no", "yes"], "yes")} == {None}


def test_joined_takes_the_first_observation_of_an_id():
    observed = pd.DataFrame({"_id": ["a", None, "b", "a", "c"], "prediction": ["yes", "no", "no", "no", "yes"],
                             "source_id": ["r1", "r1", "r1", "r2", "r2"]})
    labels = pd.DataFrame({"id": ["a", "b", "zzz"], "label": ["yes", "yes", "no"],
                           "received_at": ["t"] * 3, "drop": ["f1"] * 3})
    rows = monitoring.joined(observed, labels)
    assert list(zip(rows["_id"], rows["prediction"], rows["source_id"], rows["_label"])) == [
        ("a", "yes", "r1", "yes"), ("b", "no", "r1", "yes")]
    assert monitoring.joined(None, labels).empty
    assert monitoring.joined(observed, labels.iloc[0:0]).empty


def test_labelled_training_rows_are_features_id_and_label():
    rows = labelled_rows().iloc[:3]
    frame = monitoring.labelled_training_rows(rows, ["tenure_months"], "churned", "customer_id")
    assert list(frame.columns) == ["tenure_months", "customer_id", "churned"]
    assert frame["customer_id"].tolist() == ["C-0", "C-1", "C-2"] and frame["churned"].tolist() == rows["_label"].tolist()
    assert list(monitoring.labelled_training_rows(rows, ["tenure_months"], "churned", None).columns) == [
        "tenure_months", "churned"]


# ------------------------------------------------------------------------ with labelled rows


def write_rows(tmp_path: Path, frame: pd.DataFrame) -> str:
    path = tmp_path / "retrain" / "labelled.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path.as_uri()


def dataset() -> pd.DataFrame:
    return pd.DataFrame({"customer_id": [101, 102, 103], "tenure_months": [1, 2, 3], "churned": ["no", "no", "yes"]})


def test_labelled_rows_are_added_and_replace_rows_of_the_same_id(tmp_path, spec):
    uri = write_rows(tmp_path, pd.DataFrame({"tenure_months": [20, 30], "customer_id": ["102", "900"],
                                             "churned": ["yes", "no"], "_extra": [1, 2]}))
    rows, added = monitoring.with_labelled_rows(dataset(), uri, spec)
    assert added == 2
    assert rows.to_dict("records") == [
        {"customer_id": 101, "tenure_months": 1, "churned": "no"}, {"customer_id": 103, "tenure_months": 3, "churned": "yes"},
        {"customer_id": 102, "tenure_months": 20, "churned": "yes"}, {"customer_id": 900, "tenure_months": 30, "churned": "no"}]
    assert str(rows["customer_id"].dtype) == "int64"  # ids came back as text; cast to the dataset's type


def test_labels_read_as_text_are_cast_to_the_datasets_label_type(tmp_path, spec):
    frame = pd.DataFrame({"customer_id": [1, 2], "tenure_months": [5, 6], "churned": [True, False]})
    uri = write_rows(tmp_path, pd.DataFrame({"customer_id": ["3", "4", "5", "6"], "tenure_months": ["7", "8", "9", "10"],
                                             "churned": ["True", "false", "1", " 0 "]}))
    rows, added = monitoring.with_labelled_rows(frame, uri, spec)
    assert added == 4 and rows["churned"].dtype == bool
    assert rows["churned"].tolist() == [True, False, True, False, True, False]
    assert rows["tenure_months"].tolist() == [5, 6, 7, 8, 9, 10]

    bad = write_rows(tmp_path, pd.DataFrame({"customer_id": ["3"], "tenure_months": ["7"], "churned": ["maybe"]}))
    with pytest.raises(monitoring.LabelledRowsError, match="labels cannot be read as the dataset's label type bool"):
        monitoring.with_labelled_rows(frame, bad, spec)
    numeric = pd.DataFrame({"customer_id": [1], "tenure_months": [5], "churned": [0.5]})
    text = write_rows(tmp_path, pd.DataFrame({"customer_id": ["3"], "tenure_months": ["7"], "churned": ["high"]}))
    with pytest.raises(monitoring.LabelledRowsError, match=r"labelled.parquet: labels cannot be read .* float64"):
        monitoring.with_labelled_rows(numeric, text, spec)


def test_labelled_rows_lacking_a_column_or_unreadable_are_refused(tmp_path, spec):
    uri = write_rows(tmp_path, pd.DataFrame({"customer_id": ["9"], "churned": ["yes"]}))
    with pytest.raises(monitoring.LabelledRowsError, match=r"lack dataset column\(s\) \['tenure_months'\]"):
        monitoring.with_labelled_rows(dataset(), uri, spec)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(monitoring.LabelledRowsError, match=r"garbage.parquet: labelled rows cannot be read \("):
        monitoring.with_labelled_rows(dataset(), garbage.as_uri(), spec)
    with pytest.raises(monitoring.LabelledRowsError, match="cannot be read"):
        monitoring.with_labelled_rows(dataset(), (tmp_path / "absent.parquet").as_uri(), spec)


# ---------------------------------------------------------------------------------- capture


def test_capture_slices_take_whole_lines_and_continue_from_the_offset(lake):
    root = Path(lake.capture("churn").path)
    first = root / "2026-03-01" / "111.jsonl"
    first.parent.mkdir(parents=True)
    lines = [json.dumps({"n": n}) + "\n" for n in range(3)]
    first.write_text("".join(lines) + '{"n": 3, "pa')
    assert monitoring.capture_slices(lake, "missing") == ([], {})

    slices, offsets = monitoring.capture_slices(lake, "churn")
    end = len("".join(lines).encode())
    assert slices == [(f"2026-03-01/111@0-{end}", [{"n": 0}, {"n": 1}, {"n": 2}])]
    assert offsets == {"2026-03-01/111.jsonl": end}
    # Until the monitor records the offsets, the same lines are offered again (a failed run loses nothing).
    assert monitoring.capture_slices(lake, "churn")[0] == slices
    write_json(lake.monitor("churn", "capture_offsets.json"), offsets)
    assert monitoring.capture_slices(lake, "churn") == ([], offsets)  # only a partial line is new

    with first.open("a") as handle:
        handle.write('rt": 1}\n{"n": 4}\n')
    second = root / "2026-03-02" / "222.jsonl"
    second.parent.mkdir()
    second.write_text('{"n": 5}\n')
    slices, offsets = monitoring.capture_slices(lake, "churn")
    total = first.stat().st_size
    assert slices == [(f"2026-03-01/111@{end}-{total}", [{"n": 3, "part": 1}, {"n": 4}]),
                      ("2026-03-02/222@0-9", [{"n": 5}])]
    assert offsets == {"2026-03-01/111.jsonl": total, "2026-03-02/222.jsonl": 9}


def test_a_corrupt_capture_line_is_left_out_not_fatal(lake):
    path = Path(lake.capture("churn").path) / "2026-03-01" / "1.jsonl"
    path.parent.mkdir(parents=True)
    # a worker killed half-way through a line, then the next line appended after it
    path.write_text('{"n": 0}\n{"n": 1, "tr{"n": 2}\n["not", "a record"]\n{"n": 3}\n')
    slices, offsets = monitoring.capture_slices(lake, "churn")
    assert [records for _, records in slices] == [[{"n": 0}, {"n": 3}]]
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
    slices, _ = monitoring.capture_slices(lake, "churn")
    return [record for _, records in slices for record in records]


@pytest.mark.slow
def test_capture_rows_parse_real_requests_and_responses(lake, churn_model):
    model = loaded_model(churn_model)
    test = churn_model["test"]
    features = model.feature_names
    rows = test.iloc[:6]
    with_id = rows.iloc[:2][["customer_id", *features]].to_csv(index=False).encode()  # header + id column
    no_id = rows.iloc[2:3][features].to_csv(index=False, header=False).encode()
    three = rows.iloc[3:6][features].to_csv(index=False, header=False).encode()
    json_id = json.dumps({"instances": [{**rows.iloc[0][features].to_dict(), "customer_id": "J,1"}]},
                         default=lambda v: v.item()).encode()
    anonymous = json.dumps({"instances": [rows.iloc[1][features].to_dict()]}, default=lambda v: v.item()).encode()
    records = captured(lake, model, [
        (with_id, "text/csv", "text/csv", "ignored-because-the-id-column-is-there"),
        (no_id, "text/csv", "text/csv", "req-1"),
        (three, "text/csv", "application/json", "req-2"),
        (json_id, "application/json", "text/csv", None),
        (anonymous, "application/json", "application/json", None),
    ])
    assert len(records) == 5
    versions_asked = []

    def model_for(version: str):
        versions_asked.append(version)
        return model

    frame, predictions, ids, versions, times = monitoring.capture_rows(records, model_for, "customer_id")
    assert ids == [*rows.iloc[:2]["customer_id"], "req-1", "req-2#0", "req-2#1", "req-2#2", "J,1", None]
    assert len(frame) == len(predictions) == 8 and versions == ["1"] * 8 and set(versions_asked) == {"1"}
    assert times == [r["timestamp"] for r, n in zip(records, (2, 1, 3, 1, 1)) for _ in range(n)]
    assert frame[features].iloc[:2].reset_index(drop=True).astype(str).equals(
        rows.iloc[:2][features].reset_index(drop=True).astype(str))
    expected = model.predict_frame(pd.concat([rows.iloc[:6], rows.iloc[:2]])[features].reset_index(drop=True))
    assert predictions["prediction"].astype(str).tolist() == expected["prediction"].astype(str).tolist()
    for label in ("no", "yes"):
        assert predictions[f"proba_{label}"].to_numpy() == pytest.approx(expected[f"proba_{label}"].to_numpy())

    observed = monitoring.observations(frame[features], predictions, ids=ids, model_version=versions, scored_at=times,
                                       source="capture", source_id="s1")
    assert observed["_id"].tolist() == ids and observed["source"].unique().tolist() == ["capture"]
    assert {"prediction", "proba_no", "proba_yes", "model_version", "scored_at", "source_id"} <= set(observed.columns)


@pytest.mark.slow
def test_a_response_that_does_not_match_its_request_is_left_out(lake, churn_model):
    model = loaded_model(churn_model)
    features = model.feature_names
    body = churn_model["test"].iloc[:3][features].to_csv(index=False, header=False).encode()
    records = captured(lake, model, [(body, "text/csv", "text/csv", "a"), (body, "text/csv", "application/json", "b")])
    answer = records[0]["response"]["body"]["data"]
    records[0]["response"]["body"]["data"] = "".join(answer.splitlines(keepends=True)[:2])  # 2 answers, 3 rows
    frame, predictions, ids, versions, _ = monitoring.capture_rows(records, lambda v: model, "customer_id")
    assert ids == ["b#0", "b#1", "b#2"] and len(frame) == len(predictions) == 3
    assert monitoring.capture_rows(records[:1], lambda v: model, "customer_id")[0].empty


# ------------------------------------------------------------------------- history, batch runs


def test_history_record_summarises_a_check():
    at = NOW.isoformat()
    report = {"drift_share": 0.5, "drifted_features": ["a"], "drifted": True, "prediction": {"psi": 0.31},
              "features": {"a": {"psi": 0.9}, "b": {"psi": 0.05}, "c": {"psi": None}}}
    line = monitoring.history_record({"source": "batch", "id": "r1", "rows": 10, "report": report, "error": None}, at)
    assert line == {"at": at, "source": "batch", "id": "r1", "rows": 10, "drift_share": 0.5, "drifted_features": ["a"],
                    "max_psi": 0.9, "prediction_psi": 0.31, "drifted": True, "error": None}
    failed = monitoring.history_record({"source": "input", "id": "x", "report": None, "error": "x: no rows"}, at)
    assert failed == {"at": at, "source": "input", "id": "x", "rows": 0, "drift_share": None, "drifted_features": [],
                      "max_psi": None, "prediction_psi": None, "drifted": False, "error": "x: no rows"}


def test_unchecked_batch_runs_are_finished_and_not_yet_checked(lake):
    assert monitoring.unchecked_batch_runs(lake, "churn") == []
    root = Path(lake.path("predictions", "churn").path)
    for run in ("run-b", "run-a", "running", "checked"):
        (root / run).mkdir(parents=True)
        if run != "running":
            (root / run / "_SUCCESS.json").write_text("{}")
    (root / "stray.parquet").write_bytes(b"")
    monitoring.save_check(lake, "churn", {"source": "batch", "id": "checked", "rows": 1, "report": None, "error": None})
    assert monitoring.unchecked_batch_runs(lake, "churn") == ["run-a", "run-b"]


def _resnet_handlers():
    """The resnet inference module's request decoding (no model needed for it)."""
    import importlib.util

    from conveyor.model import artifacts

    path = artifacts.inference_code("resnet") / "inference.py"
    spec = importlib.util.spec_from_file_location("resnet_inference_for_monitor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_captured_image_requests_become_the_statistics_the_image_baseline_holds():
    import base64
    from types import SimpleNamespace

    from conveyor.monitoring.drift import image_drift

    handlers = _resnet_handlers()
    red = _png((255, 0, 0), (32, 24))
    stats = monitoring.image_request_stats(red, "image/png", handlers)
    assert stats.to_dict("records") == [pytest.approx({"width": 32.0, "height": 24.0, "brightness": 76 / 255,
                                                       "mean_red": 1.0, "mean_green": 0.0, "mean_blue": 0.0}, abs=1e-3)]
    body = json.dumps({"instances": [{"b64": base64.b64encode(_png((0, 0, 255), (32, 24))).decode()},
                                     {"b64": base64.b64encode(red).decode()}]}).encode()
    assert len(monitoring.image_request_stats(body, "application/json", handlers)) == 2
    with pytest.raises(ValueError, match="image"):
        monitoring.image_request_stats(b"not an image", "image/png", handlers)

    # Captured lines of an image endpoint -> rows of statistics with their predictions and ids.
    def line(body: bytes, media: str, answer: list[str], inference_id: str | None) -> dict:
        encoded = {"encoding": "base64", "data": base64.b64encode(body).decode()}
        response = json.dumps({"predictions": [{"prediction": a, "probabilities": {a: 1.0}} for a in answer]})
        return {"version": "3", "timestamp": "2026-11-21T10:00:00+00:00", "inference_id": inference_id,
                "request": {"content_type": media, "body": encoded},
                "response": {"content_type": "application/json", "body": {"encoding": "text", "data": response}}}

    loaded = SimpleNamespace(handlers=handlers, metadata={"class_labels": ["circle", "square"]}, model=None)
    features, predictions, ids, versions, _ = monitoring.capture_rows(
        [line(red, "image/png", ["circle"], "img-1"), line(body, "application/json", ["square", "circle"], "img-2")],
        lambda version: loaded, None, images=True)
    assert len(features) == 3 and ids == ["img-1", "img-2#0", "img-2#1"] and versions == ["3"] * 3
    assert predictions["prediction"].tolist() == ["circle", "square", "circle"]

    # Against a baseline of grey 32x24 images, pure red and blue images drift in brightness and colour.
    grey = {"kind": "numeric", "count": 50, "missing_rate": 0.0, "mean": 0.5, "std": 0.05, "min": 0.4, "max": 0.6,
            "quantiles": {"p01": 0.41, "p05": 0.42, "p25": 0.47, "p50": 0.5, "p75": 0.53, "p95": 0.58, "p99": 0.59},
            "histogram": {"edges": [0.4, 0.45, 0.5, 0.55, 0.6], "counts": [10, 15, 15, 10]}}
    size = {**grey, "mean": 32.0, "std": 0.0, "min": 32.0, "max": 32.0, "histogram": {"edges": [32.0, 32.0], "counts": [50]}}
    baseline = {"kind": "image", "width": size, "height": {**size, "mean": 24.0, "min": 24.0, "max": 24.0,
                                                           "histogram": {"edges": [24.0, 24.0], "counts": [50]}},
                "brightness": grey, "pixel": {"channels": ["red", "green", "blue"], "mean": [0.5] * 3, "std": [0.1] * 3},
                "label_distribution": {"circle": 0.5, "square": 0.5}}
    report = image_drift(baseline, features, predictions["prediction"])
    assert {"brightness", "mean_red", "mean_green"} <= set(report["drifted_features"])
    assert "width" not in report["drifted_features"]
