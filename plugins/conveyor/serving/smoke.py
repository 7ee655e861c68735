"""The deploy smoke test: held-out rows scored by the candidate on the endpoint must match the
predictions the evaluation made of the same rows. It authenticates as any client does (a SigV4
signature with the endpoint's access key, or its bearer token: :mod:`conveyor.serving.auth`)."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.errors import ConveyorError
from conveyor.lake import Lake
from conveyor.serving.auth import auth_headers

if TYPE_CHECKING:
    from conveyor.spec import PipelineSpec

MIN_AGREEMENT = 0.99
MAX_PROBA_DIFF = 1e-3


class SmokeTestFailed(ConveyorError):
    """The candidate answered wrongly or not at all: the rollout is rolled back (not retried)."""


def _request(spec: PipelineSpec, lake: Lake, train_run: str, rows: int, scratch: Path) -> tuple[bytes, str, Any]:
    """The smoke test's request: up to ``rows`` held-out rows of the training run, as the endpoint takes them.

    :param spec: the pipeline (its data format and label).
    :param lake: the lake.
    :param train_run: the run that trained the model.
    :param rows: how many held-out rows.
    :param scratch: a folder for the images of an image pipeline.
    :return: the body, its content type, and the rows sent.
    """
    import pandas as pd

    from conveyor.data.splits import read_part
    from conveyor.training.evaluate import read_image_part

    if spec.data.format == "images":
        test = read_image_part(lake, spec.name, train_run, "test", scratch).head(rows)
        instances = [{"b64": base64.b64encode(Path(p).read_bytes()).decode()} for p in test["path"]]
        return pd.io.json.ujson_dumps({"instances": instances}).encode(), "application/json", test
    test = read_part(lake, spec.name, train_run, "test").head(rows)
    features = test.drop(columns=[spec.data.label])
    return features.to_csv(index=False).encode(), "text/csv", test


def smoke_test(
    url: str, spec: PipelineSpec, lake: Lake, train_run: str, rows: int = 50, target: str = "candidate"
) -> dict[str, Any]:
    """Score up to ``rows`` held-out rows on the endpoint and compare with the evaluation.

    :param url: the endpoint's base URL.
    :param spec: the pipeline.
    :param lake: the lake.
    :param train_run: the run that trained the model (its test split and evaluation are used).
    :param rows: how many held-out rows to send.
    :param target: ``candidate`` (during a rollout) or ``live``.
    :raises SmokeTestFailed: naming what differed.
    """
    import httpx
    import pandas as pd

    with (lake.reports(spec.name, train_run) / "evaluation" / "predictions.parquet").open("rb") as handle:
        expected = pd.read_parquet(handle).head(rows)
    with tempfile.TemporaryDirectory(prefix="conveyor-smoke-") as tmp:
        body, content_type, _ = _request(spec, lake, train_run, rows, Path(tmp))
    headers = {"Content-Type": content_type, "Accept": "application/json"}
    if target == "candidate":
        headers["X-Conveyor-Target"] = "candidate"
    headers = auth_headers("POST", f"{url}/invocations", body, headers)  # SigV4 (or the bearer token)
    try:
        response = httpx.post(f"{url}/invocations", content=body, headers=headers, timeout=60)
    except httpx.HTTPError as exc:
        raise SmokeTestFailed(f"the endpoint at {url} did not answer the smoke test: {exc}") from None
    if response.status_code != 200:
        raise SmokeTestFailed(
            f"the {target} answered the smoke test with {response.status_code}: {response.text[:500]}"
        )
    answers = response.json()["predictions"]
    if len(answers) != len(expected):
        raise SmokeTestFailed(f"the {target} returned {len(answers)} predictions for {len(expected)} rows")
    pairs = zip(answers, expected["prediction"], strict=True)
    agree = sum(str(a["prediction"]) == str(e) for a, e in pairs) / len(expected)
    proba_columns = [c for c in expected.columns if c.startswith("proba_")]
    worst = 0.0
    for answer, (_, row) in zip(answers, expected.iterrows(), strict=True):
        for column in proba_columns:
            got = (answer.get("probabilities") or {}).get(column[len("proba_") :])
            if got is not None:
                worst = max(worst, abs(float(got) - float(row[column])))
    result = {
        "rows": len(expected),
        "agreement": agree,
        "max_proba_diff": worst,
        "version": response.headers.get("X-Conveyor-Model-Version"),
    }
    if agree < MIN_AGREEMENT or worst > MAX_PROBA_DIFF:
        raise SmokeTestFailed(
            f"the {target}'s answers differ from its evaluation: {agree:.1%} of {len(expected)} predictions agree "
            f"(need {MIN_AGREEMENT:.0%}), largest probability difference {worst:.4f} (allowed {MAX_PROBA_DIFF})"
        )
    return result
