"""Demo data the project generates itself (nothing is downloaded): a customer-churn table.

Binary label ``churned`` (``yes``/``no``) driven by contract, tenure, charges and support calls
through a logistic model with noise, numeric and categorical columns, and some nulls.

And a small image-classification set, ``shapes``: circles, squares and triangles of random size,
colour and position on noisy backgrounds, as PNG and JPEG files in an ImageFolder layout.

Command line: ``python -m conveyor.demo drop --rows 5000 --drop 2026-01-01`` writes a complete
drop (data file and ``_SUCCESS`` marker) into ``landing/churn/`` of the configured lake;
``python -m conveyor.demo images --per-class 60`` does the same for ``landing/shapes/``.
"""

from __future__ import annotations

import argparse
from typing import Any

CONTRACTS = ["month-to-month", "one-year", "two-year"]
PAYMENTS = ["card", "bank-transfer", "electronic-check", "mailed-check"]
INTERNET = ["dsl", "fiber", "none"]
REGIONS = ["north", "south", "east", "west"]


def shifted_churn_logit(columns: Any) -> Any:
    """The churn log-odds after a market shift (the demo's drift): a competitor's fibre offer makes
    fibre customers leave whatever their contract, long contracts included; the old drivers
    (:func:`churn_logit`) keep less than a third of their weight.

    :param columns: as for :func:`churn_logit`.
    """
    import numpy as np

    fibre = np.asarray(columns["internet_service"]) == "fiber"
    two_year = np.asarray(columns["contract"]) == "two-year"
    return 0.3 * churn_logit(columns) + np.where(fibre, 2.0, -1.5) + 0.8 * two_year - 0.8


def churn_logit(columns: Any) -> Any:
    """The generator's churn log-odds without its noise (a ceiling for any model of these columns).

    Churn as it behaves in real subscription data: most of it in the first months, a jump once
    support calls pile up, expensive fibre plans on monthly contracts most at risk, and the
    youngest and oldest customers least loyal.

    :param columns: a DataFrame or mapping with contract, tenure_months, monthly_charges,
        support_calls, internet_service and age.
    """
    import numpy as np

    contract = np.asarray(columns["contract"])
    tenure = np.asarray(columns["tenure_months"], dtype=float)
    monthly = np.asarray(columns["monthly_charges"], dtype=float)
    calls = np.asarray(columns["support_calls"], dtype=float)
    fibre = np.asarray(columns["internet_service"]) == "fiber"
    age = np.asarray(columns["age"], dtype=float)
    month_to_month = contract == "month-to-month"
    return (
        -0.9
        + np.select([month_to_month, contract == "one-year"], [1.4, 0.1], -1.2)
        - 1.1 * np.log1p(tenure) / np.log(73) * 2
        + 0.012 * (monthly - 65)
        + np.where(calls >= 4, 1.3, 0.15 * calls)
        + np.where(fibre & (monthly > 85) & month_to_month, 1.1, 0.0)
        + 0.0012 * (age - 45) ** 2
        - 0.4
    )


def churn_frame(rows: int, seed: int = 7, shifted: bool = False) -> Any:
    """A churn table of ``rows`` customers (pandas DataFrame), the same for the same seed.

    :param rows: customers.
    :param seed: the generator seed.
    :param shifted: after the demo's market shift: more fibre, higher charges, more long contracts
        and more support calls (data drift), and churn driven by :func:`shifted_churn_logit` (concept drift).
    """
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    contract = rng.choice(CONTRACTS, rows, p=[0.25, 0.30, 0.45] if shifted else [0.55, 0.25, 0.20])
    tenure = rng.integers(0, 73, rows)
    internet = rng.choice(INTERNET, rows, p=[0.15, 0.75, 0.10] if shifted else [0.35, 0.45, 0.20])
    monthly = np.round(
        rng.normal(85 if shifted else 65, 25, rows).clip(18, 140 if shifted else 120)
        + np.where(internet == "fiber", 15, 0),
        2,
    )
    support_calls = rng.poisson(3.5 if shifted else 1.5, rows).clip(0, 12)
    age = rng.integers(18, 91, rows)
    columns = {
        "contract": contract,
        "tenure_months": tenure,
        "monthly_charges": monthly,
        "support_calls": support_calls,
        "internet_service": internet,
        "age": age,
    }
    logit = (shifted_churn_logit if shifted else churn_logit)(columns) + rng.normal(0, 0.6, rows)
    churned = np.where(rng.random(rows) < 1 / (1 + np.exp(-logit)), "yes", "no")
    total = np.round(monthly * np.maximum(tenure, 1) * rng.uniform(0.95, 1.05, rows), 2)
    frame = pd.DataFrame(
        {
            "customer_id": [f"C{seed:02d}{i:08d}" for i in range(rows)],
            "tenure_months": tenure,
            "monthly_charges": monthly,
            "total_charges": total,
            "contract": contract,
            "payment_method": rng.choice(PAYMENTS, rows),
            "internet_service": internet,
            "support_calls": support_calls,
            "age": age,
            "region": rng.choice(REGIONS, rows),
            "churned": churned,
        }
    )
    # Realistic gaps: new customers have no total yet, some regions were never recorded.
    frame.loc[rng.random(rows) < 0.02, "total_charges"] = np.nan
    frame.loc[rng.random(rows) < 0.05, "region"] = None
    return frame


def write_drop(rows: int, drop: str, seed: int = 7, pipeline: str = "churn", fmt: str = "csv") -> str:
    """Write a complete drop (data, then its ``_SUCCESS`` marker) into the configured lake.

    :param rows: rows to generate.
    :param drop: the drop's folder name in ``landing/<pipeline>/``.
    :param seed: the generator seed.
    :param pipeline: the pipeline whose landing zone receives it.
    :param fmt: ``csv`` or ``parquet``.
    :return: the drop's URI.
    """
    from conveyor.lake import Lake

    lake = Lake.from_env()
    target = lake.landing(pipeline, drop)
    target.mkdir(parents=True, exist_ok=True)
    frame = churn_frame(rows, seed)
    with (target / f"customers.{fmt}").open("wb") as handle:
        if fmt == "csv":
            frame.to_csv(handle, index=False)
        else:
            frame.to_parquet(handle, index=False)
    (target / "_SUCCESS").write_bytes(b"")
    return str(target)


SHAPES = ("circle", "square", "triangle")


def shape_image(shape: str, size: int, rng: Any) -> Any:
    """One RGB PIL image of a shape on a noisy background."""
    import numpy as np
    from PIL import Image, ImageDraw

    background = rng.integers(0, 90, 3)
    pixels = np.clip(background + rng.normal(0, 18, (size, size, 3)), 0, 255).astype("uint8")
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    extent = int(rng.integers(size // 3, int(size * 0.8)))
    x0, y0 = (int(v) for v in rng.integers(0, size - extent, 2))
    box = (x0, y0, x0 + extent, y0 + extent)
    colour = tuple(int(v) for v in rng.integers(120, 256, 3))
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=colour)
    return image


def write_image_drop(per_class: int, drop: str, seed: int = 11, size: int = 64, pipeline: str = "shapes") -> str:
    """Write a complete ImageFolder drop (``<class>/<n>.png|jpg``, then ``_SUCCESS``) into landing.

    :param per_class: images per class.
    :param drop: the drop's folder name.
    :param seed: the generator seed.
    :param size: image width and height in pixels.
    :param pipeline: the pipeline whose landing zone receives it.
    :return: the drop's URI.
    """
    import io

    import numpy as np

    from conveyor.lake import Lake

    rng = np.random.default_rng(seed)
    target = Lake.from_env().landing(pipeline, drop)
    for shape in SHAPES:
        (target / shape).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            image = shape_image(shape, size, rng)
            buffer = io.BytesIO()
            fmt = "JPEG" if n % 3 == 0 else "PNG"
            image.save(buffer, fmt, quality=92) if fmt == "JPEG" else image.save(buffer, fmt)
            (target / shape / f"{n:04d}.{'jpg' if fmt == 'JPEG' else 'png'}").write_bytes(buffer.getvalue())
    (target / "_SUCCESS").write_bytes(b"")
    return str(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    drop = sub.add_parser("drop", help="write a complete churn drop into landing")
    drop.add_argument("--rows", type=int, default=5000, help="rows to generate")
    drop.add_argument("--drop", default="demo-0001", help="drop folder name")
    drop.add_argument("--seed", type=int, default=7, help="generator seed")
    drop.add_argument("--format", choices=["csv", "parquet"], default="csv", help="file format")
    images = sub.add_parser("images", help="write a complete shapes image drop into landing")
    images.add_argument("--per-class", type=int, default=60, help="images per class")
    images.add_argument("--drop", default="demo-0001", help="drop folder name")
    images.add_argument("--seed", type=int, default=11, help="generator seed")
    args = parser.parse_args(argv)
    from conveyor.settings import mask_url

    if args.command == "images":
        print(mask_url(write_image_drop(args.per_class, args.drop, args.seed)))
    else:
        print(mask_url(write_drop(args.rows, args.drop, args.seed, fmt=args.format)))


if __name__ == "__main__":
    main()
