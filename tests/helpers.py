"""Shared test helpers: waiting on conditions (never on fixed sleeps) and running the CLI.

Used by several test modules (test_registry, test_exec, test_simulated, daemon_harness): keep
`wait_for(predicate, timeout, what)` and `console_script()` stable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest

T = TypeVar("T")

POLL_S = 0.02

#: The installed console script, next to the interpreter running the tests.
GPU_COMPETE = shutil.which("gpu-compete", path=os.path.dirname(sys.executable))


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str | None = None, *,
             message: str | None = None) -> T:
    """Poll `predicate` every 20 ms until it returns something truthy, and return that.

    Fails the test saying `what` (or `message`, or the predicate's name) was awaited when
    `timeout` seconds pass first.
    """
    message = what or message
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            pytest.fail(f"timed out after {timeout:g} s waiting for: {what}", pytrace=False)
        time.sleep(POLL_S)


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any GPU_COMPETE_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_COMPETE_")}
    env.update(extra)
    return env


def read_json(path: str | os.PathLike[str]) -> Any:
    """The file parsed with plain `json.load` (no registry code involved)."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_json_or_none(path: str | os.PathLike[str]) -> Any:
    """Like read_json, but None while the file does not exist yet."""
    try:
        return read_json(path)
    except FileNotFoundError:
        return None


def console_script() -> str:
    """Path of the installed `gpu-compete` console script (fails the test when missing)."""
    if GPU_COMPETE is None:  # pragma: no cover - broken install
        pytest.fail(f"console script gpu-compete not installed next to {sys.executable}", pytrace=False)
    return GPU_COMPETE


def gpu_compete_cmd(*args: str) -> list[str]:
    return [console_script(), *args]


def run_gpu_compete(*args: str, env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                    timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run the installed `gpu-compete` console script to completion and capture its output."""
    return subprocess.run(gpu_compete_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else clean_env(), cwd=cwd)


def python_cmd(code: str, *args: str) -> list[str]:
    """A command line running `code` in this interpreter (so gpu_compete is importable)."""
    return [sys.executable, "-c", code, *args]


def files_under(path: Path) -> list[str]:
    """Every file and directory under `path`, relative, sorted."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def stop_daemon(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """End a daemon the test started, if it still runs: SIGUSR2 (`stop --kill`: its tasks end
    too), then SIGKILL if it has not exited within `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGUSR2)
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
