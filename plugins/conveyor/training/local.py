"""The local training backend: a training script in SageMaker script mode, run as a child process.

The child is started fresh (never forked from the task, so CUDA works and its memory is freed
when it ends), in its own process group so a timeout or a killed task takes it down whole. Its
output is streamed into the task log line by line as it comes.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from airflow.sdk.exceptions import AirflowException, AirflowFailException

log = logging.getLogger(__name__)

TAIL_LINES = 30


class TrainingFailed(AirflowFailException):
    """The training script exited with an error (deterministic: not retried)."""


class TrainingInterrupted(AirflowException):
    """The training process was killed by a signal (e.g. out of memory): retried."""


class TrainingTimedOut(AirflowFailException):
    """The training script ran past its budget and was stopped."""


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

    :param logger: where the script's lines go (the task log).
    """

    def __init__(self, logger: logging.Logger | None = None):
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
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env=job.environment(), start_new_session=True, cwd=str(job.output_dir),
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
