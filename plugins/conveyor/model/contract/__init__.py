"""Modules shipped beside the standalone training and inference scripts (stdlib and numpy only).

This folder is put on the training script's ``PYTHONPATH`` (local backend), packed into
SageMaker's ``sourcedir.tar.gz`` and into ``code/`` of every ``model.tar.gz``, so the scripts and
Conveyor read one definition of the contracts that cross a process or a container.
"""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
SHIPPED = ("conveyor_metadata.py",)


def shipped_files() -> list[Path]:
    """The files that travel with the training and inference code."""
    return [FOLDER / name for name in SHIPPED]
