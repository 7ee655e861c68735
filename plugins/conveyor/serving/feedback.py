"""``POST /feedback`` of the model server: ground truth for earlier predictions, as label drops.

The body is ``{"id": ..., "label": ...}``, a list of them, or ``{"feedback": [...]}``. An id is the
request's id column value, or the inference id a client sent in ``X-Amzn-SageMaker-Inference-Id``
(as ``invoke_endpoint(InferenceId=...)`` does), which is captured with the request. Labels outside
the live model's classes get a 400; accepted records become one feedback drop (``feedback.jsonl``
+ ``_SUCCESS``, the marker last) in ``CONVEYOR_FEEDBACK_DIR`` (``landing/<p>/feedback``) that
``<name>__monitor`` reads.

Nothing here imports Airflow: the server workers import this module.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi.responses import JSONResponse, Response

from conveyor.serving.http import error_response

MAX_FEEDBACK_BYTES = 1 << 20


async def feedback_route(body: bytes, endpoint: str, folder: Path | None, live: Any) -> Response:
    """Answer ``POST /feedback`` (its body already read and its credentials checked by the app): 202 or 4xx.

    :param body: the request body (at most :data:`MAX_FEEDBACK_BYTES`).
    :param endpoint: the endpoint's name (for messages).
    :param folder: where drops go; None when feedback is off (404).
    :param live: the live model (its class labels check the labels), or None.
    """
    if folder is None:
        return error_response(404, f"endpoint {endpoint}: feedback is not enabled (no CONVEYOR_FEEDBACK_DIR)")
    try:
        drop = await anyio.to_thread.run_sync(write_feedback, folder, body, live)
    except ValueError as error:
        return error_response(400, f"feedback: {error}")
    return JSONResponse(status_code=202, content={"accepted": drop["records"], "drop": drop["name"]})


def write_feedback(folder: Path, body: bytes, live: Any) -> dict[str, Any]:
    """Check a ``POST /feedback`` body and write it as one complete feedback drop.

    :param folder: ``landing/<pipeline>/feedback``.
    :param body: the request body (JSON).
    :param live: the live model (``live.loaded.metadata.class_labels`` checks the labels), or None.
    :raises ValueError: a body or label that breaks a rule (answered with 400).
    """
    import uuid

    from conveyor.monitoring.feedback import canonical_label, feedback_records

    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the body is not JSON ({error})") from None
    except RecursionError:
        raise ValueError("the body nests JSON arrays or objects too deeply to parse") from None
    records = feedback_records(payload)
    classes = [str(c) for c in ((live.loaded.metadata.class_labels or []) if live is not None else [])]
    if classes:
        for number, record in enumerate(records, start=1):
            label = canonical_label(record["label"], classes)
            if label is None:
                raise ValueError(f"record {number}: label {record['label']!r} is outside the class set {classes}")
            record["label"] = label
    now = dt.datetime.now(dt.UTC)
    drop = folder / f"api-{now.strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    drop.mkdir(parents=True, exist_ok=False)
    (drop / "feedback.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (drop / "_SUCCESS").write_text("")  # the marker last: the drop is complete
    return {"name": drop.name, "records": len(records)}
