"""``bench/train_images.py --small``: the ResNet trainer's accuracy on a small-image set against
classifiers on raw pixels, on the same split, at the pipeline's default budget.

Data: scikit-learn's digits (1,797 greyscale 8x8 images of 10 classes, shipped inside the package;
nothing is downloaded), upscaled to ``--image-px`` (bilinear) and written as PNG files in an
ImageFolder drop (``<class>/<image>.png``) in a temporary folder. Split as the pipeline splits a
drop (``conveyor.data.splits.split_frame`` with the spec's default split: 70/15/15, seed 42,
stratified); the train and validation parts become the trainer's channels (images and
``manifest.csv``), as the local backend gives them.

- **ours**: ``include/training/resnet_image/train.py`` as a child process (the local backend's way:
  ``SM_*`` variables, the contract module on ``PYTHONPATH``) with exactly the flags a pipeline with
  no hyperparameters passes (``--time-limit <budget> --seed <split seed>``), so every other option
  is planned by the trainer; the test part is scored through the inference handlers
  (``model_fn``, ``predict_fn`` with a ``path`` column), as the evaluate task does.
- **baselines**: scikit-learn's ``LogisticRegression(max_iter=2000)`` and
  ``HistGradientBoostingClassifier()`` (defaults) on the raw pixels of the same PNG files (greyscale,
  scaled to [0, 1]), fit on train + validation (every image ours may learn from or select with).

``ratio`` = ours' test accuracy / the best baseline's (target >= 1.0). Also: balanced accuracy,
the trainer's wall time against its budget and what it planned (its ``plan:`` lines).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "include" / "training" / "resnet_image" / "train.py"
INFERENCE_PY = "include/inference/resnet_image/inference.py"
TARGET_RATIO = 1.0


def progress(message: str) -> None:
    """Print one progress line at once."""
    print(f"[train_images --small] {message}", flush=True)


def write_digits(root: Path, px: int) -> Any:
    """scikit-learn's digits as an ImageFolder drop of ``px``-pixel PNGs; a frame of path, label.

    :param root: the drop folder.
    :param px: the side the 8x8 images are upscaled to.
    """
    import numpy as np
    import pandas as pd
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = []
    for index, (values, label) in enumerate(zip(digits.data, digits.target, strict=True)):
        image = Image.fromarray((values.reshape(8, 8) * 255 / 16).round().astype(np.uint8), mode="L")
        name = f"{label}/{index:04d}.png"
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        image.resize((px, px), Image.Resampling.BILINEAR).save(root / name)
        rows.append({"path": name, "label": str(label)})
    return pd.DataFrame(rows)


def split(frame: Any) -> dict[str, Any]:
    """The pipeline's split of the drop (the spec's default split settings)."""
    from conveyor.data.splits import split_frame
    from conveyor.spec import SplitSpec

    spec = SimpleNamespace(data=SimpleNamespace(label="label", problem_type="image_classification"), split=SplitSpec())
    return split_frame(frame, spec, "digits")  # type: ignore[arg-type]


def write_channel(drop: Path, part: Any, target: Path) -> None:
    """A part as a training channel: its images and ``manifest.csv``."""
    for rel in part["path"]:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes((drop / rel).read_bytes())
    part[["path", "label"]].to_csv(target / "manifest.csv", index=False)


def pixels(drop: Path, part: Any) -> Any:
    """The raw pixels of a part's images (greyscale, [0, 1]), one row per image."""
    import numpy as np
    from PIL import Image

    return np.stack(
        [np.asarray(Image.open(drop / rel).convert("L"), dtype=np.float32).ravel() / 255 for rel in part["path"]]
    )


def baselines(drop: Path, parts: dict[str, Any]) -> dict[str, Any]:
    """Logistic regression and HistGradientBoosting on raw pixels, fit on train + validation, scored on test."""
    import pandas as pd
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    fit = pd.concat([parts["train"], parts["validation"]])
    x_fit, x_test = pixels(drop, fit), pixels(drop, parts["test"])
    results = {}
    for name, model in (
        ("logistic_regression", LogisticRegression(max_iter=2000)),
        ("hist_gradient_boosting", HistGradientBoostingClassifier(random_state=0)),
    ):
        started = time.perf_counter()
        model.fit(x_fit, fit["label"])
        predicted = model.predict(x_test)
        results[name] = {
            "accuracy": round(float(accuracy_score(parts["test"]["label"], predicted)), 4),
            "balanced_accuracy": round(float(balanced_accuracy_score(parts["test"]["label"], predicted)), 4),
            "seconds": round(time.perf_counter() - started, 1),
        }
        progress(f"{name}: test accuracy {results[name]['accuracy']} ({results[name]['seconds']} s)")
    return results


def train_ours(channels: Path, out: Path, budget: int, seed: int) -> dict[str, Any]:
    """Run train.py as the local backend does; its wall time and plan lines."""
    sys.path.append(str(ROOT / "tests"))
    from scripts import script_env

    env = script_env({k: v for k, v in os.environ.items() if not k.startswith("SM_")})
    env |= {
        "SM_CHANNEL_TRAIN": str(channels / "train"),
        "SM_CHANNEL_VALIDATION": str(channels / "validation"),
        "SM_MODEL_DIR": str(out / "model"),
        "SM_OUTPUT_DATA_DIR": str(out / "output"),
        "SM_NUM_GPUS": "0",
    }
    flags = ["--time-limit", str(budget), "--seed", str(seed)]
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(TRAIN_PY), *flags], env=env, capture_output=True, text=True, timeout=budget * 2 + 300
    )
    seconds = time.perf_counter() - started
    lines = [line for line in result.stdout.splitlines() if line.startswith("[train.py]")]
    if result.returncode != 0:
        raise SystemExit("train.py failed:\n" + "\n".join(lines[-20:]) + result.stderr[-3000:])
    for line in lines:
        if re.search(r"plan|start:|validation:|saved:|stopp", line):
            progress(line)
    return {"seconds": round(seconds, 1), "flags": flags, "plan": [line for line in lines if "plan" in line]}


def score_ours(model_dir: Path, drop: Path, test: Any) -> dict[str, Any]:
    """The test part scored through the inference handlers, as the evaluate task scores it."""
    sys.path.append(str(ROOT / "tests"))
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    from scripts import load_script

    inference = load_script(INFERENCE_PY, "resnet_image_inference")
    model = inference.model_fn(str(model_dir))
    frame = test[["path"]].reset_index(drop=True)
    frame.attrs["image_root"] = str(drop)
    predicted = inference.predict_fn(frame, model)["prediction"].astype(str)
    metadata = model.metadata
    return {
        "accuracy": round(float(accuracy_score(test["label"], predicted)), 4),
        "balanced_accuracy": round(float(balanced_accuracy_score(test["label"], predicted)), 4),
        "validation_score": metadata.validation_score,
        "epochs_run": metadata.epochs_run,
        "best_epoch": metadata.best_epoch,
        "stopped": metadata.stopped,
        "planned": {
            key: (metadata.hyperparameters or {}).get(key)
            for key in ("arch", "stem", "width", "image_size", "epochs", "batch_size", "lr", "augment", "flip")
        },
    }


def run_small(args: argparse.Namespace) -> dict[str, Any]:
    """The whole comparison; the figures (the JSON line)."""
    sys.path.insert(0, str(ROOT / "plugins"))
    from conveyor.spec import SplitSpec, TrainerSpec

    budget = args.budget or (60 if args.quick else int(TrainerSpec.model_fields["time_limit"].default))
    load_before = os.getloadavg()
    progress(f"budget {budget} s, digits at {args.image_px} px, {os.cpu_count()} cores, load {load_before[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-small-images-") as tmp_name:
        tmp = Path(tmp_name)
        frame = write_digits(tmp / "drop", args.image_px)
        parts = split(frame)
        for name in ("train", "validation"):
            write_channel(tmp / "drop", parts[name], tmp / "channels" / name)
        progress("split: " + ", ".join(f"{name} {len(part)}" for name, part in parts.items()))
        ours_run = train_ours(tmp / "channels", tmp / "run", budget, SplitSpec().seed)
        ours = {**score_ours(tmp / "run" / "model", tmp / "drop", parts["test"]), **ours_run}
        progress(f"ours: test accuracy {ours['accuracy']} ({ours['seconds']} s on a {budget} s budget)")
        base = baselines(tmp / "drop", parts)
    best_name = max(base, key=lambda name: base[name]["accuracy"])
    ratio = ours["accuracy"] / base[best_name]["accuracy"]
    return {
        "bench": "train_images_small",
        "baseline": f"best of scikit-learn LogisticRegression / HistGradientBoosting on raw pixels: {best_name}",
        "ratio": round(ratio, 4),
        "data": {
            "set": "sklearn digits (8x8, 10 classes)",
            "image_px": args.image_px,
            **{k: len(v) for k, v in parts.items()},
        },
        "budget_s": budget,
        "ours": ours,
        "baselines": base,
        "wall_over_budget": round(ours["seconds"] / budget, 3),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "targets": {"ratio": f">= {TARGET_RATIO}"},
        "met": {"ratio": ratio >= TARGET_RATIO},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--small`` mode's options."""
    parser.add_argument(
        "--small",
        action="store_true",
        help="quality mode: the trainer's test accuracy on sklearn's digits against raw-pixel baselines",
    )
    parser.add_argument("--budget", type=int, default=None, help="--small: the time limit (default: the spec's)")
    parser.add_argument("--image-px", type=int, default=32, help="--small: the side the digits are upscaled to")
