"""What is known of a task beyond its registry record: whether it still runs, and how it ended.

The registry is a blackboard that old wrapper scripts rewrite without a lock, and may even
reduce to a bare pid (`"exp001": 12345`). So a task is never declared lost, killed or run
again on the registry's word alone:

- **alive** is decided by identity: a supervisor or worker whose (pid, create time) matches
  what we recorded, or, for a pid recorded without a create time, a live process of ours that
  carries the task's id and our namespace in its environment (which only a process we started,
  or a child of one, can have);
- **how it ended** comes from the best evidence there is: the wrapper's own final record,
  else the supervisor's end line in the task's log, else the classifier over the log's tail.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

import psutil

from . import procs
from .classify import classify
from .gpus.simulated import NAMESPACE_ENV

UNI_ID_ENV = "GPU_COMPETE_UNI_ID"
TAIL_BYTES = 65536

# What the supervisor writes when its command ends (supervisor.run):
#   ==== 2026-11-22T14:03:00.123 end q1-ab12cd34: status 1, abnormal_exit (runtime_error)
_END = re.compile(r"^==== \S+ end (?P<uid>\S+): (?P<how>[^,]+), (?P<state>normal_exit|abnormal_exit)"
                  r"(?: \((?P<error>[a-z_]+)\))?\s*$")
_START = re.compile(r"^==== \S+ start (?P<uid>\S+) ")


class Ending(NamedTuple):
    state: str  # normal_exit / abnormal_exit
    error_type: str | None


def process_carries(pid: object, uni_id: str, namespace: str) -> bool:
    """True when `pid` is a live process of our user whose environment names this task and
    our namespace: the task's own process (or a child of it), whatever pid it has now."""
    if not procs.is_pid(pid):
        return False
    try:
        proc = psutil.Process(pid)
        if proc.uids().real != os.getuid() or proc.status() == psutil.STATUS_ZOMBIE:
            return False
        env = proc.environ()
    except (psutil.Error, OSError):
        return False
    return env.get(UNI_ID_ENV) == uni_id and env.get(NAMESPACE_ENV) == namespace


def record_alive(record: dict[str, Any], uni_id: str, namespace: str) -> bool:
    """Does the process a record names still run this task? Verified identities only."""
    if procs.liveness(record.get("supervisor_pid"), record.get("supervisor_create_time")) == "alive":
        return True
    state = procs.liveness(record.get("pid"), record.get("create_time"))
    if state == "alive":
        return True
    # A pid with no create time (a legacy bare-pid record): believed only if the process
    # says by its environment that it is this task of ours.
    return state == "unverified" and process_carries(record.get("pid"), uni_id, namespace)


def supervisor_running(log_path: Path) -> bool:
    """True while a supervisor holds its shared lock on the task's log: it runs, even if the
    task's own processes have ended and the outcome is not written yet."""
    try:
        fd = os.open(log_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also drops our lock, if we got it
    return False


def live_task_processes(uni_ids: set[str] | dict, namespace: str) -> dict[str, dict[str, Any]]:
    """{uni_id: {pid, create_time, gpu}} of the oldest live process of ours carrying one of
    these task ids and our namespace in its environment (one scan of the process table)."""
    found: dict[str, dict[str, Any]] = {}
    for proc, env in procs.scan_env(**{NAMESPACE_ENV: namespace}):
        uid = env.get(UNI_ID_ENV)
        if uid not in uni_ids:
            continue
        try:
            ct = proc.create_time()
        except psutil.Error:
            continue
        if uid not in found or ct < found[uid]["create_time"]:
            found[uid] = {"pid": proc.pid, "create_time": ct,
                          "gpu": env.get("GPU_COMPETE_GPU") or env.get("CUDA_VISIBLE_DEVICES") or None}
            if env.get("GPU_COMPETE_GPUS_USED"):  # a gpus=N task: all its GPUs (launcher.GPU_KEYS_ENV)
                found[uid]["gpus"] = env["GPU_COMPETE_GPUS_USED"].split(",")
    return found


def log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - TAIL_BYTES))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def supervisor_ending(tail: str, uni_id: str) -> Ending | None:
    """The end line the supervisor wrote for the task's last attempt, if that attempt ended
    (an end line before the last start line belongs to an earlier attempt)."""
    for line in reversed(tail.splitlines()):
        start = _START.match(line)
        if start and start["uid"] == uni_id:
            return None
        end = _END.match(line)
        if end and end["uid"] == uni_id:
            return Ending(end["state"], end["error"] if end["state"] == "abnormal_exit" else None)
    return None


def wrapper_ending(record: dict[str, Any] | None, supervisor_pid: int | None = None) -> Ending | None:
    """A final state the registry holds in a form a writer chose (not a bare pid). With the
    attempt's supervisor known, only a record that names it (`exec_pid`, written when the
    attempt started) speaks for this attempt: a stale record of an earlier attempt, put back
    by a writer that read it before, does not."""
    if not record or record.get("legacy") or record.get("state") not in ("normal_exit", "abnormal_exit"):
        return None
    if supervisor_pid is not None and record.get("exec_pid") != supervisor_pid:
        return None
    error = record.get("error_type") if record["state"] == "abnormal_exit" else None
    return Ending(record["state"], error if isinstance(error, str) and error else None)


def error_type(record: dict[str, Any] | None, tail: str, uni_id: str, returncode: int | None = None,
               supervisor_pid: int | None = None) -> str:
    """Why an attempt failed, from the best evidence: the wrapper's record, the supervisor's
    end line, the classifier over the log tail (with the exit status where we have it)."""
    said = wrapper_ending(record, supervisor_pid)
    if said and said.error_type and said.error_type != "unknown":
        return said.error_type
    ended = supervisor_ending(tail, uni_id)
    if ended and ended.error_type:
        return ended.error_type
    if said and said.error_type:
        return said.error_type
    return classify(returncode if returncode not in (None, 0) else 1, tail) or "unknown"


class Outcome(NamedTuple):
    """How an attempt ended: `normal_exit`, `abnormal_exit` (with why) or `lost` (no word of it)."""
    state: str
    error_type: str | None
    why: str | None = None


def outcome(uni_id: str, record: dict[str, Any] | None, log_path: Path, *, alive: Callable[[], bool],
            returncode: int | None = None, supervisor_pid: int | None = None,
            succeeded: bool = False) -> Outcome | None:
    """How the task's attempt ended, from the best evidence; None while it runs. One rule for
    the daemon and for every node's agent.

    `returncode`: the exit status of its supervisor where we reaped it (our own child); else
    `alive()` says whether it still runs. `supervisor_pid`: this attempt's supervisor, so that
    a stale record of an earlier attempt does not speak for it. `succeeded`: the history
    holds its success line (a wrapped script's, say)."""
    said = wrapper_ending(record, supervisor_pid)
    if succeeded or (said and said.state == "normal_exit") or (returncode == 0 and not said):
        return Outcome("normal_exit", None)
    if returncode is not None and returncode < 0 and not said:
        return Outcome("lost", "lost", f"its supervisor was killed by signal {-returncode}")
    if said or returncode is not None:
        return Outcome("abnormal_exit", error_type(record, log_tail(log_path), uni_id, returncode, supervisor_pid))
    if alive():
        return None
    return unseen_outcome(uni_id, record, log_path)


def unseen_outcome(uni_id: str, record: dict[str, Any] | None, log_path: Path) -> Outcome:
    """A task whose processes are gone and whose end no record holds: the supervisor's end
    line in its log may still say how it ended; only without one is it lost."""
    tail = log_tail(log_path)
    ended = supervisor_ending(tail, uni_id)
    if ended is not None and ended.state == "normal_exit":
        return Outcome("normal_exit", None)
    if ended is not None:
        return Outcome("abnormal_exit", error_type(record, tail, uni_id))
    return Outcome("lost", "lost", "its process died without recording how it ended")
