"""Ending running tasks on purpose (`stop --kill`, a second Ctrl-C).

Only what the daemon itself started is signalled: a supervisor whose (pid, create time)
matches our record, and the process group its worker leads when the record says that group
is the worker's. SIGTERM first (the supervisor forwards it to the task's group), SIGKILL to
what is left after the grace period.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable, Iterable

from . import procs


def worker_group(record: dict[str, Any]) -> tuple[Any, Any]:
    """The process group the task's worker leads, with the leader's recorded create time (None,
    so nothing is signalled, when the record doesn't say the leader is its worker)."""
    pgid = record.get("pgid")
    return pgid, record.get("create_time") if record.get("pid") == pgid else None


def end_leftovers(record: dict[str, Any], uni_id: str, namespace: str) -> None:
    """What a dead supervisor left behind, ended before its task runs again: the recorded
    process group of its worker, and any process still carrying the task's id and our
    namespace in its environment (the supervisor may have died before recording)."""
    from .evidence import NAMESPACE_ENV, UNI_ID_ENV

    procs.signal_group(*worker_group(record), signal.SIGKILL)
    procs.kill_all(procs.processes_with_env(**{UNI_ID_ENV: uni_id, NAMESPACE_ENV: namespace}))


def end_tasks(records: Iterable[dict[str, Any]], grace: float, reap: Callable[[], None],
              clock: Callable[[], float] = time.monotonic) -> None:
    """SIGTERM each task's verified supervisor, wait up to `grace` seconds for their groups
    to empty (calling `reap` so our children don't linger as zombies), then SIGKILL."""
    records = list(records)
    groups = []
    for record in records:
        sup, sup_ct = record.get("supervisor_pid"), record.get("supervisor_create_time")
        if procs.is_pid(sup) and procs.liveness(sup, sup_ct) == "alive":
            try:
                os.kill(sup, signal.SIGTERM)  # the supervisor forwards it to the task's group
            except ProcessLookupError:
                pass
        groups += [g for g in (sup, record.get("pgid")) if procs.is_pid(g)]
    deadline = clock() + grace
    while clock() < deadline and any(procs.group_alive(g) for g in groups):
        reap()
        time.sleep(0.05)
    for record in records:
        procs.signal_group(record.get("supervisor_pid"), record.get("supervisor_create_time"), signal.SIGKILL)
        procs.signal_group(*worker_group(record), signal.SIGKILL)


def mark_stopped(data: dict[str, Any], uni_id: str, **fields: Any) -> None:
    """In a registry being changed: the task was ended on purpose (`stop --kill`), so its
    record says `stopped` and a restart runs it again without counting a failure; unless it
    finished in the grace period (its success stays)."""
    record = data.get(uni_id) if isinstance(data.get(uni_id), dict) else {}
    if record.get("state") == "normal_exit":
        return
    record.update(state="abnormal_exit", error_type="stopped", **fields)
    data[uni_id] = record
