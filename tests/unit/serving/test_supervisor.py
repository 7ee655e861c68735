"""The endpoint supervisor's sockets (serving/supervisor.py): one SO_REUSEPORT socket per worker, that
takes connections only once its worker listens, and a port something already listens on refused.
Connections spreading over real worker processes is tested in tests/integration/test_model_server.py."""

from __future__ import annotations

import socket

import pytest

from conveyor.serving import process
from conveyor.serving.supervisor import ReusePortMultiprocess, check_free, get_args_parser, reuseport_socket


def test_worker_sockets_share_the_port_and_take_connections_only_once_listening():
    first = reuseport_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = reuseport_socket("127.0.0.1", port)  # the same port: SO_REUSEPORT
    try:
        with pytest.raises(OSError):  # bound but nobody listens yet (a worker still loading its model)
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        second.listen()
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            accepted, _ = second.accept()
            accepted.close()
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}"):
            check_free("127.0.0.1", port)  # no stale server shares the port with a new one
    finally:
        first.close()
        second.close()


def test_each_worker_gets_a_new_socket_and_the_supervisor_drops_its_copies():
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config("conveyor.serving.app:create_app", factory=True, host="127.0.0.1", port=port, workers=2)
    supervisor = ReusePortMultiprocess(config)
    [one], [two] = supervisor.sockets, supervisor.sockets
    assert one is not two and one.getsockname()[1] == two.getsockname()[1] == port
    supervisor._close_handed()
    assert one.fileno() == -1 and two.fileno() == -1


def test_the_endpoint_runs_under_the_supervisor():
    command = process._command("127.0.0.1", 8123, 2)
    assert command[1:4] == ["-m", "conveyor.serving.supervisor", process.APP]
    args = get_args_parser().parse_args(command[3:])
    assert (args.app, args.host, args.port, args.workers) == (process.APP, "127.0.0.1", 8123, 2)
    assert args.http == process.PROTOCOL
    assert args.timeout_worker_healthcheck == process.HEALTHCHECK_TIMEOUT_S
