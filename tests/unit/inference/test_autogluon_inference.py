"""The AutoGluon tabular inference handlers on a real (tiny) model trained once for this module:
request parsing (CSV and JSON shapes), dtype coercion, predictions, serialisation, and the clear
errors bad requests get."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conveyor.demo import churn_frame
from scripts import load_script, script_env

PROJECT = Path(__file__).resolve().parents[3]
TRAIN_PY = PROJECT / "include" / "training" / "autogluon_tabular" / "train.py"
FEATURES = [
    "tenure_months",
    "monthly_charges",
    "total_charges",
    "contract",
    "payment_method",
    "internet_service",
    "support_calls",
    "age",
    "region",
]
TINY_GBM = '{"GBM": {"num_boost_round": 40}}'

pytestmark = pytest.mark.slow  # every test here needs the trained model


inference = load_script("include/inference/autogluon_tabular/inference.py", "autogluon_tabular_inference")


def train(root: Path, frame: pd.DataFrame, *flags: str) -> Path:
    """Train with train.py in a child process (SM_* variables, as the local backend does); the model dir."""
    (root / "train").mkdir(parents=True)
    (root / "validation").mkdir()
    cut = int(len(frame) * 0.75)
    frame.iloc[:cut].to_parquet(root / "train" / "train.parquet", index=False)
    frame.iloc[cut:].to_parquet(root / "validation" / "validation.parquet", index=False)
    env = script_env({k: v for k, v in os.environ.items() if not k.startswith("SM_")}) | {
        "SM_CHANNEL_TRAIN": str(root / "train"),
        "SM_CHANNEL_VALIDATION": str(root / "validation"),
        "SM_MODEL_DIR": str(root / "model"),
        "SM_OUTPUT_DATA_DIR": str(root / "output"),
    }
    result = subprocess.run(
        [sys.executable, str(TRAIN_PY), "--time-limit", "15", "--hyperparameters", TINY_GBM, *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "model"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return train(
        tmp_path_factory.mktemp("ag-serve"),
        churn_frame(300),
        "--label",
        "churned",
        "--problem-type",
        "binary",
        "--id-column",
        "customer_id",
    )


@pytest.fixture(scope="module")
def model(model_dir):
    return inference.model_fn(str(model_dir))


@pytest.fixture(scope="module")
def requests() -> pd.DataFrame:
    """Unseen customers (another seed), with some missing total_charges and region."""
    return churn_frame(40, seed=11).drop(columns=["churned"])


def csv_body(frame: pd.DataFrame, header: bool = False) -> str:
    return frame.to_csv(header=header, index=False)


def records(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready records, missing values as null."""
    return json.loads(frame.to_json(orient="records"))


def assert_probabilities(prediction: pd.DataFrame) -> None:
    proba = prediction[["proba_no", "proba_yes"]].to_numpy()
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert ((proba >= 0) & (proba <= 1)).all()


# ------------------------------------------------------------------------------------ loading


def test_model_fn_loads_the_predictor_and_its_schema(model, model_dir):
    assert model.features == FEATURES
    assert model.class_labels == ["no", "yes"]
    assert model.id_column == "customer_id"
    written = json.loads((model_dir / "metadata.json").read_text())
    assert model.metadata == inference.conveyor_metadata.read(model_dir)
    assert {k: v for k, v in model.metadata.to_dict().items() if k in written} == written  # every key as written
    assert model.metadata.feature_names == FEATURES and model.metadata.id_column == "customer_id"
    assert model.predictor.model_best == model.metadata.best_model
    assert model.predictor.is_fit


# -------------------------------------------------------------------------------------- CSV


def test_csv_round_trip_in_feature_order(model, requests):
    data = inference.input_fn(csv_body(requests[FEATURES]), "text/csv")
    assert list(data.columns) == FEATURES
    assert str(data["tenure_months"].dtype) == "int64" and str(data["age"].dtype) == "int64"
    assert str(data["monthly_charges"].dtype) == "float64"
    assert data["total_charges"].isna().sum() == requests["total_charges"].isna().sum()
    assert data["region"].isna().sum() == requests["region"].isna().sum()

    prediction = inference.predict_fn(data, model)
    assert list(prediction.columns) == ["prediction", "proba_no", "proba_yes"]
    assert len(prediction) == len(requests)
    assert set(prediction["prediction"]) <= {"no", "yes"}
    assert_probabilities(prediction)
    direct = model.predictor.predict(requests[FEATURES])
    assert prediction["prediction"].tolist() == direct.tolist()

    body = inference.output_fn(prediction, "text/csv")
    lines = body.strip().split("\n")
    assert len(lines) == len(requests)
    first = lines[0].split(",")
    assert first[0] == prediction["prediction"][0]
    assert float(first[1]) == pytest.approx(prediction["proba_no"][0])
    assert float(first[2]) == pytest.approx(prediction["proba_yes"][0])


def test_csv_with_header_takes_columns_in_any_order_and_carries_the_id(model, requests):
    shuffled = requests[["customer_id", *reversed(FEATURES)]]
    data = inference.input_fn(csv_body(shuffled, header=True).encode(), "text/csv; charset=utf-8")
    assert list(data.columns) == [*FEATURES, "customer_id"]
    prediction = inference.predict_fn(data, model)
    assert list(prediction.columns) == ["customer_id", "prediction", "proba_no", "proba_yes"]
    plain = inference.predict_fn(inference.input_fn(csv_body(requests[FEATURES]), "text/csv"), model)
    assert prediction["prediction"].tolist() == plain["prediction"].tolist()

    rows = list(
        pd.read_csv(io.StringIO(inference.output_fn(prediction, "text/csv")), header=None).itertuples(index=False)
    )
    assert [row[0] for row in rows] == requests["customer_id"].tolist()
    answer = json.loads(inference.output_fn(prediction, "application/json"))
    assert [p["id"] for p in answer["predictions"]] == requests["customer_id"].tolist()


def test_csv_empty_fields_are_missing_values(model):
    data = inference.input_fn("12,70.5,,month-to-month,card,fiber,3,40,\n", "text/csv")
    assert math.isnan(data["total_charges"][0]) and data["region"][0] is None
    assert_probabilities(inference.predict_fn(data, model))


def test_csv_row_with_wrong_number_of_fields_names_the_counts():
    body = "12,70.5,800,month-to-month,card,fiber,3,40,north\n12,70.5,800,month-to-month,card,fiber,3,40\n"
    with pytest.raises(ValueError) as error:
        inference.input_fn(body, "text/csv")
    assert str(error.value) == ("text/csv: row 2 has 8 values; the model expects 9 features: " + ", ".join(FEATURES))


def test_csv_header_missing_a_feature_names_it(requests):
    with pytest.raises(ValueError, match=r"text/csv: the header lacks features: age, region$"):
        inference.input_fn(csv_body(requests.drop(columns=["age", "region"]), header=True), "text/csv")


def test_csv_value_that_is_not_a_number_names_feature_and_row():
    body = "12,70.5,800,month-to-month,card,fiber,3,40,north\n12,lots,800,month-to-month,card,fiber,3,40,north\n"
    with pytest.raises(ValueError, match=r"text/csv: feature 'monthly_charges' takes a number; row 2 has 'lots'"):
        inference.input_fn(body, "text/csv")


def test_malformed_or_empty_csv_is_refused():
    with pytest.raises(ValueError, match="text/csv: malformed CSV"):
        inference.input_fn('12,70.5,800,"month-to-month,card\n', "text/csv")
    with pytest.raises(ValueError, match="text/csv: empty input"):
        inference.input_fn(b"\n\n", "text/csv")


# ------------------------------------------------------------------------------------- JSON


def test_json_instances_round_trip(model, requests):
    body = json.dumps({"instances": records(requests)})
    data = inference.input_fn(body.encode(), "application/json")
    assert list(data.columns) == [*FEATURES, "customer_id"]
    prediction = inference.predict_fn(data, model)
    answer = json.loads(inference.output_fn(prediction, "application/json"))["predictions"]
    assert len(answer) == len(requests)
    assert [p["id"] for p in answer] == requests["customer_id"].tolist()
    for item in answer:
        assert item["prediction"] in ("no", "yes")
        assert set(item["probabilities"]) == {"no", "yes"}
        assert sum(item["probabilities"].values()) == pytest.approx(1.0)
    direct = model.predictor.predict(requests[FEATURES])
    assert [p["prediction"] for p in answer] == direct.tolist()


def test_json_shapes_give_the_same_predictions(model, requests):
    frame = requests[FEATURES].iloc[:5]
    split = json.loads(frame.to_json(orient="split", index=False))
    bodies = [
        json.dumps({"instances": records(frame)}),
        json.dumps(records(frame)),
        json.dumps({"columns": split["columns"], "data": split["data"]}),
        json.dumps({"instances": split["data"]}),  # lists of values in feature order
    ]
    answers = [inference.predict_fn(inference.input_fn(b, "application/json"), model) for b in bodies]
    for answer in answers[1:]:
        pd.testing.assert_frame_equal(answer, answers[0])
    single = inference.input_fn(json.dumps(records(frame)[0]), "application/json")
    assert len(single) == 1


def test_json_values_are_coerced_to_training_dtypes(model):
    record = {
        "tenure_months": "12",
        "monthly_charges": "70.5",
        "total_charges": "",
        "contract": "month-to-month",
        "payment_method": "card",
        "internet_service": "fiber",
        "support_calls": 3,
        "age": 40.0,
        "region": None,
        "unknown_column": "ignored",
    }
    data = inference.input_fn(json.dumps([record]), "application/json")
    assert list(data.columns) == FEATURES
    assert data["tenure_months"][0] == 12 and str(data["tenure_months"].dtype) == "int64"
    assert str(data["age"].dtype) == "int64"
    assert math.isnan(data["total_charges"][0]) and data["region"][0] is None
    assert_probabilities(inference.predict_fn(data, model))


def test_json_record_missing_a_feature_names_it(requests):
    broken = records(requests.iloc[:3])
    del broken[1]["contract"]
    with pytest.raises(ValueError, match=r"application/json: instance 2 lacks features: contract"):
        inference.input_fn(json.dumps({"instances": broken}), "application/json")
    with pytest.raises(ValueError, match=r'application/json: "columns" lacks features: tenure_months'):
        inference.input_fn(json.dumps({"columns": FEATURES[1:], "data": [[1] * 8]}), "application/json")


def test_json_nested_too_deeply_is_a_bad_request(model):
    deep = "[" * 100_000 + "]" * 100_000  # a RecursionError in json.loads before (answered 500)
    with pytest.raises(ValueError, match="application/json: the body nests arrays or objects too deeply to parse"):
        inference.input_fn(deep, "application/json")
    with pytest.raises(ValueError, match="too deeply"):
        inference.input_fn(('{"instances": ' + "[" * 100_000 + "]" * 100_000 + "}").encode(), "application/json")


def test_json_row_with_wrong_number_of_values_names_the_counts():
    with pytest.raises(ValueError, match=r"application/json: instance 1 has 3 values; the model expects 9 features"):
        inference.input_fn(json.dumps({"instances": [[1, 2, 3]]}), "application/json")


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        ('{"instances": [', "malformed JSON"),
        ("", "empty input"),
        ('{"instances": []}', "empty input"),
        ('"a string"', "expected"),
        ('{"instances": [1, 2]}', "instance 1 is a JSON int"),
    ],
)
def test_bad_json_is_refused(body, rule):
    with pytest.raises(ValueError, match=rule) as error:
        inference.input_fn(body, "application/json")
    assert str(error.value).startswith("application/json: ")
    assert not isinstance(error.value, inference.UnsupportedContentType)


# ------------------------------------------------------------------------- content types


def test_unsupported_content_type_has_its_own_exception():
    with pytest.raises(inference.UnsupportedContentType, match="'application/x-npy' is not supported"):
        inference.input_fn(b"\x93NUMPY", "application/x-npy")
    assert issubclass(inference.UnsupportedContentType, ValueError)


def test_accept_chooses_the_output_format(model, requests):
    prediction = inference.predict_fn(inference.input_fn(csv_body(requests[FEATURES].iloc[:2]), "text/csv"), model)
    for accept in (None, "", "*/*", "application/json", "application/json; charset=utf-8"):
        assert "predictions" in json.loads(inference.output_fn(prediction, accept))
    assert inference.output_fn(prediction, "text/csv, application/json").count("\n") == 2
    with pytest.raises(inference.UnsupportedContentType, match="accept 'application/xml'"):
        inference.output_fn(prediction, "application/xml")


def test_predict_fn_refuses_data_without_the_features(model, requests):
    with pytest.raises(ValueError, match="predict_fn: the data lacks features: region"):
        inference.predict_fn(requests.drop(columns=["region"]), model)


def test_predict_fn_takes_any_column_order_and_leaves_the_frame_alone(model, requests):
    exact = requests[FEATURES].reset_index(drop=True)
    shuffled = requests[["customer_id", *reversed(FEATURES)]].assign(extra=1).set_index(exact.index + 100)
    before = shuffled.copy()
    plain, reordered = inference.predict_fn(exact, model), inference.predict_fn(shuffled, model)
    pd.testing.assert_frame_equal(reordered.drop(columns=["customer_id"]), plain)
    assert reordered.columns[0] == "customer_id" and reordered.index.equals(pd.RangeIndex(len(requests)))
    assert reordered["customer_id"].tolist() == requests["customer_id"].tolist()
    pd.testing.assert_frame_equal(shuffled, before)  # the input is not changed


def test_predict_fn_refuses_an_id_column_named_like_an_output(model, requests):
    clash = copy.copy(model)
    object.__setattr__(clash, "id_column", "prediction")
    with pytest.raises(ValueError, match="the id column 'prediction' has the name of an output column"):
        inference.predict_fn(requests[FEATURES].assign(prediction="x"), clash)


def test_input_fn_needs_a_loaded_model(monkeypatch):
    monkeypatch.setattr(inference, "_loaded", None)
    with pytest.raises(RuntimeError, match="model_fn must run first"):
        inference.input_fn("1,2", "text/csv")


# ------------------------------------------------------------------------------ multiclass


def test_multiclass_model_smoke(tmp_path, monkeypatch, model):
    monkeypatch.setattr(inference, "_loaded", inference._loaded)  # keep the binary model loaded afterwards
    frame = churn_frame(240, seed=3).drop(columns=["churned"])
    model_dir = train(
        tmp_path, frame, "--label", "contract", "--problem-type", "multiclass", "--id-column", "customer_id"
    )
    multiclass = inference.model_fn(str(model_dir))
    classes = ["month-to-month", "one-year", "two-year"]
    assert multiclass.class_labels == classes
    features = [f for f in FEATURES if f != "contract"]
    body = json.dumps({"instances": records(frame[["customer_id", *features]].iloc[:7])})
    prediction = inference.predict_fn(inference.input_fn(body, "application/json"), multiclass)
    assert list(prediction.columns) == ["customer_id", "prediction", *[f"proba_{c}" for c in classes]]
    assert np.allclose(prediction[[f"proba_{c}" for c in classes]].sum(axis=1), 1.0)
    answer = json.loads(inference.output_fn(prediction, None))["predictions"]
    assert all(set(p["probabilities"]) == set(classes) and p["prediction"] in classes for p in answer)


def test_transform_fn_answers_a_whole_request_as_the_autogluon_container_calls_it(model, requests):
    body, media = inference.transform_fn(model, csv_body(requests[FEATURES]), "text/csv", "application/json")
    assert media == "application/json"
    answer = json.loads(body)["predictions"]
    expected = inference.predict_fn(inference.input_fn(csv_body(requests[FEATURES]), "text/csv"), model)
    assert [r["prediction"] for r in answer] == expected["prediction"].tolist()
    with pytest.raises(ValueError):
        inference.transform_fn(model, "1,2\n", "text/csv", "text/csv")


# ------------------------------------------------------------------------------------ batches


def test_predict_batch_gives_each_request_what_predict_fn_alone_gives_it(model, requests):
    with_ids = inference.parse_request(csv_body(requests.head(3), header=True), "text/csv", model)
    without_ids = inference.parse_request(csv_body(requests.iloc[3:8][FEATURES]), "text/csv", model)
    single = inference.parse_request(json.dumps(records(requests.iloc[[8]][FEATURES])), "application/json", model)
    inputs = [with_ids, without_ids, single]
    merged = inference.predict_batch(inputs, model)
    assert [len(part) for part in merged] == [3, 5, 1]
    for data, part in zip(inputs, merged, strict=True):
        alone = inference.predict_fn(data, model)
        assert list(part.columns) == list(alone.columns)  # the id column only where the request sent it
        pd.testing.assert_frame_equal(part, alone, check_exact=False, atol=1e-12)
        assert inference.output_fn(part, "application/json") == inference.output_fn(alone, "application/json")


def test_converters_are_built_once_per_model_and_parse_like_before(model):
    assert set(model.converters) == set(FEATURES)
    column = model.converters["tenure_months"](["3", "", "7"], [1, 2, 3], "text/csv")
    assert np.isnan(column[1]) and column[0] == 3.0
    with pytest.raises(ValueError, match="feature 'tenure_months' takes a number; row 2 has 'x'"):
        model.converters["tenure_months"](["3", "x"], [1, 2], "text/csv")
