"""`STATE_DIR/daemon.pid`: one daemon per state directory, and how `stop` finds it.

The daemon holds an exclusive flock on the file for its whole life, so a second daemon is
refused while the first lives and a stale file (a daemon killed with -9) never blocks a
restart: the kernel drops the lock with the process. The file names the pid and its create
time, so `stop` never signals a process that merely reuses the pid.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

import psutil

from . import procs

NAME = "daemon.pid"


class PidFileBusy(Exception):
    """Another live daemon holds the state directory."""


def acquire(state_dir: Path) -> int:
    """Lock and fill the pid file; returns the descriptor to keep open (OSError if unusable)."""
    path = state_dir / NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        other = read(state_dir)
        who = f" (pid {other['pid']})" if other else ""
        raise PidFileBusy(f"another gpu-compete daemon{who} is running on {state_dir}; "
                          f"stop it with `gpu-compete stop --state-dir {state_dir}`") from None
    me = psutil.Process()
    info = {"pid": me.pid, "create_time": me.create_time(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd


def release(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def read(state_dir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((state_dir / NAME).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and procs.is_pid(info.get("pid")) else None


def running_daemon(state_dir: Path) -> dict[str, Any] | None:
    """The live daemon on `state_dir`, checked by pid and create time, or None."""
    info = read(state_dir)
    if info and procs.liveness(info["pid"], info.get("create_time")) == "alive":
        return info
    return None
