"""The ResNet trainer's recipe for small inputs and small data: the small-input stem, width and depth,
the options planned from the data, device and budget, the flip check, the budget-fitted epochs,
and (one real training) a planned run whose artifact the inference handlers rebuild."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw

from scripts import load_script, script_env

PROJECT = Path(__file__).resolve().parents[3]
TRAIN_PY = PROJECT / "include" / "training" / "resnet_image" / "train.py"

train_py = load_script("include/training/resnet_image/train.py", "resnet_image_train")
inference = load_script("include/inference/resnet_image/inference.py", "resnet_image_inference")
network = sys.modules["network"]
plan = sys.modules["plan"]
presets = sys.modules["presets"]
data = sys.modules["data"]
utils = sys.modules["utils"]

CPU = utils.Runtime(device=torch.device("cpu"), rank=0, world=1, distributed=False)


def bar_image(label: str, size: int, index: int) -> Image.Image:
    """Greyscale pictures whose class is the side a bar is on (mirroring swaps the classes)."""
    image = Image.new("L", (size, size), 10 + index % 5)
    x0 = size // 8 + index % 3 if label == "left" else size // 2 + index % 3
    ImageDraw.Draw(image).rectangle([x0, 2, x0 + size // 4, size - 3], fill=230)
    return image


def shape_image(label: str, size: int, index: int) -> Image.Image:
    """Pictures of centred circles or squares (mirrored, they stay what they are)."""
    image = Image.new("L", (size, size), 10 + index % 5)
    box = [size // 4 - index % 2, size // 4, 3 * size // 4 + index % 2, 3 * size // 4]
    draw = ImageDraw.Draw(image)
    (draw.ellipse if label == "circle" else draw.rectangle)(box, fill=220)
    return image


def write_channel(folder: Path, draw, labels: tuple[str, ...], per_class: int, size: int) -> list:
    """PNG files and manifest.csv; the channel's items as train.py reads them."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for label in labels:
        for i in range(per_class):
            name = f"img/{label}_{i}.png"
            draw(label, size, i).save(folder / name)
            rows.append({"path": name, "label": label})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return data.read_manifest(folder, "train", "SM_CHANNEL_TRAIN")


def parse(*argv: str) -> argparse.Namespace:
    return train_py.get_args_parser().parse_args(["--model-dir", "m", "--output-data-dir", "o", *argv])


# ----------------------------------------------------------------------------------- the network


def test_small_stem_keeps_the_resolution_and_torchvisions_keys():
    model = network.build_model("resnet18", 5, stem="small", width=16)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    shapes = {}
    model.layer4.register_forward_hook(lambda module, inputs, output: shapes.update(layer4=output.shape))
    model.eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    assert shapes["layer4"] == (2, 128, 4, 4)  # 32 px: 4x4 at the last stage (the ImageNet stem: 1x1)
    reference = torchvision.models.resnet18(weights=None, num_classes=5).state_dict()
    assert list(model.state_dict()) == list(reference)


def test_imagenet_stem_at_width_64_is_torchvisions_model():
    model = network.build_model("resnet50", 7)
    assert type(model) is torchvision.models.ResNet and model.conv1.kernel_size == (7, 7)
    reference = torchvision.models.resnet50(weights=None, num_classes=7).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.items()}


@pytest.mark.parametrize(
    ("arch", "stem", "width"),
    [("resnet10", "small", 16), ("resnet18", "small", 32), ("resnet50", "small", 8), ("resnet10", "imagenet", 64)],
)
def test_inference_rebuilds_the_network_the_trainer_built(arch, stem, width):
    trained = network.build_model(arch, 3, stem=stem, width=width)
    rebuilt = inference.build_network(arch, 3, stem, width)
    rebuilt.load_state_dict(trained.state_dict())  # strict: every key and shape
    trained.eval(), rebuilt.eval()
    batch = torch.randn(2, 3, 32, 32)
    assert torch.allclose(trained(batch), rebuilt(batch))


def test_norm_weight_decay_puts_batchnorm_and_biases_in_their_own_group():
    model = network.build_model("resnet10", 3, stem="small", width=8)
    args = argparse.Namespace(
        optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, norm_weight_decay=0.0, nesterov=True
    )
    optimizer = network.build_optimizer(model, args)
    decayed, exempt = optimizer.param_groups
    assert decayed["weight_decay"] == 5e-4 and exempt["weight_decay"] == 0.0 and decayed["nesterov"] is True
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in exempt["params"])
    assert len(decayed["params"]) + len(exempt["params"]) == len(list(model.parameters()))
    args.norm_weight_decay = None  # unset: one group, torchvision's reference behaviour
    assert len(network.build_optimizer(model, args).param_groups) == 1


def test_small_input_transforms_keep_the_size_and_the_flip_is_optional():
    steps = [
        type(step).__name__ for step in presets.train_transform(32, flip=False, small=True, strong=True).transforms
    ]
    assert "RandomHorizontalFlip" not in steps and {"RandomCrop", "RandomAffine"} <= set(steps)
    image = Image.new("RGB", (40, 30), (120, 30, 30))
    assert presets.train_transform(32, small=True)(image).shape == (3, 32, 32)
    preprocessing = presets.eval_preprocessing(32, small=True)
    assert preprocessing["resize"] == preprocessing["crop"] == 32  # no 256/224 margin cropped off a small image
    assert presets.eval_preprocessing(224)["resize"] == 256  # the ImageNet path as before
    large = [type(step).__name__ for step in presets.train_transform(224).transforms]
    assert large[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]


# ---------------------------------------------------------------------------------------- the plan


def test_flip_check_refuses_a_flip_where_mirroring_changes_the_class(tmp_path):
    bars = write_channel(tmp_path / "bars", bar_image, ("left", "right"), 30, 32)
    allowed, why = plan.flip_check(bars, seed=0)
    assert not allowed and "flip off" in why
    shapes = write_channel(tmp_path / "shapes", shape_image, ("circle", "square"), 30, 32)
    allowed, why = plan.flip_check(shapes, seed=0)
    assert allowed and "flip on" in why


def test_small_images_get_the_small_input_recipe(tmp_path, capsys, monkeypatch):
    items = write_channel(tmp_path / "bars", bar_image, ("left", "right"), 30, 28)
    threads: list[int] = []
    monkeypatch.setattr(plan.torch, "set_num_threads", threads.append)  # not this test process's threads
    args = parse("--time-limit", "60")
    plan.plan_options(args, items, ["left", "right"], CPU, pretrained=False)
    assert (args.image_size, args.stem, args.arch, args.width, args.recipe) == (32, "small", "resnet10", 16, "small")
    assert (args.batch_size, args.lr, args.nesterov, args.norm_weight_decay) == (16, 0.1, True, 0.0)
    assert (args.label_smoothing, args.workers, args.flip) == (0.1, 0, "off")
    assert threads == [args.threads] and args.threads >= 1  # 1 on a busy machine, else torch's default
    assert "plan (small inputs, 2 classes): image size 32 (images' median side 28 px)" in capsys.readouterr().out


def test_what_the_command_line_sets_is_kept_and_large_images_keep_the_imagenet_recipe(tmp_path):
    items = write_channel(tmp_path / "bars", bar_image, ("left", "right"), 4, 100)
    args = parse("--batch-size", "8", "--lr", "0.05", "--flip", "on", "--threads", "1")
    plan.plan_options(args, items, ["left", "right"], CPU, pretrained=False)
    assert (args.image_size, args.stem, args.arch, args.width) == (224, "imagenet", "resnet18", 64)
    assert (args.batch_size, args.lr, args.flip, args.norm_weight_decay, args.nesterov) == (8, 0.05, "on", None, False)
    small = write_channel(tmp_path / "small", bar_image, ("left", "right"), 4, 32)
    pretrained = parse("--threads", "1")
    plan.plan_options(pretrained, small, ["left", "right"], CPU, pretrained=True)
    assert (pretrained.image_size, pretrained.stem, pretrained.width, pretrained.label_smoothing) == (
        224,
        "imagenet",
        64,
        0.0,
    )  # pretrained weights: the layers they were trained with, at their size
    forced = parse("--image-size", "48", "--stem", "imagenet", "--threads", "1")
    plan.plan_options(forced, small, ["left", "right"], CPU, pretrained=False)
    assert (forced.stem, forced.width, forced.image_size) == ("imagenet", 64, 48)


def test_planned_epochs_are_cut_when_the_epochs_so_far_say_the_budget_would_not_hold_them():
    args = argparse.Namespace(epochs_planned=True, epochs=20, time_limit=100.0)
    started = __import__("time").monotonic() - 50  # 50 s spent, 10 epochs of 5 s
    plan.fit_epochs_to_budget(args, [{"seconds": 5.0}] * 10, started, CPU)
    assert 18 <= args.epochs <= 19  # 50 s left less the reserve: 9 more epochs of 5 s, not 10
    args = argparse.Namespace(epochs_planned=True, epochs=12, time_limit=100.0)
    plan.fit_epochs_to_budget(args, [{"seconds": 2.0}] * 10, started, CPU)
    assert args.epochs == 12  # room for them: never more than planned
    given = argparse.Namespace(epochs_planned=False, epochs=20, time_limit=100.0)
    plan.fit_epochs_to_budget(given, [{"seconds": 5.0}] * 10, started, CPU)
    assert given.epochs == 20  # epochs asked for: the time limit alone stops them


# ------------------------------------------------------------------------------- one real training


@pytest.mark.slow
def test_a_planned_small_image_run_trains_and_its_artifact_serves(tmp_path):
    """train.py with only a time limit on 28-px images: the plan, the small stem, inference on it."""
    write_channel(tmp_path / "train", bar_image, ("left", "right"), 12, 28)
    write_channel(tmp_path / "validation", bar_image, ("left", "right"), 4, 28)
    env = script_env({k: v for k, v in os.environ.items() if not k.startswith("SM_")})
    env |= {"SM_CHANNEL_TRAIN": str(tmp_path / "train"), "SM_CHANNEL_VALIDATION": str(tmp_path / "validation")}
    env |= {"SM_MODEL_DIR": str(tmp_path / "model"), "SM_OUTPUT_DATA_DIR": str(tmp_path / "out"), "SM_NUM_GPUS": "0"}
    flags = ["--time-limit", "6", "--seed", "1", "--threads", "1"]
    result = subprocess.run(
        [sys.executable, str(TRAIN_PY), *flags], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resnet10, small stem, width 16 (24 training images)" in result.stdout
    assert "flip off" in result.stdout and "s per epoch probed" in result.stdout
    metadata = json.loads((tmp_path / "model" / "metadata.json").read_text())
    hyperparameters = metadata["hyperparameters"]
    assert metadata["arch"] == "resnet10" and metadata["image_size"] == 32
    assert (hyperparameters["stem"], hyperparameters["width"], hyperparameters["epochs_planned"]) == ("small", 16, True)
    assert 1 <= metadata["epochs_run"] <= hyperparameters["epochs"]
    assert metadata["preprocessing"]["resize"] == metadata["preprocessing"]["crop"] == 32
    model = inference.model_fn(str(tmp_path / "model"))
    assert model.network.conv1.kernel_size == (3, 3)
    frame = pd.DataFrame({"path": ["img/left_0.png", "img/right_0.png"]})
    frame.attrs["image_root"] = str(tmp_path / "validation")
    scored = inference.predict_fn(frame, model)
    assert list(scored.columns) == ["prediction", "proba_left", "proba_right"]
    assert np.allclose(scored[["proba_left", "proba_right"]].sum(axis=1), 1.0, atol=1e-5)
