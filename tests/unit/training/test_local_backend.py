"""The local training backend with throwaway scripts: environment, log streaming, failure, timeout, kill."""

from __future__ import annotations

import json
import logging
import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from conveyor.training.local import (
    LocalTrainingBackend,
    TrainingFailed,
    TrainingInterrupted,
    TrainingJob,
    TrainingTimedOut,
)


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def logger(request):
    log = logging.getLogger(f"test.local_backend.{request.node.name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = ListHandler()
    log.addHandler(handler)
    log.messages = handler.messages  # type: ignore[attr-defined]
    yield log
    log.removeHandler(handler)


def script(tmp_path: Path, body: str, name: str = "train.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def job_for(tmp_path: Path, script_path: Path, args: list[str] | None = None, timeout_s: float = 60,
            num_gpus: int = 0) -> TrainingJob:
    channels = {"train": tmp_path / "in" / "train", "validation": tmp_path / "in" / "validation"}
    for folder in channels.values():
        folder.mkdir(parents=True, exist_ok=True)
    return TrainingJob(
        script=script_path, args=args or [], channels=channels, model_dir=tmp_path / "model",
        output_dir=tmp_path / "output", timeout_s=timeout_s, num_gpus=num_gpus,
    )


def trained_lines(logger) -> list[str]:
    return [m[len("[train] "):] for m in logger.messages if m.startswith("[train] ")]


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether a process has ended (reaped or not a child of ours) within a few seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie grandchild reparented to init may linger a moment before it is reaped.
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except (FileNotFoundError, IndexError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def wait_for(path: Path, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


GOOD = """
    import json, os, sys
    env = {k: os.environ.get(k) for k in
           ("SM_CHANNEL_TRAIN", "SM_CHANNEL_VALIDATION", "SM_MODEL_DIR", "SM_OUTPUT_DATA_DIR", "SM_NUM_GPUS",
            "SM_CHANNELS", "CUDA_VISIBLE_DEVICES")}
    env["argv"] = sys.argv[1:]
    env["cwd"] = os.getcwd()
    env["airflow_core"] = sorted(k for k in os.environ if k.startswith("AIRFLOW__CORE__"))
    for i in range(5):
        print(f"line {i}")
    print("to stderr", file=sys.stderr)
    with open(os.path.join(os.environ["SM_MODEL_DIR"], "model.json"), "w") as handle:
        json.dump(env, handle)
"""


def test_a_good_script_gets_the_sagemaker_environment_and_its_lines_are_logged(tmp_path, logger):
    job = job_for(tmp_path, script(tmp_path, GOOD), args=["--label", "churned", "--seed", "42"])
    seconds = LocalTrainingBackend(logger).run(job)
    assert seconds > 0
    env = json.loads((job.model_dir / "model.json").read_text())
    assert env["SM_CHANNEL_TRAIN"] == str(tmp_path / "in" / "train")
    assert env["SM_CHANNEL_VALIDATION"] == str(tmp_path / "in" / "validation")
    assert env["SM_MODEL_DIR"] == str(tmp_path / "model")
    assert env["SM_OUTPUT_DATA_DIR"] == str(tmp_path / "output")
    assert env["SM_NUM_GPUS"] == "0"
    assert env["SM_CHANNELS"] == "train,validation"
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["argv"] == ["--label", "churned", "--seed", "42"]
    assert env["cwd"] == str(tmp_path / "output")
    assert env["airflow_core"] == []
    assert (tmp_path / "output").is_dir()
    lines = trained_lines(logger)
    assert [line for line in lines if line.startswith("line ")] == [f"line {i}" for i in range(5)]
    assert "to stderr" in lines
    assert any(m.startswith("Training finished") for m in logger.messages)


def test_gpus_are_visible_when_the_job_has_some(tmp_path, logger, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    job = job_for(tmp_path, script(tmp_path, GOOD), num_gpus=2)
    LocalTrainingBackend(logger).run(job)
    env = json.loads((job.model_dir / "model.json").read_text())
    assert env["SM_NUM_GPUS"] == "2"
    assert env["CUDA_VISIBLE_DEVICES"] is None


def test_lines_are_streamed_while_the_script_runs(tmp_path, logger):
    flag = tmp_path / "seen"
    body = f"""
        import os, time
        print("first", flush=True)
        deadline = time.time() + 20
        while not os.path.exists({str(flag)!r}) and time.time() < deadline:
            time.sleep(0.05)
        print("second" if os.path.exists({str(flag)!r}) else "never streamed")
    """
    job = job_for(tmp_path, script(tmp_path, body))
    backend = LocalTrainingBackend(logger)

    def watch() -> None:
        deadline = time.monotonic() + 20
        while "first" not in trained_lines(logger) and time.monotonic() < deadline:
            time.sleep(0.05)
        flag.write_text("x")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    backend.run(job)
    watcher.join(5)
    assert trained_lines(logger) == ["first", "second"]


def test_a_crash_fails_with_the_exit_code_and_the_last_lines(tmp_path, logger):
    body = """
        for i in range(50):
            print(f"progress {i:02d}")
        raise SystemExit(3)
    """
    job = job_for(tmp_path, script(tmp_path, body))
    with pytest.raises(TrainingFailed) as caught:
        LocalTrainingBackend(logger).run(job)
    assert isinstance(caught.value, AirflowFailException)
    message = str(caught.value)
    assert "train.py" in message and "exit code 3" in message
    assert "progress 49" in message and "progress 21" in message
    assert "progress 00" not in message and "progress 19" not in message
    assert len(trained_lines(logger)) == 50


def test_an_exception_in_the_script_shows_its_traceback_in_the_error(tmp_path, logger):
    body = """
        for i in range(50):
            print(f"progress {i:02d}")
        raise RuntimeError("label column has NaNs")
    """
    with pytest.raises(TrainingFailed, match="exit code 1") as caught:
        LocalTrainingBackend(logger).run(job_for(tmp_path, script(tmp_path, body)))
    assert "RuntimeError: label column has NaNs" in str(caught.value)
    assert "progress 00" not in str(caught.value)


def test_past_its_budget_the_script_and_its_children_are_stopped(tmp_path, logger):
    pids = tmp_path / "pids.json"
    body = f"""
        import json, os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        with open({str(pids)!r}, "w") as handle:
            json.dump({{"script": os.getpid(), "grandchild": child.pid}}, handle)
        print("started", flush=True)
        time.sleep(120)
    """
    job = job_for(tmp_path, script(tmp_path, body), timeout_s=3)
    backend = LocalTrainingBackend(logger)
    started = time.monotonic()
    with pytest.raises(TrainingTimedOut) as caught:
        backend.run(job)
    assert time.monotonic() - started < 30
    assert isinstance(caught.value, AirflowFailException)
    assert "budget of 3s" in str(caught.value) and "started" in str(caught.value)
    wait_for(pids)
    recorded = json.loads(pids.read_text())
    assert gone(recorded["script"]), "the training script is still running"
    assert gone(recorded["grandchild"]), "a process the training script started is still running"


def test_killed_by_a_signal_is_retryable(tmp_path, logger):
    body = """
        import os, signal
        print("about to run out of memory", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    with pytest.raises(TrainingInterrupted) as caught:
        LocalTrainingBackend(logger).run(job_for(tmp_path, script(tmp_path, body)))
    assert isinstance(caught.value, AirflowException)
    assert not isinstance(caught.value, AirflowFailException)
    assert f"signal {int(signal.SIGKILL)}" in str(caught.value)
    assert "about to run out of memory" in str(caught.value)


def test_kill_from_another_thread_stops_a_running_job(tmp_path, logger):
    pids = tmp_path / "pids.json"
    body = f"""
        import json, os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        with open({str(pids)!r}, "w") as handle:
            json.dump({{"script": os.getpid(), "grandchild": child.pid}}, handle)
        time.sleep(120)
    """
    job = job_for(tmp_path, script(tmp_path, body), timeout_s=120)
    backend = LocalTrainingBackend(logger)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            backend.run(job)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    wait_for(pids)
    started = time.monotonic()
    backend.kill()
    runner.join(30)
    assert not runner.is_alive(), "run() did not return after kill()"
    assert time.monotonic() - started < 25
    assert isinstance(outcome.get("error"), TrainingInterrupted)
    assert f"signal {int(signal.SIGTERM)}" in str(outcome["error"])
    recorded = json.loads(pids.read_text())
    assert gone(recorded["script"]) and gone(recorded["grandchild"])


def test_kill_without_a_job_or_after_it_ended_does_nothing(tmp_path, logger):
    backend = LocalTrainingBackend(logger)
    backend.kill()
    backend.run(job_for(tmp_path, script(tmp_path, "print('done')\n")))
    backend.kill()


@pytest.mark.skipif(not os.sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_script_dies_with_a_task_process_killed_outright(tmp_path):
    """A task process lost with SIGKILL (a Celery worker gone) must not leave the script training on."""
    import subprocess
    import sys

    pid_file = tmp_path / "script.pid"
    train = script(tmp_path, f"""
        import os, time
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(120)
    """)
    task = tmp_path / "task.py"
    task.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[3] / "plugins")!r})
        from pathlib import Path
        from conveyor.training.local import LocalTrainingBackend, TrainingJob
        root = Path({str(tmp_path)!r})
        job = TrainingJob(script=Path({str(train)!r}), args=[], channels={{}}, model_dir=root / "model",
                          output_dir=root / "output", timeout_s=120)
        LocalTrainingBackend().run(job)
    """))
    parent = subprocess.Popen([sys.executable, str(task)])
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None, "the script never started"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    assert gone(child, within=10), f"training script {child} outlived its killed task process"
