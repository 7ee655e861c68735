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

from conveyor.errors import ConveyorError, TransientError
from conveyor.model.contract import FOLDER as CONTRACT_FOLDER
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


def job_for(
    tmp_path: Path, script_path: Path, args: list[str] | None = None, timeout_s: float = 60, num_gpus: int = 0
) -> TrainingJob:
    channels = {"train": tmp_path / "in" / "train", "validation": tmp_path / "in" / "validation"}
    for folder in channels.values():
        folder.mkdir(parents=True, exist_ok=True)
    return TrainingJob(
        script=script_path,
        args=args or [],
        channels=channels,
        model_dir=tmp_path / "model",
        output_dir=tmp_path / "output",
        timeout_s=timeout_s,
        num_gpus=num_gpus,
    )


def trained_lines(logger) -> list[str]:
    return [m[len("[train] ") :] for m in logger.messages if m.startswith("[train] ")]


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
    env["pythonpath"] = os.environ.get("PYTHONPATH")
    import conveyor_metadata  # the contract shipped beside the scripts
    env["schema_version"] = conveyor_metadata.SCHEMA_VERSION
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
    assert env["pythonpath"].split(os.pathsep)[0] == str(CONTRACT_FOLDER)
    from conveyor.model.metadata import SCHEMA_VERSION

    assert env["schema_version"] == SCHEMA_VERSION
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
    assert isinstance(caught.value, ConveyorError) and not caught.value.retryable  # deterministic: not retried
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
    assert isinstance(caught.value, ConveyorError) and not caught.value.retryable
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
    assert isinstance(caught.value, TransientError) and caught.value.retryable
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


@pytest.mark.slow
@pytest.mark.skipif(not os.sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_script_dies_with_a_task_process_killed_outright(tmp_path):
    """A task process lost with SIGKILL (a Celery worker gone) must not leave the script training on."""
    import subprocess
    import sys

    pid_file = tmp_path / "script.pid"
    train = script(
        tmp_path,
        f"""
        import os, time
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(120)
    """,
    )
    task = tmp_path / "task.py"
    task.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[3] / "plugins")!r})
        from pathlib import Path
        from conveyor.training.local import LocalTrainingBackend, TrainingJob
        root = Path({str(tmp_path)!r})
        job = TrainingJob(script=Path({str(train)!r}), args=[], channels={{}}, model_dir=root / "model",
                          output_dir=root / "output", timeout_s=120)
        LocalTrainingBackend().run(job)
    """)
    )
    parent = subprocess.Popen([sys.executable, str(task)])
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None, "the script never started"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    assert gone(child, within=10), f"training script {child} outlived its killed task process"


# --- the train task around the backend: arguments, errors, the packed model -----------------------


def test_trainer_arguments_come_from_the_spec():
    from conveyor.spec import PipelineSpec
    from conveyor.training.arguments import TrainingSettingsError, presets, time_budget, trainer_args
    from helpers import pipeline_spec_dict

    churn = PipelineSpec.model_validate(pipeline_spec_dict("churn"))
    args = trainer_args(churn, 30, "good_quality", 1)
    assert args[:4] == ["--label", "churned", "--problem-type", "binary"]
    assert args[args.index("--presets") + 1] == "good_quality" and args[args.index("--num-gpus") + 1] == "1"
    assert args[args.index("--seed") + 1] == str(churn.split.seed)
    budgets = (time_budget(churn, None), time_budget(churn, ""), time_budget(churn, "None"))
    assert budgets == (churn.trainer.time_limit,) * 3
    assert time_budget(churn, "45") == 45 and presets(churn, None) == churn.trainer.presets == presets(churn, "None")
    with pytest.raises(TrainingSettingsError, match=r"rule 'time_limit > 0'"):
        time_budget(churn, 0)
    shapes = PipelineSpec.model_validate(pipeline_spec_dict("shapes"))
    args = trainer_args(shapes, 30, "", 0)
    assert args[:4] == ["--time-limit", "30", "--seed", str(shapes.split.seed)] and "--label" not in args


@pytest.mark.parametrize(
    ("error", "retried"), [(TrainingFailed, False), (TrainingTimedOut, False), (TrainingInterrupted, True)]
)
def test_the_train_task_fails_at_once_or_is_retried_as_the_error_says(error, retried, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    from conveyor.operators.train import TrainModelOperator
    from conveyor.training import local
    from helpers import context, pipeline_spec_dict

    def train_locally(*args, **kwargs):
        raise error("train.py: it broke; last lines:\nstep 3")

    monkeypatch.setattr(local, "train_locally", train_locally)
    op = TrainModelOperator(task_id="train", spec=pipeline_spec_dict("churn"), split={}, time_limit=5)
    expected = error if retried else AirflowFailException
    with pytest.raises(expected, match="it broke") as caught:
        op.execute(context("r1"))
    if not retried:
        assert isinstance(caught.value.__cause__, error)


INFERENCE = """
    import conveyor_metadata  # shipped beside inference.py in code/

    def model_fn(model_dir):
        return {"schema": conveyor_metadata.SCHEMA_VERSION, "file": conveyor_metadata.__file__}

    def predict_fn(data, model):
        return model

    def input_fn(body, content_type):
        return body

    def output_fn(prediction, accept):
        return prediction
"""


def packed_model(tmp_path: Path, name: str) -> Path:
    """A tiny model.tar.gz through ``artifacts.pack``: one model file, an inference.py importing the contract."""
    from conveyor.model import artifacts
    from conveyor.model.metadata import Feature, ModelMetadata

    model_dir, code_dir = tmp_path / name / "model", tmp_path / name / "code"
    model_dir.mkdir(parents=True)
    code_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(b"\0" * 10)
    (model_dir / "metadata.json").write_text("{}")  # the trainer's: replaced by the full metadata
    (code_dir / "inference.py").write_text(textwrap.dedent(INFERENCE))
    metadata = ModelMetadata(
        trainer="autogluon", problem_type="binary", label="churned", features=(Feature("age", "int64"),), run_id=name
    )
    return artifacts.pack(model_dir, code_dir, metadata, tmp_path / name / "model.tar.gz")


def test_the_archive_has_metadata_first_and_the_contract_beside_inference_py(tmp_path):
    import tarfile

    from conveyor.model import artifacts
    from conveyor.model.metadata import read_sidecar

    archive = packed_model(tmp_path, "m1")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[0] == "metadata.json"
    assert sorted(names[1:]) == ["code/conveyor_metadata.py", "code/inference.py", "weights.bin"]
    extracted = artifacts.unpack(archive, tmp_path / "m1" / "extracted")
    shipped = (extracted / "code" / "conveyor_metadata.py").read_bytes()
    assert shipped == (CONTRACT_FOLDER / "conveyor_metadata.py").read_bytes()  # the one definition, packed
    assert read_sidecar(str(archive)).run_id == "m1"  # no sidecar here: read from the archive's first member


def test_a_loaded_model_imports_the_contract_from_its_own_code_folder(tmp_path):
    import sys

    from conveyor.model import artifacts
    from conveyor.model.metadata import SCHEMA_VERSION

    paths = list(sys.path)
    first = artifacts.LoadedModel(artifacts.unpack(packed_model(tmp_path, "a"), tmp_path / "a" / "extracted"))
    second = artifacts.LoadedModel(artifacts.unpack(packed_model(tmp_path, "b"), tmp_path / "b" / "extracted"))
    assert first.model["schema"] == second.model["schema"] == SCHEMA_VERSION
    assert first.model["file"] == str(tmp_path / "a" / "extracted" / "code" / "conveyor_metadata.py")
    assert second.model["file"] == str(tmp_path / "b" / "extracted" / "code" / "conveyor_metadata.py")
    assert first.metadata.run_id == "a" and first.invoke(b"x", "text/csv") == first.model
    assert sys.path == paths  # code/ was importable only while the model loaded
