"""Start a task: its commands in one shell, under the supervisor, in a session of its own.

The launcher decides nothing; the daemon tells it what to run where.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import setproctitle

from . import supervisor
from .gpus.base import gpu_env, key_to_record
from .gpus.simulated import NAMESPACE_ENV, VRAM_ENV
from .registry import ENV_VAR as REGISTRY_ENV
from .registry import private_dirs
from .tasks import TaskSpec

SHELL = shutil.which("bash") or "/bin/sh"
#: The GPU's key as gpu-compete names it ("3", "3:1" for a MIG device): how a restarted
#: daemon that finds the task by its environment knows where it runs.
GPU_KEY_ENV = "GPU_COMPETE_GPU"
#: Every GPU key of a gpus=N task, comma-separated (only set for such tasks).
GPU_KEYS_ENV = "GPU_COMPETE_GPUS_USED"
#: The node a task runs on, in a Ray cluster (`--ray`).
NODE_ENV = "GPU_COMPETE_NODE"


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


def task_environment(spec: TaskSpec, gpu: int | str, paths: LaunchPaths, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env[NAMESPACE_ENV] = str(paths.state_dir)
    registry = paths.registry
    env.update(gpu_env(gpu))
    env["GPU_COMPETE_UNI_ID"] = spec.uni_id
    env[REGISTRY_ENV] = str(registry)
    # A task may set its own value (e.g. in an `export` line) to override the declared VRAM.
    env[VRAM_ENV] = f"{spec.vram_gb:g}"
    env.setdefault("PYTHONUNBUFFERED", "1")  # so the log shows progress as it happens
    # Wrapped scripts call `gpu-compete exec`: the daemon's own install comes first on PATH,
    # so they find it even when the daemon was started by path from a venv not activated.
    bin_dir = os.path.dirname(sys.executable)
    path = env.get("PATH", os.defpath).split(os.pathsep)
    if not path or path[0] != bin_dir:
        env["PATH"] = os.pathsep.join([bin_dir, *(p for p in path if p != bin_dir)])
    return env


class Child:
    """A supervisor forked from the daemon: `poll()` and `wait()` like Popen's.

    `done_fd`: the read end of a pipe on which the supervisor says, before it writes the
    outcome, that the task's processes are all gone (`read_done()`, `worker_done`)."""

    def __init__(self, pid: int, done_fd: int | None = None):
        self.pid = pid
        self.returncode: int | None = None
        self.done_fd = done_fd
        self.worker_done = False

    def read_done(self) -> bool:
        """Take the supervisor's word if it has come: True when this call learned that the
        task's processes are gone. The pipe is closed once anything (word or EOF) arrived."""
        if self.done_fd is None:
            return False
        try:
            data = os.read(self.done_fd, 16)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        self.close_done()
        if data and not self.worker_done:
            self.worker_done = True
            return True
        return False

    def close_done(self) -> None:
        if self.done_fd is not None:
            try:
                os.close(self.done_fd)
            except OSError:
                pass
            self.done_fd = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                # Reaped elsewhere, status unknown: never taken for a success. The registry's
                # final state decides, else the daemon counts the task lost and runs it again.
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.returncode


def _prepare(spec: TaskSpec, gpu: str, attempt: int, paths: LaunchPaths, cuda_visible: str,
             gpus: tuple[str, ...], node: str | None = None) -> tuple[str, dict, str, Path, dict[str, str]]:
    """What a supervisor is given: the script, its record's fields, its title, log and env."""
    commands = spec.expanded(str(paths.work_dir), cuda_visible)
    script = build_script(commands)
    meta: dict = {"queue": spec.queue, "gpu": key_to_record(gpu), "attempt": attempt}
    if len(gpus) > 1:
        meta["gpus"] = [key_to_record(g) for g in gpus]
    if node is not None:
        meta["node"] = node
    where = f"GPUs {','.join(gpus)}" if len(gpus) > 1 else f"GPU {gpu}"
    title = f"attempt {attempt} on {where}: " + " ; ".join(commands)
    log = log_path(paths.state_dir, spec.uni_id)
    private_dirs(log.parent)
    env = task_environment(spec, cuda_visible, paths)
    env[GPU_KEY_ENV] = gpu
    if len(gpus) > 1:
        env[GPU_KEYS_ENV] = ",".join(gpus)
    if node is not None:
        env[NODE_ENV] = node
    return script, meta, title, log, env


def start(spec: TaskSpec, gpu: str, attempt: int, paths: LaunchPaths, cuda_visible: str | None = None,
          gpus: tuple[str, ...] = (), timeout_s: float | None = None, grace_s: float = 10.0,
          node: str | None = None, fence: tuple[str, float] | None = None) -> Child:
    """Fork a supervisor for the task in a new session; returns at once.

    The supervisor is a fork of the daemon rather than a new interpreter: everything it
    needs is imported already, so a task starts in milliseconds and eight tasks ending at
    once don't queue behind eight Python start-ups. It runs the same code as `gpu-compete
    exec` and writes the task's final state itself, so it outlives a daemon that dies.

    Forking is safe because the daemon is single-threaded (no lock can be held by another
    thread at the fork); keep it that way, or switch to spawning `python -m
    gpu_compete.supervisor`, which takes the same arguments.

    A gpus=N task passes all its GPU keys in `gpus` (`gpu` is the first) and the comma list
    of their CUDA names in `cuda_visible`: that list is its CUDA_VISIBLE_DEVICES and its
    {available_gpu}. `timeout_s`: its time limit (SIGTERM, then SIGKILL `grace_s` later).
    `node`, `fence`: for a node agent's task (`agent.py`).
    """
    cuda_visible = cuda_visible or gpu
    supervisor.load_prctl()  # once per daemon, not once per task's child
    supervisor.load_death_shim()
    script, meta, title, log, env = _prepare(spec, gpu, attempt, paths, cuda_visible, gpus, node)
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        done_r, done_w = os.pipe()
    except OSError:
        os.close(log_fd)
        raise
    try:
        pid = os.fork()
    except OSError:
        for fd in (log_fd, done_r, done_w):
            os.close(fd)
        raise
    if pid:
        os.close(log_fd)
        os.close(done_w)
        os.set_blocking(done_r, False)
        return Child(pid, done_r)
    # --- in the child: nothing here may return into the daemon's loop ---
    code = 70
    try:
        os.setsid()
        done_w = fcntl.fcntl(done_w, fcntl.F_DUPFD_CLOEXEC, 10)  # clear of 0-3, whatever fds the daemon lacks
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)  # the supervisor's own complaints land in the task's log
        os.dup2(log_fd, 2)
        os.dup2(done_w, 3, inheritable=False)  # the task's own processes never hold it
        os.closerange(4, 65536)  # the daemon's pid-file lock and wake-up pipe stay with it
        setproctitle.setproctitle(f"gpu-compete: supervisor {spec.uni_id}")  # not a copy of the daemon in ps
        os.chdir(paths.work_dir)
        os.environ.clear()
        os.environ.update(env)
        code = supervisor.run([SHELL, "-c", script], spec.uni_id, str(paths.registry), str(log), quiet=True,
                              history=str(paths.history), meta=meta, title=title, timeout_s=timeout_s,
                              grace_s=grace_s, done_fd=3, fence=fence).returncode
    except BaseException:  # noqa: BLE001 - report and leave; never unwind into the daemon
        try:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os._exit(code)
