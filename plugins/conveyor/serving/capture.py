"""Data capture of the model server: a sampled share of live requests and responses, as JSON lines.

Lines go to ``<folder>/<yyyy-mm-dd>/<pid>.jsonl`` (UTC date; one file per worker, so no two
processes append to the same file); ``conveyor.monitoring.records`` reads them back. Each line is
``{"timestamp", "endpoint", "version", "inference_id", "request": {"content_type", "accept",
"body"}, "response": {"content_type", "body"}}``, a body being ``{"encoding": "text"|"base64", "data"}``.

Nothing here imports Airflow: the server workers import this module.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import random
import threading
from pathlib import Path

logger = logging.getLogger("conveyor.serving")


class Capture:
    """Appends a sampled share of live requests and responses as JSON lines.

    :param folder: the capture folder.
    :param share: the share of requests kept, 0..1.
    :param endpoint: the endpoint name, written in every line.
    """

    def __init__(self, folder: Path, share: float, endpoint: str):
        self.folder = folder
        self.share = share
        self.endpoint = endpoint
        self._lock = threading.Lock()

    def sampled(self) -> bool:
        """Whether to capture the next request (a draw against ``share``)."""
        return self.share > 0 and (self.share >= 1 or random.random() < self.share)

    @staticmethod
    def _payload(data: bytes | str) -> dict[str, str]:
        """A body as JSON: text when it is UTF-8, else base64.

        :param data: the body.
        """
        if isinstance(data, str):
            return {"encoding": "text", "data": data}
        try:
            return {"encoding": "text", "data": data.decode("utf-8")}
        except UnicodeDecodeError:
            return {"encoding": "base64", "data": base64.b64encode(data).decode("ascii")}

    def write(
        self,
        version: str,
        content_type: str | None,
        accept: str | None,
        body: bytes,
        response: bytes | str,
        response_type: str,
        inference_id: str | None = None,
    ) -> None:
        """Append one request and its response (blocking; never raises).

        :param version: the model version that answered.
        :param content_type: the request's content type.
        :param accept: the request's accept.
        :param body: the request body.
        :param response: the response body.
        :param response_type: the response's content type.
        :param inference_id: the client's inference id, if it sent one.
        """
        now = dt.datetime.now(dt.UTC)
        record = {
            "timestamp": now.isoformat(timespec="milliseconds"),
            "endpoint": self.endpoint,
            "version": version,
            "inference_id": inference_id,
            "request": {"content_type": content_type, "accept": accept, "body": self._payload(body)},
            "response": {"content_type": response_type, "body": self._payload(response)},
        }
        path = self.folder / now.strftime("%Y-%m-%d") / f"{os.getpid()}.jsonl"
        try:
            with self._lock:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
        except OSError:
            logger.warning("data capture: could not append to %s", path, exc_info=True)
