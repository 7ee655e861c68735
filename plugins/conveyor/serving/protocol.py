"""uvicorn's httptools protocol with a cap on the request head: 431 Request Header Fields Too Large.

httptools (llhttp) accepts a request line and headers of any size, buffering them until the
head is complete (64 KB and 8 MB headers were accepted). :class:`LimitedHttpToolsProtocol`
counts the bytes received while a request's head is incomplete and answers 431 (then closes the
connection) as soon as they pass ``CONVEYOR_MAX_HEADER_BYTES`` (16 KiB by default), and checks
the complete head exactly (request line + every header) before the app sees the request.
``process.start_endpoint`` runs uvicorn with ``--http conveyor.serving.protocol:LimitedHttpToolsProtocol``;
the app checks the same limit again (:class:`conveyor.serving.app` middleware), for a server started
without it.

:func:`requests_in_flight` tells the batcher how many requests this worker process has started and
not yet answered (uvicorn's request tasks, counted from the moment a request's head is parsed), so a
request alone on an idle worker can be predicted on the event loop without a thread hand-off
(:mod:`conveyor.serving.batching`).

Nothing here imports Airflow: the server workers import this module.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from conveyor import settings
from conveyor.serving.http import ERROR_TYPE_HEADER, head_size, too_large_message


class HeadTooLarge(Exception):
    """The request line and headers passed the limit (raised inside a parser callback)."""


@functools.cache
def _max_header_bytes() -> int:
    """``CONVEYOR_MAX_HEADER_BYTES``, read once per worker."""
    return settings.server_settings().max_header_bytes


_server_state: Any = None  # this worker's uvicorn ServerState, kept by the first connection


def requests_in_flight() -> int | None:
    """Requests this worker process has started and not finished; None when no connection came through this protocol.

    uvicorn adds a request's task to ``ServerState.tasks`` as soon as its head is parsed and removes it
    when the task ends (answered, failed or its client gone), so requests whose handlers have not run
    yet count too.
    """
    return None if _server_state is None else len(_server_state.tasks)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that answers 431 to a request head over ``max_header_bytes``.

    :param args: uvicorn's protocol arguments (config, server state, app state).
    :param kwargs: the same, by name.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        global _server_state
        _server_state = self.server_state  # one per worker process, shared by its connections
        self.max_header_bytes = _max_header_bytes()
        self._awaiting_head = True
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        """Feed the parser; answer 431 when the head of the current request grows past the limit.

        :param data: the bytes received.
        """
        if self._awaiting_head:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as error:
            if isinstance(error.__context__, HeadTooLarge) or isinstance(error, HeadTooLarge):
                self.send_431_response()
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        if self._awaiting_head and self._head_bytes > self.max_header_bytes:
            self.send_431_response()

    def on_message_begin(self) -> None:
        """A new request: its head is being received."""
        super().on_message_begin()
        self._awaiting_head = True

    def on_headers_complete(self) -> None:
        """The head is complete: check its exact size before the request reaches the app."""
        self._awaiting_head = False
        self._head_bytes = 0
        if head_size(self.url, self.headers) > self.max_header_bytes:
            raise HeadTooLarge()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The request is complete: the next bytes belong to the next request's head."""
        super().on_message_complete()
        self._awaiting_head = True
        self._head_bytes = 0

    def send_431_response(self) -> None:
        """Answer 431 (the SageMaker error shape) and close the connection."""
        if self.transport.is_closing():
            return
        message = too_large_message(self.max_header_bytes)
        body = json.dumps({"message": message, "error": message}).encode()
        head = (
            "HTTP/1.1 431 Request Header Fields Too Large\r\n"
            "content-type: application/json\r\n"
            f"{ERROR_TYPE_HEADER}: ValidationError\r\n"
            f"content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()
