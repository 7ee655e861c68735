"""Conveyor's installer (``make install``): the fastest correct tool, the same pinned versions.

Standard library only: it runs before the virtual environment exists (``python3
plugins/conveyor/demo_install.py --venv .venv``). It creates the venv, then installs the
requirements with ``uv pip install`` under the same constraints file, and with the machine's own
pip configuration (index URLs, find-links, global constraints, CA bundle: ``pip config list``)
translated for uv. When uv cannot be had or fails, it installs with pip instead. Either way it then
checks the result: ``pip check``, the key imports, and every package installed at the version the
constraints pin. The log (``<venv>/install.log``) and the screen say which tool installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

UV_VERSION = "0.13.9"
REQUIREMENTS = ("requirements.txt", "requirements-test.txt")
CONSTRAINTS = "constraints.txt"
IMPORTS = "import airflow, great_expectations, autogluon.tabular, mlflow"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def pip_config(python: str) -> dict[str, str]:
    """The machine's pip configuration as ``pip config list`` prints it (files and ``PIP_*`` variables).

    :param python: an interpreter with pip.
    :return: ``{"index-url": ..., "extra-index-url": ..., ...}``; a key set in several places keeps
        pip's own precedence (environment over files, the last file listed wins).
    """
    listing = subprocess.run(
        [python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    found: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        section, _, name = key.strip().rpartition(".")
        value = value.strip().strip("'\"")
        if section == ":env:":
            env[name] = value
        elif section in ("global", "install"):
            found[name] = value
    return {**found, **env}


def uv_options(config: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """``uv pip install`` options and environment that reproduce pip's configuration.

    :param config: the output of :func:`pip_config`.
    :return: command-line options and environment variables for uv.
    """
    options = ["--index-strategy", "unsafe-best-match"]  # pip's rule: the best match over every index
    env: dict[str, str] = {}
    if config.get("no-index", "").lower() in ("1", "true", "yes"):
        options.append("--no-index")
    if config.get("index-url"):
        options += ["--index-url", config["index-url"]]
    for url in config.get("extra-index-url", "").split():
        options += ["--extra-index-url", url]
    for link in config.get("find-links", "").split():
        options += ["--find-links", link]
    for constraint in config.get("constraint", "").split():
        options += ["--constraint", constraint]
    for host in config.get("trusted-host", "").split():
        options += ["--allow-insecure-host", host]
    if config.get("cert"):
        env["SSL_CERT_FILE"] = config["cert"]
    if config.get("timeout") or config.get("default-timeout"):
        env["UV_HTTP_TIMEOUT"] = config.get("timeout") or config["default-timeout"]
    return options, env


def run_logged(command: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Run a command with its output appended to the log; its exit status.

    :param command: the command.
    :param log: the install log.
    :param env: extra environment variables.
    """
    with log.open("a") as sink:
        sink.write(f"$ {shlex.join(command)}\n")
        sink.flush()
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return done.returncode


def install_with_uv(python: str, venv: Path, root: Path, log: Path) -> bool:
    """Install with ``uv pip install``; False when uv could not be installed or failed.

    :param python: the venv's interpreter.
    :param venv: the virtual environment (uv itself goes to ``<venv>/.uv``, outside its packages).
    :param root: the project folder (requirements and constraints).
    :param log: the install log.
    """
    tools = venv / ".uv"
    if run_logged([python, "-m", "pip", "install", "--quiet", "--target", str(tools), f"uv=={UV_VERSION}"], log):
        return False
    options, env = uv_options(pip_config(python))
    env["PYTHONPATH"] = str(tools)
    command = [python, "-m", "uv", "pip", "install", "--python", python, "-c", str(root / CONSTRAINTS)]
    for requirement in REQUIREMENTS:
        command += ["-r", str(root / requirement)]
    return run_logged(command + options, log, env) == 0


def install_with_pip(python: str, root: Path, log: Path) -> bool:
    """Install with pip (the fallback); False when it failed.

    :param python: the venv's interpreter.
    :param root: the project folder.
    :param log: the install log.
    """
    run_logged([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip>=25"], log)
    command = [python, "-m", "pip", "install", "--progress-bar", "off", "-c", str(root / CONSTRAINTS)]
    for requirement in REQUIREMENTS:
        command += ["-r", str(root / requirement)]
    return run_logged(command, log) == 0


def pin_mismatches(constraints: str, frozen: str) -> list[str]:
    """Installed packages whose version differs from the constraints' pin.

    :param constraints: the text of the constraints file.
    :param frozen: the text of ``pip freeze``.
    :return: ``name: installed X, pinned Y`` for each difference.
    """

    def pins(text: str) -> dict[str, str]:
        found = (PIN.match(line.strip()) for line in text.splitlines())
        return {re.sub(r"[-_.]+", "-", m.group(1)).lower(): m.group(2) for m in found if m}

    wanted, installed = pins(constraints), pins(frozen)
    return [
        f"{name}: installed {installed[name]}, pinned {version}"
        for name, version in sorted(wanted.items())
        if name in installed and installed[name] != version
    ]


def verify(python: str, root: Path, log: Path) -> list[str]:
    """What is wrong with the installed environment (empty when nothing is).

    :param python: the venv's interpreter.
    :param root: the project folder.
    :param log: the install log.
    """
    problems = []
    if run_logged([python, "-m", "pip", "check"], log):
        problems.append("pip check found broken requirements")
    if run_logged([python, "-c", IMPORTS], log):
        problems.append(f"the key imports failed ({IMPORTS})")
    frozen = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True, check=False).stdout
    problems += pin_mismatches((root / CONSTRAINTS).read_text(), frozen)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=".venv", help="the virtual environment to create or complete")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that creates it")
    parser.add_argument("--tool", choices=["auto", "uv", "pip"], default="auto", help="auto: uv, else pip")
    args = parser.parse_args(argv)
    root, venv = Path(__file__).resolve().parents[2], Path(args.venv).resolve()
    python, log = str(venv / "bin" / "python"), venv / "install.log"
    started = time.monotonic()
    print(f"==> Installing Conveyor's packages into {args.venv} (first run takes a minute or a few)", flush=True)
    if not Path(python).exists():
        subprocess.run([args.python, "-m", "venv", str(venv)], check=True)
    log.write_text("")
    tool = "pip"
    if args.tool != "pip" and install_with_uv(python, venv, root, log):
        tool = f"uv {UV_VERSION}"
    elif args.tool == "uv" or not install_with_pip(python, root, log):
        print(f"Install failed: see {log}", flush=True)
        print("\n".join(log.read_text().splitlines()[-15:]), flush=True)
        return 1
    if tool == "pip" and args.tool != "pip":
        print("==> uv was unavailable or failed (see the log): installed with pip", flush=True)
    problems = verify(python, root, log)
    seconds = round(time.monotonic() - started, 1)
    with log.open("a") as sink:
        sink.write(f"installer: {tool}; {seconds}s; problems: {problems or 'none'}\n")
    if problems:
        print("Install failed:\n  " + "\n  ".join(problems) + f"\nSee {log}", flush=True)
        return 1
    (venv / ".conveyor-install.json").write_text(json.dumps({"tool": tool, "seconds": seconds}))
    print(f"==> Packages ready: installed with {tool} in {seconds:.0f}s (log: {log})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
