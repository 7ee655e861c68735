"""Importing and running the standalone training and inference scripts (``include/`` is not a package).

The scripts import the shipped contract module (``conveyor_metadata``, from
``plugins/conveyor/model/contract``) and their sibling modules (``data``, ``utils``, ...) as plain
modules, as they do under SageMaker, where both sit on ``sys.path``. :func:`load_script` puts them
there for a test process; :func:`script_env` gives a child process the contract folder on its
``PYTHONPATH`` (``python train.py`` puts the script's own folder first on ``sys.path``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType

PROJECT = Path(__file__).resolve().parents[1]
CONTRACT = PROJECT / "plugins" / "conveyor" / "model" / "contract"


def _siblings(folder: Path, script: Path) -> set[str]:
    """The names the script's sibling modules are imported under.

    :param folder: the script's folder.
    :param script: the script.
    """
    return {path.stem for path in folder.glob("*.py") if path != script}


def load_script(relative_path: str | Path, name: str) -> ModuleType:
    """Import a script by its path, registered in ``sys.modules`` under ``name``.

    The contract folder stays on ``sys.path``; the script's folder is on it while the script (and so
    its siblings) is imported. Two scripts' siblings may share a name (both trainers have a
    ``data.py``): a sibling imported from another folder is dropped from ``sys.modules`` first, so
    each script gets its own, and the module keeps them.

    :param relative_path: the script, relative to the project root (e.g.
        ``include/training/resnet_image/train.py``), or an absolute path.
    :param name: the module name to register it under.
    """
    script = (PROJECT / relative_path).resolve()
    folder = script.parent
    if str(CONTRACT) not in sys.path:
        sys.path.insert(0, str(CONTRACT))
    for sibling in _siblings(folder, script):
        loaded = sys.modules.get(sibling)
        if loaded is not None and Path(getattr(loaded, "__file__", None) or "").resolve().parent != folder:
            del sys.modules[sibling]
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, script)
        assert spec is not None and spec.loader is not None, script
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look a module up by its name
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def environment_snapshot() -> dict[str, str]:
    """A copy of ``os.environ`` taken from the emulator's thread while the task runner in the main thread
    sets and removes variables (``__AIRFLOW_SUPERVISOR_FD``): a variable removed mid-copy is a KeyError, so
    the copy is taken again."""
    for _ in range(100):
        try:
            return dict(os.environ)
        except KeyError:
            time.sleep(0.01)
    return dict(os.environ)


def script_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for running a script as a child process: the contract folder first on ``PYTHONPATH``.

    :param env: the environment to start from (default: this process's).
    """
    base = environment_snapshot() if env is None else dict(env)
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CONTRACT), base.get("PYTHONPATH")]))
    return base
