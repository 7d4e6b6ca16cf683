"""What a node's agent does only on one machine, in the daemon's process (`Agent(node=None)`):
its supervisors are the daemon's own children, so their exit statuses are read directly, and
the daemon's round asks it how its tasks ended (`outcomes`) and has it signal them (`kill`,
`stop --kill`). A mixin of `agent.Agent`; its state lives there.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Collection

from . import evidence, launcher, procs, stopping


class OneMachine:
    children: dict[str, launcher.Child]
    state: Path
    namespace: str
    kill_grace: float

    def outcomes(self, running: dict[str, dict[str, Any] | None], records: dict[str, Any],
                 successes: Collection[str]) -> tuple[dict[str, tuple[evidence.Outcome, int | None]],
                                                      dict[str, dict[str, Any]]]:
        """One machine's `observe`, for the daemon's round: how each of these running tasks
        ended ({uid: (outcome, its supervisor's exit status where we reaped it)}), by
        `evidence.outcome`, and the records to put back (a task still running whose record
        someone wiped). `running`: each task's last whole record we know (None: none yet);
        `records`: the registry as the daemon read it this round; `successes`: the uni_ids
        with a success line in the history."""
        ended: dict[str, tuple[evidence.Outcome, int | None]] = {}
        missing: dict[str, dict[str, Any]] = {}
        for uid, known in running.items():
            record = records.get(uid)
            logfile = launcher.log_path(self.state, uid)
            child = self.children.get(uid)
            if child is not None:
                rc = child.poll()
                if rc is None:
                    how = None
                else:  # our own child: its exit status is the best word there is
                    how = evidence.outcome(uid, record, logfile, alive=lambda: True, returncode=rc,
                                           supervisor_pid=child.pid, succeeded=uid in successes)
            else:  # adopted: not our child, so the registry, the history and the log tell how it ended
                rc, sup = None, (known or {}).get("supervisor_pid")
                how = evidence.outcome(uid, record, logfile, supervisor_pid=sup if procs.is_pid(sup) else None,
                                       alive=lambda: self.alive(uid, record, known), succeeded=uid in successes)
            if how is not None:
                ended[uid] = (how, rc)
            elif record is None and known:
                missing[uid] = known  # wiped by someone while it runs: put our record back
        return ended, missing

    def terminate(self, uid: str, record: dict[str, Any]) -> str | None:
        """SIGTERM to a running task (its supervisor forwards it to the task's group), `record`
        being the last whole one we read of it; the reason when nothing of it can be signalled
        safely. Only a supervisor whose identity we hold, or the worker group it leads."""
        sup, sup_ct = record.get("supervisor_pid"), record.get("supervisor_create_time")
        child = self.children.get(uid)
        if child is not None:
            if child.poll() is not None:
                return f"{uid} has just ended; nothing to kill"
            # Our own fork, not yet reaped: its pid cannot have been given to anyone else.
            os.kill(child.pid, signal.SIGTERM)
        elif procs.is_pid(sup) and procs.liveness(sup, sup_ct) == "alive":
            try:
                os.kill(sup, signal.SIGTERM)
            except ProcessLookupError:
                pass
        elif not procs.signal_group(*stopping.worker_group(record), signal.SIGTERM):
            return f"{uid}: no process of it whose identity can be verified; not signalling"
        return None

    def force(self, uid: str, record: dict[str, Any]) -> None:
        """SIGKILL to what is left of a task that `terminate` did not end in its grace period."""
        child = self.children.get(uid)
        if child is not None and child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)  # our unreaped fork: its pid is still its own
        procs.signal_group(record.get("supervisor_pid"), record.get("supervisor_create_time"), signal.SIGKILL)
        procs.signal_group(*stopping.worker_group(record), signal.SIGKILL)

    def end_all(self, records: list[dict[str, Any]], clock: Callable[[], float] = time.monotonic) -> None:
        """`stop --kill` on one machine: end these tasks (SIGTERM, SIGKILL after the grace
        period), reaping our own supervisors meanwhile, and wait for those."""
        def reap() -> None:
            for child in self.children.values():
                child.poll()

        stopping.end_tasks(records, self.kill_grace, reap, clock)
        for child in self.children.values():
            child.wait(timeout=5)

    def end_leftovers(self, uid: str, record: dict[str, Any]) -> None:
        """A lost task's processes that may still run: ended (by identity or environment)."""
        stopping.end_leftovers(record, uid, self.namespace)
