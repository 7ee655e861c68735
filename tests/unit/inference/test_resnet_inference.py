"""The ResNet image inference handlers on a real (tiny) model trained once for this module: image
bodies, JSON batches of base64, DataFrames of bytes or paths, preprocessing identical to the
trainer's evaluation, serialisation, and the clear errors bad requests get."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from scripts import CONTRACT, load_script, script_env

PROJECT = Path(__file__).resolve().parents[3]
TRAIN_PY = PROJECT / "include" / "training" / "resnet_image" / "train.py"
INFERENCE_PY = PROJECT / "include" / "inference" / "resnet_image" / "inference.py"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
LABELS = ["blue", "green", "red"]
PROBA = [f"proba_{label}" for label in LABELS]

pytestmark = pytest.mark.slow  # every test here needs the trained model


inference = load_script("include/inference/resnet_image/inference.py", "resnet_image_inference")


def picture(label: str, width: int = 40, height: int = 30) -> Image.Image:
    image = Image.new("RGB", (width, height), COLOURS[label])
    ImageDraw.Draw(image).rectangle([4, 4, 14, 12], fill=(255, 255, 255))
    return image


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def make_channel(folder: Path, per_class: int) -> None:
    (folder / "img").mkdir(parents=True)
    rows = []
    for label in COLOURS:
        for i in range(per_class):
            name = f"img/{label}_{i}.png"
            picture(label, 32 + i, 32).save(folder / name)
            rows.append((name, label))
    with open(folder / "manifest.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Train one epoch with train.py in a child process (SM_* variables, as the local backend does)."""
    root = tmp_path_factory.mktemp("resnet-serve")
    make_channel(root / "train", 6)
    make_channel(root / "validation", 2)
    env = script_env({k: v for k, v in os.environ.items() if not k.startswith("SM_")}) | {
        "SM_CHANNEL_TRAIN": str(root / "train"),
        "SM_CHANNEL_VALIDATION": str(root / "validation"),
        "SM_MODEL_DIR": str(root / "model"),
        "SM_OUTPUT_DATA_DIR": str(root / "output"),
        "SM_NUM_GPUS": "0",
    }
    flags = ["--arch", "resnet18", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0"]
    result = subprocess.run(
        [sys.executable, str(TRAIN_PY), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "model"


@pytest.fixture(scope="module")
def model(model_dir):
    return inference.model_fn(str(model_dir))


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return {
        "png": encode(picture("red"), "PNG"),
        "jpeg": encode(picture("green", 50, 36), "JPEG"),
        "gif": encode(picture("blue"), "GIF"),
    }


def assert_probabilities(prediction: pd.DataFrame, rows: int) -> None:
    assert list(prediction.columns) == ["prediction", *PROBA]
    assert len(prediction) == rows
    proba = prediction[PROBA].to_numpy()
    assert np.allclose(proba.sum(axis=1), 1.0) and ((proba >= 0) & (proba <= 1)).all()
    assert prediction["prediction"].tolist() == [LABELS[i] for i in proba.argmax(axis=1)]


# ------------------------------------------------------------------------------------ loading


def test_model_fn_rebuilds_the_network_for_the_artifact(model, model_dir):
    assert model.class_labels == LABELS
    written = json.loads((model_dir / "metadata.json").read_text())
    assert model.metadata == inference.conveyor_metadata.read(model_dir)
    assert {k: v for k, v in model.metadata.to_dict().items() if k in written} == written  # every key as written
    assert model.metadata.arch == "resnet18" and model.metadata.class_labels == LABELS
    assert model.device == torch.device("cpu")
    assert not model.network.training
    assert model.network.fc.out_features == 3
    saved = torch.load(model_dir / "model.pt", weights_only=True)
    assert torch.equal(model.network.state_dict()["layer1.0.conv1.weight"], saved["layer1.0.conv1.weight"])


# ------------------------------------------------------------------------------ image bodies


@pytest.mark.parametrize(
    "fmt, content_type",
    [
        ("png", "image/png"),
        ("jpeg", "image/jpeg"),
        ("gif", "application/x-image"),
        ("jpeg", "application/x-image"),
    ],
)
def test_one_image_body(model, images, fmt, content_type):
    batch = inference.input_fn(images[fmt], content_type)
    assert batch.shape == (1, 3, 32, 32) and batch.dtype == torch.float32
    assert_probabilities(inference.predict_fn(batch, model), 1)


def test_preprocessing_is_the_trainers_evaluation_transform(model, images, tmp_path):
    train_py = load_script("include/training/resnet_image/train.py", "resnet_image_train_for_inference")
    path = tmp_path / "image.jpg"
    path.write_bytes(images["jpeg"])
    expected = train_py.eval_transform(model.metadata.preprocessing)(train_py.load_rgb(path))
    assert torch.equal(inference.input_fn(images["jpeg"], "image/jpeg")[0], expected)


def test_exif_orientation_is_applied(model):
    image = picture("red", 40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    batch = inference.input_fn(encode_with_exif(image, exif), "image/jpeg")
    turned = inference.input_fn(encode(image.transpose(Image.Transpose.ROTATE_270), "JPEG"), "image/jpeg")
    plain = inference.input_fn(encode(image, "JPEG"), "image/jpeg")
    assert (batch - turned).abs().mean() < 0.05 < (batch - plain).abs().mean()


def encode_with_exif(image: Image.Image, exif: Image.Exif) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


# ------------------------------------------------------------------------------- JSON batches


def test_json_batch_of_base64(model, images):
    encoded = [base64.b64encode(images[f]).decode() for f in ("png", "jpeg", "gif")]
    instances = inference.input_fn(json.dumps({"instances": [{"b64": e} for e in encoded]}), "application/json")
    assert instances.shape == (3, 3, 32, 32)
    bare = inference.input_fn(json.dumps(encoded).encode(), "application/json; charset=utf-8")
    assert torch.equal(instances, bare)
    prediction = inference.predict_fn(instances, model)
    assert_probabilities(prediction, 3)

    body = json.loads(inference.output_fn(prediction, "application/json"))
    assert [p["prediction"] for p in body["predictions"]] == prediction["prediction"].tolist()
    first = body["predictions"][0]["probabilities"]
    assert list(first) == LABELS and sum(first.values()) == pytest.approx(1.0)
    assert json.loads(inference.output_fn(prediction, None)) == body

    lines = inference.output_fn(prediction, "text/csv").strip().split("\n")
    assert len(lines) == 3
    values = lines[0].split(",")
    assert values[0] == prediction["prediction"][0]
    assert [float(v) for v in values[1:]] == pytest.approx(prediction.loc[0, PROBA].tolist())


def test_predict_batch_gives_each_request_what_predict_fn_alone_gives_it(model, images):
    one = inference.parse_request(images["png"], "image/png", model)
    several = inference.input_fn(
        json.dumps([base64.b64encode(images[f]).decode() for f in ("jpeg", "gif", "png")]), "application/json"
    )
    inputs = [one, several, inference.parse_request(images["jpeg"], "image/jpeg", model)]
    merged = inference.predict_batch(inputs, model)
    assert [len(part) for part in merged] == [1, 3, 1]
    for data, part in zip(inputs, merged, strict=True):
        alone = inference.predict_fn(data, model)
        assert part["prediction"].tolist() == alone["prediction"].tolist()
        # float32 convolutions of another batch size may differ in the last bits
        pd.testing.assert_frame_equal(part, alone, check_exact=False, atol=1e-5)


def test_json_accepts_a_data_uri_and_url_safe_base64(model, images):
    standard = base64.b64encode(images["png"]).decode()
    urlsafe = base64.urlsafe_b64encode(images["png"]).decode().rstrip("=")
    body = json.dumps({"instances": [{"b64": f"data:image/png;base64,{standard}"}, urlsafe]})
    batch = inference.input_fn(body, "application/json")
    assert torch.equal(batch[0], batch[1])


# ---------------------------------------------------------------------------------- DataFrames


def test_dataframe_of_bytes_and_of_paths_score_like_requests(model, images, tmp_path):
    order = ("png", "jpeg", "gif")
    from_bytes = inference.predict_fn(pd.DataFrame({"image": [images[f] for f in order], "label": ["red"] * 3}), model)
    assert_probabilities(from_bytes, 3)
    one_by_one = pd.concat(
        [inference.predict_fn(inference.input_fn(images[f], "application/x-image"), model) for f in order],
        ignore_index=True,
    )
    pd.testing.assert_frame_equal(from_bytes, one_by_one)

    for fmt in order:
        (tmp_path / f"a.{fmt}").write_bytes(images[fmt])
    frame = pd.DataFrame({"path": [f"a.{fmt}" for fmt in order]})
    frame.attrs["image_root"] = str(tmp_path)
    pd.testing.assert_frame_equal(inference.predict_fn(frame, model), from_bytes)
    absolute = pd.DataFrame({"path": [str(tmp_path / f"a.{fmt}") for fmt in order]})
    pd.testing.assert_frame_equal(inference.predict_fn(absolute, model), from_bytes)
    pd.testing.assert_frame_equal(inference.predict_fn([images[f] for f in order], model), from_bytes)


def test_large_frames_are_scored_in_batches(model, images, monkeypatch):
    monkeypatch.setattr(inference, "BATCH_SIZE", 2)
    frame = pd.DataFrame({"image": [images["png"], images["jpeg"], images["gif"], images["png"], images["jpeg"]]})
    prediction = inference.predict_fn(frame, model)
    assert_probabilities(prediction, 5)
    assert np.allclose(prediction.loc[0, PROBA].to_numpy(float), prediction.loc[3, PROBA].to_numpy(float))


def test_the_pipeline_evaluation_path_loads_the_artifact_and_scores_a_frame(model_dir, images, tmp_path):
    from conveyor.model.artifacts import LoadedModel
    from conveyor.training.evaluate import predictions

    artifact = tmp_path / "artifact"
    shutil.copytree(model_dir, artifact)
    (artifact / "code").mkdir()
    shutil.copy(INFERENCE_PY, artifact / "code" / "inference.py")
    shutil.copy(CONTRACT / "conveyor_metadata.py", artifact / "code")  # as model.tar.gz carries it
    loaded = LoadedModel(artifact)
    assert loaded.feature_names == ["image"]
    y_pred, proba = predictions(loaded, pd.DataFrame({"image": [images["png"], images["gif"]]}))
    assert list(proba.columns) == LABELS and len(y_pred) == 2
    assert np.allclose(proba.sum(axis=1), 1.0)
    body = json.loads(loaded.invoke(images["png"], "image/png"))
    assert body["predictions"][0]["prediction"] == y_pred[0]


# -------------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    "body, content_type, rule",
    [
        (b"definitely not an image", "image/jpeg", "image/jpeg: the body: not an image PIL can decode (23 bytes)"),
        (b"", "image/png", "image/png: empty input: the body holds no image"),
        ("text body", "image/png", "image/png: the body must be the image's bytes, got text"),
        ("", "application/json", "application/json: empty input"),
        ("{not json", "application/json", "application/json: malformed JSON"),
        ('{"instances": []}', "application/json", "application/json: empty input: no instances"),
        ('{"instances": {"b64": "x"}}', "application/json", '"instances" must be a list'),
        ('{"image": "abc"}', "application/json", 'expected {"instances"'),
        ('[{"b64": 12}]', "application/json", 'instance 1: expected {"b64": "<base64>"} or a base64 string'),
        ('["@@@@ not base64 !!"]', "application/json", "application/json: instance 1: not valid base64"),
        ('[{"b64": ""}]', "application/json", "instance 1: empty image (no base64 text)"),
    ],
)
def test_bad_requests_are_refused_with_the_rule(model, body, content_type, rule):
    with pytest.raises(ValueError) as error:
        inference.input_fn(body, content_type)
    assert rule in str(error.value)
    assert not isinstance(error.value, inference.UnsupportedContentType)


def test_a_truncated_image_in_a_batch_names_the_instance(model, images):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    cut = encode(noise, "JPEG")[:1500]
    good = base64.b64encode(images["png"]).decode()
    body = json.dumps({"instances": [{"b64": good}, {"b64": base64.b64encode(cut).decode()}]})
    with pytest.raises(
        ValueError, match=r"application/json: instance 2: the image does not decode \(image file is truncated"
    ):
        inference.input_fn(body, "application/json")
    garbage = json.dumps([good, base64.b64encode(b"GIF89a not really").decode()])
    with pytest.raises(ValueError, match="instance 2: not an image PIL can decode"):
        inference.input_fn(garbage, "application/json")


def test_unsupported_content_type_and_accept_have_their_own_exception(model, images):
    with pytest.raises(inference.UnsupportedContentType, match="content type 'text/csv' is not supported"):
        inference.input_fn(images["png"], "text/csv")
    with pytest.raises(inference.UnsupportedContentType):
        inference.input_fn(images["png"], None)
    with pytest.raises(inference.UnsupportedContentType, match="accept 'application/xml' is not supported"):
        inference.choose_accept("application/xml")
    assert issubclass(inference.UnsupportedContentType, ValueError)


def test_bad_frames_are_refused(model, images, tmp_path):
    with pytest.raises(ValueError, match="needs an 'image' column .* or a 'path' column; it has label"):
        inference.predict_fn(pd.DataFrame({"label": ["red"]}), model)
    with pytest.raises(ValueError, match="row 1 \\(column 'image'\\): not an image PIL can decode"):
        inference.predict_fn(pd.DataFrame({"image": [images["png"], b"nope"]}), model)
    with pytest.raises(ValueError, match="row 0: column 'image' holds text"):
        inference.predict_fn(pd.DataFrame({"image": ["a.png"]}), model)
    with pytest.raises(ValueError, match=f"cannot read {tmp_path / 'missing.png'}"):
        inference.predict_fn(pd.DataFrame({"path": [str(tmp_path / "missing.png")]}), model)


def test_input_fn_needs_a_loaded_model(monkeypatch, images):
    monkeypatch.setattr(inference, "_loaded", None)
    with pytest.raises(RuntimeError, match="model_fn must run first"):
        inference.input_fn(images["png"], "image/png")


# ------------------------------------------------------------------------------- request limits


def bomb_png(width: int = 9000, height: int = 9000) -> bytes:
    """A PNG of a few KiB that decodes to width x height pixels (a 1-bit image, one colour)."""
    return encode(Image.new("1", (width, height)), "PNG")


def b64_batch(payloads: list[bytes]) -> str:
    return json.dumps({"instances": [{"b64": base64.b64encode(p).decode()} for p in payloads]})


def test_the_issues_request_of_431_small_pngs_is_refused_before_decoding(model, monkeypatch):
    bomb = bomb_png()  # 81 megapixels each: what the issue sent 431 of, in one body under 6 MiB
    body = b64_batch([bomb] * 431)
    assert len(body) < 6 * 1024 * 1024
    loads: list[tuple[int, int]] = []
    original = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self.size) or original(self))
    with pytest.raises(inference.RequestTooLarge, match=r"431 instances, more than the limit of 64 images per request"):
        inference.parse_request(body, "application/json", model)
    with pytest.raises(
        inference.RequestTooLarge,
        match=r"instance 1: the image is 9000x9000 = 81000000 pixels, more than the limit of 40000000 per image",
    ):
        inference.parse_request(b64_batch([bomb]), "application/json", model)
    with pytest.raises(inference.RequestTooLarge, match="the body: the image is 9000x9000"):
        inference.parse_request(bomb, "image/png", model)
    assert loads == []  # refused from the header: nothing was decoded
    assert issubclass(inference.RequestTooLarge, ValueError)


def test_the_pixels_of_a_request_are_capped_in_all(model):
    import dataclasses

    small = dataclasses.replace(model, limits=inference.RequestLimits(max_pixels=3 * 40 * 30))
    image = encode(picture("red"), "PNG")  # 40 x 30
    assert len(inference.parse_request(b64_batch([image] * 3), "application/json", small)) == 3
    with pytest.raises(
        inference.RequestTooLarge, match=r"instance 4: the images up to this one have 4800 pixels, more than the limit"
    ):
        inference.parse_request(b64_batch([image] * 4), "application/json", small)


def test_images_are_decoded_and_preprocessed_one_at_a_time(model, monkeypatch):
    events: list[str] = []
    original_open, original_preprocess = Image.open, inference.preprocess

    def open_(*args, **kwargs):
        events.append("decode")
        return original_open(*args, **kwargs)

    def preprocess(image, m):
        events.append("preprocess")
        return original_preprocess(image, m)

    monkeypatch.setattr(Image, "open", open_)
    monkeypatch.setattr(inference, "preprocess", preprocess)
    images = [encode(picture(label), "PNG") for label in ("red", "green", "blue")]
    batch = inference.parse_request(b64_batch(images), "application/json", model)
    assert batch.shape[0] == 3
    assert events == ["decode", "preprocess"] * 3  # never two decoded images at once


def test_the_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CONVEYOR_REQUEST_MAX_IMAGES", "5")
    monkeypatch.setenv("CONVEYOR_REQUEST_MAX_IMAGE_PIXELS", "1000")
    monkeypatch.delenv("CONVEYOR_REQUEST_MAX_PIXELS", raising=False)
    assert inference.RequestLimits.from_env() == inference.RequestLimits(5, 1000, inference.MAX_REQUEST_PIXELS)
    monkeypatch.setenv("CONVEYOR_REQUEST_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="CONVEYOR_REQUEST_MAX_PIXELS='lots' must be a whole number"):
        inference.RequestLimits.from_env()


def test_json_nested_too_deeply_is_a_bad_request(model):
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ValueError, match="application/json: the body nests arrays or objects too deeply"):
        inference.parse_request(deep, "application/json", model)
