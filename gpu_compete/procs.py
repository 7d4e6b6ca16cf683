"""Process identity: a pid alone is not a process, (pid, create_time) is.

Pids are reused; every liveness question and every signal goes through here so that no
process is taken for another.
"""

from __future__ import annotations

import os
import signal

import psutil

# psutil reports create times rounded to clock ticks; two readings of one process agree to
# well under this, two different processes on one pid differ by far more.
_TOLERANCE_S = 0.05


def is_pid(value: object) -> bool:
    """A plausible pid: an int (not a bool) above 1 (never init, never 'all processes')."""
    return type(value) is int and value > 1


def create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError, OverflowError):
        return None


def liveness(pid: object, recorded_create_time: object = None) -> str:
    """`alive`, `dead`, `reused` (pid exists but is another process) or `unverified`
    (exists, no create time recorded to compare, as with legacy bare-pid records)."""
    if not is_pid(pid):
        return "dead"
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return "dead"
        actual = proc.create_time()
    except (psutil.Error, ValueError, OverflowError):
        return "dead"
    if not isinstance(recorded_create_time, (int, float)) or isinstance(recorded_create_time, bool):
        return "unverified"
    return "alive" if abs(actual - recorded_create_time) < _TOLERANCE_S else "reused"


def is_alive(pid: object, recorded_create_time: object = None) -> bool:
    return liveness(pid, recorded_create_time) in ("alive", "unverified")


def signal_group(pgid: object, create_time_: object, sig: int) -> bool:
    """Signal the process group that a process we started leads, if it still is that process
    (same pid and create time; with no create time to compare, nothing is signalled).

    The group leader may already have exited while its children live on; then the group id
    cannot have been handed to a new process (Linux never reuses a pid that still names a
    group), so signalling the group is still safe.
    """
    if not is_pid(pgid) or not isinstance(create_time_, (int, float)) or isinstance(create_time_, bool):
        return False  # nothing recorded to check the leader against
    state = liveness(pgid, create_time_)
    if state not in ("alive", "dead"):
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def group_alive(pgid: int) -> bool:
    """True while any process is left in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def scan_env(**wanted: str) -> list[tuple[psutil.Process, dict[str, str]]]:
    """Our user's live processes whose environment (as they were started with it) holds every
    `NAME=value` in `wanted`, with that environment."""
    found = []
    for proc in psutil.process_iter(["uids", "status"]):
        try:
            if (proc.info["uids"] is None or proc.info["uids"].real != os.getuid()
                    or proc.info["status"] == psutil.STATUS_ZOMBIE):
                continue
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if all(env.get(k) == v for k, v in wanted.items()):
            found.append((proc, env))
    return found


def processes_with_env(**wanted: str) -> list[psutil.Process]:
    """The leftovers of a task whose supervisor died before it could say where they were."""
    return [proc for proc, _ in scan_env(**wanted)]


def kill_all(processes: list[psutil.Process]) -> None:
    """SIGKILL each; psutil refuses a pid that now names another process."""
    for proc in processes:
        try:
            proc.kill()
        except psutil.Error:
            pass


SIGNAL_NAMES = {int(s): s.name for s in signal.Signals}
