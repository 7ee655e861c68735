"""The local training backend: a training script in SageMaker script mode, run as a child process.

The child is started fresh (never forked from the task, so CUDA works and its memory is freed
when it ends), in its own process group so a timeout or a killed task takes it down whole. Its
output is streamed into the task log line by line as it comes. The contract modules Conveyor ships
beside the scripts (``conveyor.model.contract``) are first on its ``PYTHONPATH``, as they are beside
``train.py`` in SageMaker's ``sourcedir.tar.gz``.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.errors import ConveyorError, TransientError
from conveyor.model.contract import FOLDER as CONTRACT_FOLDER

if TYPE_CHECKING:
    from conveyor.lake import Lake
    from conveyor.spec import PipelineSpec

log = logging.getLogger(__name__)

TAIL_LINES = 30


class TrainingFailed(ConveyorError):
    """The training script exited with an error (deterministic: not retried)."""


class TrainingInterrupted(TransientError):
    """The training process was killed by a signal (e.g. out of memory): retried."""


class TrainingTimedOut(ConveyorError):
    """The training script ran past its budget and was stopped (deterministic: not retried)."""


@dataclass
class TrainingJob:
    """One run of a training script.

    :param script: the training script (``include/training/<trainer>/train.py``).
    :param args: its command-line flags (every hyperparameter is one).
    :param channels: input channels by name (``train``, ``validation``) as local folders.
    :param model_dir: where the script writes the model (``SM_MODEL_DIR``).
    :param output_dir: where it writes other outputs (``SM_OUTPUT_DATA_DIR``).
    :param timeout_s: seconds after which the script is stopped.
    :param num_gpus: GPUs the script may use (``SM_NUM_GPUS``).
    """

    script: Path
    args: list[str]
    channels: dict[str, Path]
    model_dir: Path
    output_dir: Path
    timeout_s: float
    num_gpus: int = 0
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__CORE__")}
        # The contract modules shipped beside the scripts (``import conveyor_metadata``) come first.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CONTRACT_FOLDER), env.get("PYTHONPATH")]))
        env.update({f"SM_CHANNEL_{name.upper()}": str(path) for name, path in self.channels.items()})
        env.update(
            SM_MODEL_DIR=str(self.model_dir),
            SM_OUTPUT_DATA_DIR=str(self.output_dir),
            SM_NUM_GPUS=str(self.num_gpus),
            SM_CHANNELS=",".join(self.channels),
            PYTHONUNBUFFERED="1",
        )
        if self.num_gpus == 0:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env


def _die_with_parent() -> None:
    """In the child, before the script starts: be killed when the task process dies (Linux).

    The script runs in its own session (so a timeout can kill its whole group), which also takes it
    out of reach of a signal to the task's group: without this, a task process killed outright (a
    Celery worker lost, ``kill -9``) would leave the script training on, writing the same files as
    the retry. ``PR_SET_PDEATHSIG`` makes the kernel send it SIGKILL when its parent dies.
    """
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def available_gpus() -> int:
    """GPUs on this machine, counted without importing torch in the task process."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


class LocalTrainingBackend:
    """Runs training jobs as child processes on this machine.

    :param logger: where the script's lines go (the task log: a ``logging.Logger`` or Airflow's task logger).
    """

    def __init__(self, logger: Any = None):
        self.logger = logger or log
        self._proc: subprocess.Popen | None = None

    def _stream(self, job: TrainingJob) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.rstrip()
            job.tail.append(line)
            self.logger.info("[train] %s", line)

    def run(self, job: TrainingJob) -> float:
        """Run the job to its end; returns its wall time in seconds.

        :raises TrainingFailed: the script exited non-zero (with its last lines).
        :raises TrainingTimedOut: the script ran past ``timeout_s``.
        :raises TrainingInterrupted: the script was killed by a signal.
        """
        for folder in (job.model_dir, job.output_dir):
            folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(job.script), *job.args]
        self.logger.info("Starting training: %s (budget %.0fs, %s GPU)", " ".join(command), job.timeout_s, job.num_gpus)
        started = time.monotonic()
        self._proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=job.environment(),
            start_new_session=True,
            cwd=str(job.output_dir),
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        reader = threading.Thread(target=self._stream, args=(job,), daemon=True)
        reader.start()
        try:
            code = self._proc.wait(timeout=job.timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            reader.join(timeout=5)
            raise TrainingTimedOut(
                f"{job.script.name} ran past its budget of {job.timeout_s:.0f}s and was stopped; last lines:\n"
                + "\n".join(job.tail)
            ) from None
        reader.join(timeout=30)
        elapsed = time.monotonic() - started
        tail = "\n".join(job.tail)
        if code < 0:
            raise TrainingInterrupted(f"{job.script.name} was killed by signal {-code}; last lines:\n{tail}")
        if code != 0:
            raise TrainingFailed(f"{job.script.name} failed with exit code {code}; last lines:\n{tail}")
        self.logger.info("Training finished in %.1fs", elapsed)
        return elapsed

    def kill(self) -> None:
        """Stop the running script and everything it started (TERM, then KILL)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def train_locally(
    spec: PipelineSpec,
    lake: Lake,
    run_id: str,
    split: dict[str, Any],
    time_limit: int,
    presets: str,
    backend: LocalTrainingBackend,
) -> dict[str, Any]:
    """The local train task: the trainer's script on the run's split, then the model into the lake.

    The ResNet trainer's checkpoints are kept outside the scratch folder (in the state folder), so
    a retry of the task resumes from the last epoch; they are removed once the model is in the lake.

    :param spec: the pipeline.
    :param lake: the lake (the split is read from and the model written to the run's folder).
    :param run_id: the Airflow run.
    :param split: the split task's result.
    :param time_limit: the training budget in seconds.
    :param presets: the trainer's presets.
    :param backend: runs the script (the task keeps it, to kill the script when it is killed).
    :returns: the task's result (``conveyor.training.publish.train_result``).
    """
    from conveyor import settings
    from conveyor.lake import as_local_folder, safe_name, upload_tree
    from conveyor.model import artifacts
    from conveyor.training.arguments import trainer_args
    from conveyor.training.publish import publish, run_metadata, train_result, trained_metadata

    run_dir = lake.models(spec.name, run_id)
    num_gpus = available_gpus() if spec.trainer.gpu else 0
    with tempfile.TemporaryDirectory(prefix="conveyor-train-") as tmp:
        scratch = Path(tmp)
        args = trainer_args(spec, time_limit, presets, num_gpus)
        checkpoints = None
        if spec.trainer.kind == "resnet":
            checkpoints = settings.state_dir() / "checkpoints" / spec.name / safe_name(run_id)
            args += ["--checkpoint-dir", str(checkpoints)]
        job = TrainingJob(
            script=artifacts.training_script(spec.trainer.kind),
            args=args,
            channels={part: as_local_folder(run_dir / "split" / part, scratch) for part in ("train", "validation")},
            model_dir=scratch / "model",
            output_dir=scratch / "output",
            timeout_s=time_limit * 1.5 + 300,
            num_gpus=num_gpus,
        )
        seconds = backend.run(job)
        trained = trained_metadata(job.model_dir, job.script.name)
        metadata = run_metadata(trained, spec, run_id, split, "local", round(seconds, 2))
        target, size, sha256 = publish(job.model_dir, metadata, spec.trainer.kind, run_dir, scratch)
        upload_tree(job.output_dir, run_dir / "output")
        if checkpoints is not None:
            shutil.rmtree(checkpoints, ignore_errors=True)
        backend.logger.info("Model artifact: %s (%.1f MB)", target, size / 1e6)
    return train_result(str(target), metadata, sha256)
