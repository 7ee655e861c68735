"""The endpoint's process supervisor: uvicorn's, with one ``SO_REUSEPORT`` socket per worker.

``uvicorn --workers N`` binds one socket and every worker accepts from it: whichever event loop
wakes first takes the connection (and often every connection waiting), so a burst of kept-alive
clients bunches on one worker while the other idles. Here each worker gets its own listening
socket on the same address with ``SO_REUSEPORT``, and the kernel spreads new connections over
the sockets by their address hash, evenly across the workers.

A worker's socket is bound by the supervisor but only starts listening when the worker calls
``listen`` after its lifespan, i.e. after it loaded the live model: a starting or restarted
worker takes no connection before it can answer, while the others keep serving. The supervisor
closes its own copy of each socket once the worker process holds it, so when a worker dies its
socket goes with it and the kernel sends new connections to the living ones only. Everything
else (health checks, restarts of a dead worker, signals) is uvicorn's ``Multiprocess``.

Usage (what :func:`conveyor.serving.process.start_endpoint` runs): ``python -m
conveyor.serving.supervisor APP --host H --port P --workers N --http PROTOCOL
--timeout-worker-healthcheck S``; one worker runs in-process, as ``uvicorn`` does.

Nothing here imports Airflow: the server imports this module.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Sequence

import uvicorn
from uvicorn.supervisors import Multiprocess


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT`` (not listening yet), inheritable.

    :param host: the address (IPv6 when it holds a colon).
    :param port: the port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def check_free(host: str, port: int) -> None:
    """Refuse an address something already listens on (even with ``SO_REUSEPORT``, so no stale server shares it).

    :param host: the address.
    :param port: the port.
    :raises SystemExit: the port is taken.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise SystemExit(f"cannot listen on {host}:{port}: {error}") from None


class ReusePortMultiprocess(Multiprocess):
    """uvicorn's supervisor where every worker process it starts gets a socket of its own.

    uvicorn builds each worker with ``Process(config, self.sockets)``: here ``sockets`` is a fresh
    ``SO_REUSEPORT`` socket at every look; the supervisor's copies are closed once the workers started.

    :param config: the uvicorn configuration (``host``, ``port``, ``workers``).
    """

    def __init__(self, config: uvicorn.Config):
        self._handed: list[socket.socket] = []
        super().__init__(config, sockets=[])

    @property  # type: ignore[override]
    def sockets(self) -> list[socket.socket]:
        """A new socket for the worker about to start."""
        sock = reuseport_socket(self.config.host, self.config.port)
        self._handed.append(sock)
        return [sock]

    @sockets.setter
    def sockets(self, value: list[socket.socket]) -> None:
        """uvicorn's constructor sets the shared sockets; there are none here."""

    def _close_handed(self) -> None:
        """Close the supervisor's copies of sockets now held by started workers."""
        while self._handed:
            self._handed.pop().close()

    def init_processes(self) -> None:
        super().init_processes()
        self._close_handed()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        self._close_handed()

    def handle_signals(self) -> None:
        super().handle_signals()
        self._close_handed()


def get_args_parser() -> argparse.ArgumentParser:
    """The command line: the app, where to listen, how many workers, the HTTP protocol class."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("app", help="the app factory, module:function")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--http", default="httptools", help="uvicorn's protocol, or module:class")
    parser.add_argument("--timeout-worker-healthcheck", type=int, default=10)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the app: N workers on their own ``SO_REUSEPORT`` sockets, or one worker in-process.

    :param argv: the arguments (None: ``sys.argv``).
    """
    args = get_args_parser().parse_args(argv)
    if args.workers < 1:
        raise SystemExit(f"--workers must be at least 1, got {args.workers}")
    config = uvicorn.Config(
        args.app,
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        http=args.http,
        access_log=False,
        timeout_worker_healthcheck=args.timeout_worker_healthcheck,
    )
    check_free(args.host, args.port)
    if args.workers == 1:
        uvicorn.Server(config).run()
        return
    ReusePortMultiprocess(config).run()


if __name__ == "__main__":
    main()
