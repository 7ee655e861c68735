"""The compose stack of tests/stack: up once for the module (healthy), `down -v` at the end.

Runs only under ``make test-compose`` (scripts/compose-test.sh starts a private Docker daemon in a network namespace,
builds the images and runs pytest inside that namespace); anywhere else the module skips with one line.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from compose_stack import PROJECT, ComposeStack, engine_problem

pytestmark = pytest.mark.slow

HEALTHY_S = float(os.environ.get("CONVEYOR_STACK_HEALTHY_S", "900"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problem = engine_problem()
    for item in items:
        if "tests/stack" in str(item.path):
            item.add_marker(pytest.mark.slow)
            if problem:
                item.add_marker(pytest.mark.skip(reason=problem))


@pytest.fixture(scope="session")
def compose_root() -> Path:
    root = Path(os.environ.get("CONVEYOR_STACK_ROOT", PROJECT / ".state" / "compose-test"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="module")
def stack(compose_root):
    stack = ComposeStack(compose_root).prepare()
    if os.environ.get("CONVEYOR_STACK_REUSE") != "1":  # 1: keep a stack a CONVEYOR_STACK_KEEP=1 run left up
        stack.compose("down", "-v", "--remove-orphans", check=False)
    started = time.monotonic()
    try:
        stack.compose("up", "-d", timeout=HEALTHY_S)
        stack.healthy_after_s = stack.wait_healthy(max(60.0, HEALTHY_S - (time.monotonic() - started)))
        stack.up_to_healthy_s = time.monotonic() - started
        print(f"\ncompose stack: up -> all healthy in {stack.up_to_healthy_s:.0f}s")
    except Exception:
        print(f"\ncompose stack did not come up; not ready: {stack.not_ready()}\n{stack.logs(tail=60)}")
        down(stack)
        raise
    try:
        yield stack
    finally:
        down(stack)


def down(stack: ComposeStack) -> None:
    """``down -v`` (unless CONVEYOR_STACK_KEEP=1 keeps the stack for a look)."""
    if os.environ.get("CONVEYOR_STACK_KEEP") != "1":
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False)
