"""`--on-event CMD`: run a shell command when something happens, never waiting for it.

Each event starts CMD through the shell in a session of its own, with the event in its
environment (GPU_COMPETE_EVENT, ..._UNI_ID, ..._QUEUE, ..._GPU, ..._STATE, ..._ERROR_TYPE,
..._EXIT_STATUS); its output goes to STATE_DIR/hooks.log. The daemon reaps its hooks once a
round (a hook's exit wakes the loop like a task's does): one that runs past the timeout has
its process group killed, which is safe because it is our child and not yet reaped, so its
pid can't have been reused. A failing hook is logged when it starts failing and when it
works again, not at every event; neither a failure nor a hang touches any task.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import structlog

log = structlog.get_logger("gpu_compete")

EVENTS = ("task_start", "task_end", "task_failed", "gave_up", "all_done")
FIELDS = ("uni_id", "queue", "gpu", "state", "error_type", "exit_status")
MAX_RUNNING = 8  # a burst of events (50 tasks ending together) queues, it doesn't fork 50 shells


def environment(event: str, fields: dict[str, Any], base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["GPU_COMPETE_EVENT"] = event
    for name in FIELDS:
        value = fields.get(name)
        env[f"GPU_COMPETE_{name.upper()}"] = "" if value is None else str(value)
    return env


class Hooks:
    def __init__(self, command: str, timeout: float = 30.0, log_path: Path | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.command = command
        self.timeout = timeout
        self.log_path = log_path
        self.clock = clock
        self.running: list[tuple[subprocess.Popen, float, str]] = []
        self.queued: deque[tuple[str, dict[str, str]]] = deque()
        self.failing = False
        self.failures = 0

    def fire(self, event: str, **fields: Any) -> None:
        """Start the hook for `event` (or queue it behind MAX_RUNNING others); returns at once."""
        self.queued.append((event, environment(event, fields)))
        self._start_queued()

    def _start_queued(self) -> None:
        while self.queued and len(self.running) < MAX_RUNNING:
            event, env = self.queued.popleft()
            out: Any = subprocess.DEVNULL
            try:
                if self.log_path is not None:
                    out = open(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
                proc = subprocess.Popen(self.command, shell=True, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                self._ended(event, f"could not start: {exc.strerror or exc}")
                continue
            finally:
                if out is not subprocess.DEVNULL:
                    out.close()
            self.running.append((proc, self.clock(), event))

    def reap(self) -> None:
        """Collect hooks that ended, kill those past the timeout, start queued ones."""
        now = self.clock()
        still = []
        for proc, started, event in self.running:
            code = proc.poll()
            if code is None and now - started >= self.timeout:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group it leads
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
                self._ended(event, f"killed after {self.timeout:g} s (--hook-timeout)")
            elif code is None:
                still.append((proc, started, event))
            elif code != 0:
                self._ended(event, f"exit status {code}" if code > 0 else f"killed by signal {-code}")
            else:
                self._ended(event, None)
        self.running = still
        self._start_queued()

    def _ended(self, event: str, problem: str | None) -> None:
        if problem is None:
            if self.failing:
                log.info("--on-event hook works again", failures=self.failures)
            self.failing = False
            return
        self.failures += 1
        if not self.failing:
            log.warning("--on-event hook failed; later failures are not logged until it works again",
                        hook_event=event, problem=problem, output=str(self.log_path) if self.log_path else None)
        self.failing = True

    def close(self, wait: float | None = None) -> None:
        """Let running and queued hooks finish (up to the timeout), then kill what is left."""
        deadline = self.clock() + (self.timeout if wait is None else wait)
        while (self.running or self.queued) and self.clock() < deadline:
            self.reap()
            time.sleep(0.02)
        self.queued.clear()
        self.timeout = 0.0
        self.reap()
