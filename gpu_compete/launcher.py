"""Start a task: its commands in one shell, under the supervisor, in a session of its own.

The launcher decides nothing; the daemon tells it what to run where.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .gpus.base import gpu_env
from .gpus.simulated import NAMESPACE_ENV, VRAM_ENV
from .registry import ENV_VAR as REGISTRY_ENV
from .tasks import TaskSpec

SHELL = shutil.which("bash") or "/bin/sh"


def build_script(commands: list[str]) -> str:
    """One shell script that runs the commands in order and stops at the first that fails.

    Each command stands on its own line, so a trailing `# comment` ends with it, and is
    followed by a check of its status (plain `set -e` ignores failures inside `if`, `&&`
    and pipelines, which surprises people).
    """
    lines = []
    for command in commands:
        lines.append(command)
        lines.append('__gc_status=$?; if [ "$__gc_status" -ne 0 ]; then exit "$__gc_status"; fi')
    return "\n".join(lines) + "\n"


def log_path(state_dir: Path, uni_id: str) -> Path:
    return state_dir / "logs" / f"{uni_id}.log"


@dataclass(frozen=True)
class LaunchPaths:
    work_dir: Path
    state_dir: Path
    registry: Path
    history: Path


def task_environment(spec: TaskSpec, gpu: int, paths: LaunchPaths, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env[NAMESPACE_ENV] = str(paths.state_dir)
    registry = paths.registry
    env.update(gpu_env(gpu))
    env["GPU_COMPETE_UNI_ID"] = spec.uni_id
    env[REGISTRY_ENV] = str(registry)
    # A task may set its own value (e.g. in an `export` line) to override the declared VRAM.
    env[VRAM_ENV] = f"{spec.vram_gb:g}"
    env.setdefault("PYTHONUNBUFFERED", "1")  # so the log shows progress as it happens
    return env


def start(spec: TaskSpec, gpu: int, attempt: int, paths: LaunchPaths) -> subprocess.Popen[bytes]:
    """Start the task's supervisor in a new session; returns at once."""
    commands = spec.expanded(str(paths.work_dir), gpu)
    script = build_script(commands)
    meta = {"queue": spec.queue, "gpu": gpu, "attempt": attempt}
    title = f"attempt {attempt} on GPU {gpu}: " + " ; ".join(commands)
    argv = [sys.executable, "-m", "gpu_compete.supervisor", "--uni-id", spec.uni_id,
            "--registry", str(paths.registry), "--log", str(log_path(paths.state_dir, spec.uni_id)),
            "--history", str(paths.history), "--meta", json.dumps(meta), "--title", title, "--quiet",
            "--", SHELL, "-c", script]
    log = log_path(paths.state_dir, spec.uni_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    # The supervisor's own complaints (a registry it cannot write) land in the task's log too.
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(argv, cwd=paths.work_dir, env=task_environment(spec, gpu, paths),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fd,
                                start_new_session=True)
    finally:
        os.close(fd)
