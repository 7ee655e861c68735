"""The ResNet image training script: a real (tiny) training run as a child process, its artifact,
history and checkpoint, a resumed run, and the checks that refuse bad input before any training."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw

from scripts import load_script, script_env

PROJECT = Path(__file__).resolve().parents[3]
TRAIN_PY = PROJECT / "include" / "training" / "resnet_image" / "train.py"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
# the ImageNet stem at 32 px (the small-input recipe has its own tests: test_resnet_recipe.py)
TINY = ("--arch", "resnet18", "--stem", "imagenet", "--image-size", "32", "--batch-size", "8", "--workers", "0")


train_py = load_script("include/training/resnet_image/train.py", "resnet_image_train")


def make_channel(folder: Path, per_class: int, colours: dict = COLOURS, extra_rows: list | None = None) -> Path:
    """Solid-colour images with a white square (PNG and JPEG, widths 32..), and manifest.csv."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for label, rgb in colours.items():
        for i in range(per_class):
            image = Image.new("RGB", (32 + i, 32), tuple(max(0, c - 10 * i) for c in rgb))
            ImageDraw.Draw(image).rectangle([4, 4, 12 + i, 12], fill=(255, 255, 255))
            name = f"img/{label}_{i}.{'png' if i % 2 else 'jpg'}"
            image.save(folder / name)
            rows.append((name, label))
    write_manifest(folder, rows + (extra_rows or []))
    return folder


def write_manifest(folder: Path, rows: list) -> None:
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)


def run_train(channels: dict[str, Path], model_dir: Path, output_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    """Run train.py as the local backend does: a fresh child process, paths in SM_* variables."""
    env = script_env({k: v for k, v in os.environ.items() if not k.startswith("SM_")})
    env |= {f"SM_CHANNEL_{name.upper()}": str(path) for name, path in channels.items()}
    env |= {"SM_MODEL_DIR": str(model_dir), "SM_OUTPUT_DATA_DIR": str(output_dir), "SM_NUM_GPUS": "0"}
    return subprocess.run([sys.executable, str(TRAIN_PY), *flags], env=env, capture_output=True, text=True, timeout=300)


def parse(*argv: str):
    """Parse a command line without reading the SM_* environment of the test process."""
    return train_py.get_args_parser().parse_args(list(argv))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resnet-data")
    make_channel(root / "train", per_class=8)
    make_channel(root / "validation", per_class=3)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> dict:
    """One 2-epoch training; what it wrote is read at once (the resume test later adds an epoch)."""
    root = tmp_path_factory.mktemp("resnet-run")
    channels = {"train": data / "train", "validation": data / "validation"}
    result = run_train(channels, root / "model", root / "output", *TINY, "--epochs", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {
        "result": result,
        "root": root,
        "channels": channels,
        "metadata": json.loads((root / "model" / "metadata.json").read_text()),
        "history": json.loads((root / "output" / "history.json").read_text()),
        "model": torch.load(root / "model" / "model.pt", map_location="cpu", weights_only=True),
        "best": torch.load(root / "output" / "checkpoints" / "best.pt", map_location="cpu", weights_only=True),
        "last": torch.load(root / "output" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True),
    }


# ----------------------------------------------------------------------------- a real training


@pytest.mark.slow
def test_training_succeeds_and_streams_progress(trained):
    result = trained["result"]
    lines = [line for line in result.stdout.splitlines() if line.startswith("[train.py]")]
    text = "\n".join(lines)
    assert (
        "start: resnet18 (imagenet stem, width 64), 3 classes, 24 training and 9 validation images, device cpu" in text
    )
    for epoch in (1, 2):
        train_line = next(line for line in lines if f"epoch {epoch}/2 train:" in line)
        for part in ("loss ", "balanced_accuracy ", "images/s", "| lr ", "| eta "):
            assert part in train_line, train_line
        assert f"epoch {epoch}/2 validation: loss " in text
    assert "saved:" in text and "Traceback" not in result.stderr


@pytest.mark.slow
def test_model_pt_is_the_best_epochs_state_dict(trained):
    state = trained["model"]
    network = torchvision.models.resnet18(weights=None, num_classes=3)
    network.load_state_dict(state)  # strict: every key, the 3-class head
    assert state["fc.weight"].shape == (3, 512)
    assert trained["best"]["epoch"] == trained["metadata"]["best_epoch"]
    assert all(torch.equal(state[k], trained["best"]["model"][k]) for k in state)


@pytest.mark.slow
def test_metadata_describes_the_model(trained):
    metadata, history = trained["metadata"], trained["history"]
    assert metadata["trainer"] == "resnet_image"
    assert metadata["problem_type"] == "image_classification"
    assert metadata["arch"] == "resnet18"
    assert metadata["class_labels"] == ["blue", "green", "red"]
    assert metadata["image_size"] == 32
    assert metadata["preprocessing"] | {} == {
        "resize": 36,
        "crop": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "resize_mode": "shorter_side",
        "interpolation": "bilinear",
        "color_mode": "RGB",
        "exif_transpose": True,
    }
    assert metadata["features"] == [{"name": "image", "dtype": "image"}] and metadata["label"] == "label"
    assert metadata["validation_metric"] == "balanced_accuracy"
    assert metadata["epochs_run"] == 2 and metadata["stopped"] == "epochs"
    scores = [row["val_score"] for row in history]
    assert metadata["best_epoch"] in (1, 2)
    assert metadata["validation_score"] == pytest.approx(max(scores))
    assert history[metadata["best_epoch"] - 1]["val_score"] == pytest.approx(metadata["validation_score"])
    hyperparameters = metadata["hyperparameters"]
    assert hyperparameters["epochs"] == 2 and hyperparameters["batch_size"] == 8 and hyperparameters["lr"] == 0.01
    assert hyperparameters["gate_metric"] == "balanced_accuracy" and hyperparameters["pretrained_weights"] is None
    assert metadata["rows"] == {"train": 24, "validation": 9}
    assert metadata["versions"]["torch"] == torch.__version__
    # the keys the trainer sets, plus the contract's schema_version (no other field of ModelMetadata as null)
    assert set(metadata) == {
        "trainer",
        "problem_type",
        "label",
        "features",
        "arch",
        "class_labels",
        "image_size",
        "preprocessing",
        "best_model",
        "best_epoch",
        "validation_score",
        "validation_metric",
        "eval_metric",
        "validation_metrics",
        "epochs_run",
        "stopped",
        "hyperparameters",
        "rows",
        "training_seconds",
        "device",
        "versions",
        "baseline",
        "schema_version",
    }
    assert metadata["schema_version"] == 1
    typed = train_py.conveyor_metadata.read(trained["root"] / "model")
    assert typed.class_labels == ["blue", "green", "red"] and typed.feature_names == ["image"] and not typed.extra


@pytest.mark.slow
def test_metadata_baseline_holds_training_image_statistics(trained):
    baseline = trained["metadata"]["baseline"]
    train = trained["channels"]["train"]
    assert baseline["kind"] == "image" and baseline["rows"] == 24 and baseline["sampled_images"] == 24
    assert baseline["label_distribution"] == pytest.approx({"blue": 1 / 3, "green": 1 / 3, "red": 1 / 3})
    # The reference of prediction drift: the best epoch's predictions on the 9 validation images.
    best = trained["history"][trained["metadata"]["best_epoch"] - 1]
    assert sum(best["val_predicted"]) == 9
    assert baseline["predictions"] == pytest.approx(
        {c: n / 9 for c, n in zip(["blue", "green", "red"], best["val_predicted"])}
    )
    assert baseline["predictions_source"] == {
        "channel": "validation",
        "rows": 9,
        "epoch": trained["metadata"]["best_epoch"],
    }
    pixels = [
        np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
        for path in sorted((train / "img").iterdir())
    ]
    flat = np.concatenate([p.reshape(-1, 3) for p in pixels])
    assert baseline["pixel"]["mean"] == pytest.approx(flat.mean(axis=0).tolist())
    assert baseline["pixel"]["std"] == pytest.approx(flat.std(axis=0).tolist())
    assert sum(baseline["pixel"]["histogram"]["counts"]["red"]) == len(flat)
    assert baseline["width"]["min"] == 32 and baseline["width"]["max"] == 39 and baseline["width"]["mean"] == 35.5
    assert baseline["height"] == baseline["height"] | {"min": 32, "max": 32, "mean": 32}
    brightness = baseline["brightness"]
    assert 0 < brightness["min"] <= brightness["mean"] <= brightness["max"] < 1 and brightness["std"] > 0
    assert sum(brightness["histogram"]["counts"]) == 24


@pytest.mark.slow
def test_history_and_checkpoint_are_written(trained):
    history = trained["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    for key in (
        "lr",
        "train_loss",
        "train_accuracy",
        "train_balanced_accuracy",
        "train_images_per_second",
        "val_loss",
        "val_accuracy",
        "val_balanced_accuracy",
        "val_f1_macro",
        "best",
    ):
        assert key in history[0]
    last = trained["last"]
    assert {"model", "optimizer", "lr_scheduler", "epoch", "best_metric", "args", "class_to_idx", "scaler"} <= set(last)
    assert last["epoch"] == 2 and last["class_to_idx"] == {"blue": 0, "green": 1, "red": 2}
    assert last["args"]["arch"] == "resnet18" and last["scaler"] is None
    assert last["best_metric"] == pytest.approx(trained["metadata"]["validation_score"])


@pytest.mark.slow
def test_a_second_run_resumes_from_the_last_checkpoint(trained):
    root = trained["root"]
    result = run_train(trained["channels"], root / "model", root / "output", *TINY, "--epochs", "3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming from {root / 'output' / 'checkpoints' / 'last.pt'}: epoch 2 done" in result.stdout
    assert "continuing at epoch 3 of 3" in result.stdout
    assert "epoch 1/3 train" not in result.stdout and "epoch 3/3 train" in result.stdout
    history = json.loads((root / "output" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[:2] == trained["history"]
    assert history[2]["lr"] == pytest.approx(0.01 * 0.25)  # cosine over the 3 epochs now asked for
    metadata = json.loads((root / "model" / "metadata.json").read_text())
    assert metadata["epochs_run"] == 3


# ---------------------------------------------------------------------- bad input, no training


def refused(tmp_path: Path, *argv: str) -> str:
    """Run main() in-process on arguments that must be refused; return the exit message."""
    args = parse("--model-dir", str(tmp_path / "model"), "--output-data-dir", str(tmp_path / "out"), *TINY, *argv)
    with pytest.raises(SystemExit) as exit_info:
        train_py.main(args)
    assert isinstance(exit_info.value.code, str), exit_info.value.code
    assert not (tmp_path / "model" / "model.pt").exists()
    return exit_info.value.code


def test_undecodable_images_exit_non_zero_naming_each_file(tmp_path, data):
    folder = tmp_path / "train"
    make_channel(
        folder, per_class=2, extra_rows=[("bad/empty.jpg", "red"), ("bad/notes.png", "green"), ("bad/cut.jpg", "blue")]
    )
    (folder / "bad").mkdir()
    (folder / "bad" / "empty.jpg").write_bytes(b"")
    (folder / "bad" / "notes.png").write_text("this is not a picture\n")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(folder / "bad" / "full.jpg")
    payload = (folder / "bad" / "full.jpg").read_bytes()
    (folder / "bad" / "cut.jpg").write_bytes(payload[: int(len(payload) * 0.6)])
    result = run_train(
        {"train": folder, "validation": data / "validation"},
        tmp_path / "model",
        tmp_path / "out",
        *TINY,
        "--epochs",
        "1",
    )
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("train.py: train channel: 3 images do not decode:"), message
    assert "'bad/empty.jpg' (manifest.csv line 8): zero bytes" in message
    assert "'bad/notes.png' (manifest.csv line 9): not an image PIL can identify" in message
    assert "'bad/cut.jpg' (manifest.csv line 10): image file is truncated" in message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "model" / "model.pt").exists()


def test_truncated_image_is_named_even_without_the_upfront_check(tmp_path, data):
    folder = make_channel(tmp_path / "train", per_class=2, extra_rows=[("cut.jpg", "red")])
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(folder / "full.jpg")
    (folder / "cut.jpg").write_bytes((folder / "full.jpg").read_bytes()[:1500])
    message = refused(
        tmp_path, "--train", str(folder), "--validation", str(data / "validation"), "--verify-images", "false"
    )
    assert message.startswith("train.py: train channel: image 'cut.jpg' (manifest.csv line 8) does not decode"), message


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "img/../../secret.png"])
def test_manifest_path_outside_the_channel_is_refused(tmp_path, path):
    folder = make_channel(tmp_path / "train", per_class=2, extra_rows=[(path, "red")])
    message = refused(tmp_path, "--train", str(folder))
    assert (
        message
        == f"train.py: train channel: manifest.csv line 8: path {path!r} points outside the channel folder: refused"
    )


def test_manifest_row_naming_a_missing_file_is_refused(tmp_path):
    folder = make_channel(tmp_path / "train", per_class=2, extra_rows=[("img/ghost.jpg", "red")])
    message = refused(tmp_path, "--train", str(folder))
    assert message == f"train.py: train channel: manifest.csv line 8: image 'img/ghost.jpg' does not exist in {folder}"


def test_channel_without_manifest_is_refused(tmp_path):
    folder = make_channel(tmp_path / "train", per_class=2)
    (folder / "manifest.csv").unlink()
    message = refused(tmp_path, "--train", str(folder))
    assert message == f"train.py: train channel: {folder} has no manifest.csv (columns path,label)"


def test_manifest_without_the_columns_is_refused(tmp_path):
    folder = make_channel(tmp_path / "train", per_class=2)
    (folder / "manifest.csv").write_text("file,class\nimg/red_0.jpg,red\n")
    assert "needs columns path,label; found ['file', 'class']" in refused(tmp_path, "--train", str(folder))


def test_a_single_class_is_refused(tmp_path):
    folder = make_channel(tmp_path / "train", per_class=3, colours={"red": COLOURS["red"]})
    message = refused(tmp_path, "--train", str(folder))
    assert (
        message
        == "train.py: train channel: a classifier needs at least 2 classes; manifest.csv has only 'red' (3 images)"
    )


def test_validation_class_unseen_in_training_is_refused(tmp_path):
    train = make_channel(tmp_path / "train", per_class=2, colours={k: COLOURS[k] for k in ("red", "green")})
    validation = make_channel(tmp_path / "validation", per_class=1)
    message = refused(tmp_path, "--train", str(train), "--validation", str(validation))
    assert (
        message == "train.py: validation channel: classes never seen in training: 'blue' (training has 'green', 'red')"
    )


def test_pretrained_weights_of_another_arch_are_refused_with_the_mismatch(tmp_path, data):
    weights = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None, num_classes=3).state_dict(), weights)
    message = refused(
        tmp_path,
        "--train",
        str(data / "train"),
        "--validation",
        str(data / "validation"),
        "--pretrained-weights",
        str(weights),
    )
    assert message.startswith(
        f"train.py: pretrained weights {weights} do not fit --arch resnet18 (the file looks like resnet34): "
    ), message
    assert "unexpected keys (layer1.2.conv1.weight" in message


def test_pretrained_weights_load_all_but_a_head_of_another_class_count(tmp_path, capsys):
    source = torchvision.models.resnet18(weights=None, num_classes=10)
    weights = tmp_path / "checkpoint.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 7}, weights)
    model = train_py.build_model("resnet18", 3)
    train_py.load_pretrained(model, train_py.resolve_weights(weights.as_uri()), "resnet18")
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc.out_features == 3
    assert "loaded everything but fc" in capsys.readouterr().out


def test_a_file_that_is_not_weights_is_named(tmp_path):
    weights = tmp_path / "weights.pt"
    weights.write_text("hello")
    with pytest.raises(train_py.TrainingInputError, match=f"pretrained weights {weights}: not a PyTorch weights file"):
        train_py.load_pretrained(train_py.build_model("resnet18", 3), weights, "resnet18")


@pytest.mark.parametrize(
    "value",
    [
        "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "s3://bucket/resnet18.pth",
        "IMAGENET1K_V1",
        "ResNet18_Weights.DEFAULT",
    ],
)
def test_pretrained_weights_are_never_downloaded(tmp_path, value):
    message = refused(tmp_path, "--pretrained-weights", value)
    assert "will not download weights at run time; give a local file" in message, message


def test_missing_pretrained_weights_file_is_named(tmp_path):
    message = refused(tmp_path, "--pretrained-weights", str(tmp_path / "nope.pth"))
    assert message == f"train.py: pretrained weights file {tmp_path / 'nope.pth'} does not exist"


def test_unknown_option_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--epochs", "2", "--presets", "best_quality")
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --presets best_quality" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--arch", "resnet101"], "--arch"),
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-1"], "--lr"),
        (["--image-size", "16"], "--image-size"),
        (["--amp", "fp8"], "--amp"),
        (["--freeze-backbone", "maybe"], "--freeze-backbone"),
    ],
)
def test_bad_option_values_are_refused(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_paths_and_flags_default_to_the_sagemaker_environment(monkeypatch):
    monkeypatch.setenv("SM_CHANNEL_TRAIN", "/opt/ml/input/data/train")
    monkeypatch.setenv("SM_MODEL_DIR", "/opt/ml/model")
    monkeypatch.setenv("SM_NUM_GPUS", "4")
    monkeypatch.delenv("SM_CHANNEL_VALIDATION", raising=False)
    args = parse()
    assert args.train == Path("/opt/ml/input/data/train") and args.model_dir == Path("/opt/ml/model")
    assert args.validation is None and args.num_gpus == 4
    assert args.gate_metric == "balanced_accuracy" and (args.stem, args.flip, args.augment) == ("auto",) * 3
    planned = (
        "arch",
        "width",
        "image_size",
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "label_smoothing",
        "workers",
    )
    assert all(getattr(args, name) is None for name in planned)  # planned from the data, device and budget
    assert args.freeze_backbone is False and args.channels_last is None and args.resume == "auto"
    flags = parse("--freeze-backbone", "--compile", "true", "--channels-last", "false", "--verify-images", "no")
    assert (flags.freeze_backbone, flags.compile, flags.channels_last, flags.verify_images) == (
        True,
        True,
        False,
        False,
    )


# --------------------------------------------------------------------------- loop and helpers


def test_metrics_from_a_confusion_matrix():
    confusion = np.array([[3, 1, 0], [0, 2, 0], [1, 1, 0]])  # class 2 never predicted right
    metrics = train_py.metrics_from_confusion(confusion)
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["balanced_accuracy"] == pytest.approx((3 / 4 + 1 + 0) / 3)
    f1 = [2 * 3 / (4 + 4), 2 * 2 / (2 + 4), 0.0]
    assert metrics["f1_macro"] == pytest.approx(sum(f1) / 3)


def test_epoch_sampler_draws_the_same_epoch_on_every_process_and_shards_it():
    shards = [list(train_py.EpochSampler(10, seed=3, rank=r, world=3)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set(sum(shards, [])) == set(range(10))
    sampler = train_py.EpochSampler(10, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(10))
    weighted = train_py.EpochSampler(1000, seed=0, weights=[1.0] * 500 + [0.0] * 500)
    assert max(weighted) < 500


def test_train_one_epoch_and_evaluate_are_reusable_without_the_cli(capsys):
    torch.manual_seed(0)
    images, targets = torch.randn(12, 3, 8, 8), torch.tensor([0, 1, 2] * 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lines = []
    result = train_py.train_one_epoch(
        model,
        torch.nn.CrossEntropyLoss(),
        optimizer,
        loader,
        torch.device("cpu"),
        1,
        3,
        epochs=4,
        max_steps=2,
        log_fn=lines.append,
    )
    assert result["images"] == 8 and result["images_per_second"] > 0 and result["lr"] == 0.1
    assert lines and lines[0].startswith("epoch 1/4 train: loss ") and "images/s" in lines[0] and "eta" in lines[0]
    scored = train_py.evaluate(
        model, torch.nn.CrossEntropyLoss(), loader, torch.device("cpu"), 3, gate_metric="f1_macro"
    )
    assert scored["metric"] == "f1_macro" and scored["score"] == scored["f1_macro"] and scored["images"] == 12
    assert 0 <= scored["accuracy"] <= 1 and scored["loss"] > 0
    with torch.inference_mode():
        predicted = model(images).argmax(dim=1)
    assert scored["predicted"] == [int((predicted == k).sum()) for k in range(3)]


def test_a_decode_error_from_a_dataloader_worker_reads_cleanly():
    from torch._utils import ExceptionWrapper

    try:
        raise train_py.ImageDecodeError("image 'img/cut.jpg' (manifest.csv line 11) does not decode: truncated")
    except train_py.ImageDecodeError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(train_py.ImageDecodeError) as error:
        wrapped.reraise()
    assert "Traceback" in str(error.value)
    assert (
        train_py.clean_message(str(error.value))
        == "image 'img/cut.jpg' (manifest.csv line 11) does not decode: truncated"
    )


def test_resume_checks_the_checkpoint_belongs_to_this_training(tmp_path, capsys):
    args = parse("--model-dir", str(tmp_path), "--output-data-dir", str(tmp_path), "--resume", "auto")
    args.checkpoint_dir = tmp_path
    checkpoint = tmp_path / "last.pt"
    torch.save(
        {"model": {}, "epoch": 3, "class_to_idx": {"cat": 0, "dog": 1}, "args": {"arch": "resnet18"}}, checkpoint
    )
    assert train_py.checkpoint_path(args) == checkpoint
    assert train_py.read_checkpoint(checkpoint, args, {"blue": 0, "red": 1}) is None
    assert "ignoring checkpoint" in capsys.readouterr().out
    args.resume = str(checkpoint)
    with pytest.raises(
        train_py.TrainingInputError, match=r"--resume .*last.pt: it was trained on other classes \(\['cat', 'dog'\]\)"
    ):
        train_py.read_checkpoint(checkpoint, args, {"blue": 0, "red": 1})
    args.resume = str(tmp_path / "nope.pt")
    with pytest.raises(train_py.TrainingInputError, match="no such checkpoint"):
        train_py.checkpoint_path(args)
    args.resume = "never"
    assert train_py.checkpoint_path(args) is None
