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


def create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError, OverflowError):
        return None


def liveness(pid: object, recorded_create_time: object = None) -> str:
    """`alive`, `dead`, `reused` (pid exists but is another process) or `unverified`
    (exists, no create time recorded to compare, as with legacy bare-pid records)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
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


def signal_group(pgid: int, create_time_: float | None, sig: int) -> bool:
    """Signal the process group that a process we started leads, if it still is that process
    (same pid and create time; with no create time to compare, nothing is signalled).

    The group leader may already have exited while its children live on; then the group id
    cannot have been handed to a new process (Linux never reuses a pid that still names a
    group), so signalling the group is still safe.
    """
    state = liveness(pgid, create_time_)
    if state not in ("alive", "dead"):  # reused, or nothing recorded to check it against
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


def processes_with_env(**wanted: str) -> list[psutil.Process]:
    """Our user's processes whose environment holds every `NAME=value` in `wanted`: the
    leftovers of a task whose supervisor died before it could say where they were."""
    found = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != os.getuid():
                continue
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if all(env.get(k) == v for k, v in wanted.items()):
            found.append(proc)
    return found


def kill_all(processes: list[psutil.Process]) -> None:
    """SIGKILL each; psutil refuses a pid that now names another process."""
    for proc in processes:
        try:
            proc.kill()
        except psutil.Error:
            pass


SIGNAL_NAMES = {int(s): s.name for s in signal.Signals}
