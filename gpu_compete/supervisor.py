"""The small supervisor behind `gpu-compete exec`, and under every task the daemon starts.

It starts CMD in a process group of its own, records `{pid, state: running}` in the
registry, forwards SIGINT/SIGTERM/SIGHUP to CMD's group, copies CMD's output to the
terminal (and a log), and when CMD ends writes the final state itself. Because the final
state is written here and not by the daemon, a task keeps its outcome even while no daemon
runs (a daemon restarted later adopts it and reads what was written).

CMD is started before anything heavy (psutil, the registry) is imported: every task's start
waits for this module, and the gap between two tasks on a GPU is what the daemon is judged on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import IO, TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    from .registry import Registry

TAIL_BYTES = 64 * 1024
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ExecResult(NamedTuple):
    returncode: int  # CMD's status as a shell would give it: 128+N for signal N
    state: str
    error_type: str | None


class _Tail:
    """The last TAIL_BYTES of CMD's output, for the failure classifier."""

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.lock = threading.Lock()

    def add(self, data: bytes) -> None:
        with self.lock:
            self.chunks.append(data)
            self.size += len(data)
            while self.size > TAIL_BYTES and len(self.chunks) > 1:
                self.size -= len(self.chunks.popleft())

    def text(self) -> str:
        with self.lock:
            return b"".join(self.chunks)[-TAIL_BYTES:].decode("utf-8", "replace")


_PRCTL: Any = None  # libc's prctl, loaded once (the daemon loads it before forking supervisors)


def load_prctl() -> None:
    """Load libc's prctl now rather than in every task's child between fork and exec, where
    importing ctypes and dlopen-ing libc cost milliseconds of every task's start."""
    global _PRCTL
    if _PRCTL is None:
        try:
            import ctypes

            _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):  # pragma: no cover - not Linux
            _PRCTL = False


_SHIM: list[str] | None = None  # `setpriv --pdeathsig KILL --`, where it works (load_death_shim)


def load_death_shim() -> None:
    """Find util-linux's `setpriv --pdeathsig` once (the daemon, before it forks supervisors).
    A task started through it needs no Python code between fork and exec, so Popen can use
    vfork: a fork of the supervisor (a copy of the daemon's memory map) costs ~1.5 ms of every
    task's start, and more while the machine is busy. Without it (or before Python 3.11,
    whose Popen cannot make a process group without preexec_fn) `_set_death_signal` does it."""
    global _SHIM
    if _SHIM is not None or sys.version_info < (3, 11):
        return
    import shutil

    found = shutil.which("setpriv")
    shim = [found, "--pdeathsig", "KILL", "--"] if found else []
    if shim:
        try:
            ok = subprocess.run([*shim, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        shim = shim if ok else []  # an old setpriv without --pdeathsig
    _SHIM = shim


def _start(cmd: list[str]) -> subprocess.Popen:
    """CMD in a process group of its own that gets SIGKILL if this supervisor dies."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    if _SHIM:
        return subprocess.Popen([*_SHIM, *cmd], process_group=0, **pipes)  # type: ignore[call-overload]
    return subprocess.Popen(cmd, preexec_fn=_set_death_signal, **pipes)


def _set_death_signal() -> None:
    """In CMD's child before exec: own process group, and SIGKILL if the supervisor dies,
    so a killed supervisor cannot leave an unrecorded task running."""
    os.setpgid(0, 0)
    load_prctl()
    if _PRCTL:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _hold_alive_lock(log_path: str) -> None:
    """Hold a shared lock on the task's log for the supervisor's whole life (the kernel drops
    it when the process ends). A daemon restarted meanwhile finds the task alive by it even
    between the task's end and the moment its outcome is written, when no process of the
    task is left to find by its environment (evidence.supervisor_running)."""
    import fcntl

    try:
        fd = os.open(log_path, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return  # without the lock a restarted daemon falls back on the other evidence
    _ALIVE_LOCKS.append(fd)  # never closed: it must outlive every write below


_ALIVE_LOCKS: list[int] = []


def _pump(src: IO[bytes], sinks: list[IO[bytes]], tail: _Tail, lock: threading.Lock) -> None:
    for data in iter(lambda: src.read1(65536), b""):  # type: ignore[attr-defined]
        tail.add(data)
        with lock:
            for sink in list(sinks):
                try:
                    sink.write(data)
                    sink.flush()
                except (OSError, ValueError):
                    sinks.remove(sink)  # a closed terminal must not stop the task
    src.close()


def _warn(message: str) -> None:
    try:
        sys.stderr.write(f"gpu-compete exec: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _record(registry: Registry | None, uni_id: str, vital: bool = True, **fields: Any) -> None:
    """Write to the registry; a failing disk is reported but never stops or kills the task."""
    from .registry import RegistryError

    if registry is None:
        return
    for attempt in range(3):
        try:
            registry.set(uni_id, vital, **fields)
            return
        except RegistryError as exc:
            if attempt == 2:
                _warn(f"could not record {fields.get('state', 'state')} for {uni_id}: {exc}")
            else:
                time.sleep(0.2)


def run(cmd: list[str], uni_id: str, registry: Registry | str | os.PathLike[str] | None, log_path: str | None = None,
        quiet: bool = False, history: str | None = None, meta: dict[str, Any] | None = None,
        title: str | None = None, timeout_s: float | None = None, grace_s: float = 10.0,
        done_fd: int | None = None, fence: tuple[str, float] | None = None) -> ExecResult:
    """Run CMD to its end and record it; `registry` may be a path, opened once CMD runs.

    With `timeout_s`, CMD's process group gets SIGTERM once it has run that long and SIGKILL
    `grace_s` later; it then ends as `timeout`. With `done_fd` (a pipe to the daemon), the
    moment CMD and its whole process group are gone is said there at once, before the
    outcome is worked out and written: the daemon can give the GPU to another queue's task
    while this one's record is still being written."""
    log: IO[bytes] | None = None
    if log_path:
        os.makedirs(os.path.dirname(log_path) or ".", mode=0o700, exist_ok=True)
        log = open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab", buffering=0)
        _hold_alive_lock(log_path)
        what = title or " ".join(cmd)
        log.write(f"==== {_now()} start {uni_id} (supervisor {os.getpid()}): {what}\n".encode())
    started = time.time()
    try:
        child = _start(cmd)
    except OSError as exc:
        _warn(f"cannot start {cmd[0]!r}: {exc.strerror or exc}")
        if log:
            log.write(f"==== {_now()} could not start: {exc}\n".encode())
        registry = _open_registry(registry)
        _record(registry, uni_id, state="abnormal_exit", error_type="not_found", exit_status=127)
        return ExecResult(127, "abnormal_exit", "not_found")
    signalled = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal signalled
        signalled = True
        try:
            os.killpg(child.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    # CMD is running: now pay for the imports it didn't have to wait for.
    from . import journal, procs
    from .classify import classify, killed_by
    from .registry import RegistryError

    registry = _open_registry(registry)
    _record(registry, uni_id, False, pid=child.pid, create_time=procs.create_time(child.pid), pgid=child.pid,
            state="running", exec_pid=os.getpid(), started_at=_now(), error_type=None, exit_status=None)

    tail, lock = _Tail(), threading.Lock()
    out_sinks: list[IO[bytes]] = [] if quiet else [sys.stdout.buffer]
    err_sinks: list[IO[bytes]] = [] if quiet else [sys.stderr.buffer]
    if log:
        out_sinks.append(log)
        err_sinks.append(log)
    pumps = [threading.Thread(target=_pump, args=(child.stdout, out_sinks, tail, lock), daemon=True),
             threading.Thread(target=_pump, args=(child.stderr, err_sinks, tail, lock), daemon=True)]
    for pump in pumps:
        pump.start()
    raw, why = _wait(child, timeout_s, grace_s, log, fence)
    timed_out = why == "timeout"
    if done_fd is not None:
        _say_done(done_fd, child.pid)
    for pump in pumps:
        pump.join(timeout=5)

    returncode = 128 - raw if raw < 0 else raw
    # A wrapped script may have said how it ended while it ran; its word wins.
    try:
        said = registry.get(uni_id) if registry else None
    except RegistryError as exc:  # an unreadable registry must not cost CMD's exit status
        _warn(f"could not read the registry: {exc}")
        said = None
    # Only a final state written during this attempt counts (the record names this supervisor,
    # as it did when it started): a stale record put back by some writer is not the wrapper's word.
    said_final = (said is not None and said.get("state") in ("normal_exit", "abnormal_exit")
                  and said.get("exec_pid") == os.getpid())
    if said_final:
        state, error_type = said["state"], said.get("error_type") if said["state"] == "abnormal_exit" else None
        if state == "abnormal_exit" and error_type in (None, "", "unknown"):
            # The wrapper said it failed but not why (old wrappers write only pid and state):
            # the output still can.
            error_type = classify(returncode if returncode else 1, tail.text(), signalled=signalled) or "unknown"
    else:
        error_type = classify(returncode, tail.text(), signalled=signalled, timed_out=timed_out)
        state = "normal_exit" if error_type is None else "abnormal_exit"
    if why == "fenced":  # whatever it said as it was ended: it was ended because it runs elsewhere now
        state, error_type = "abnormal_exit", "lost"
    if log:
        sig = killed_by(returncode)
        how = f"signal {procs.SIGNAL_NAMES.get(sig, sig)}" if sig else f"status {returncode}"
        log.write(f"==== {_now()} end {uni_id}: {how}, {state}{f' ({error_type})' if error_type else ''}\n".encode())
        log.close()
    if history and state == "normal_exit":
        # Durable before the registry says so: a crash between the two can't lose a success.
        try:
            # The daemon writes the attempt's peak VRAM into the record as it grows.
            peak = said.get("peak_vram_gb") if said else None
            usage = {"peak_vram_gb": peak if isinstance(peak, (int, float)) and not isinstance(peak, bool) else None}
            journal.append(history, {"uni_id": uni_id, "state": state, "exit_status": returncode,
                                     "start": _iso(started), "end": _now(), **(meta or {}), **usage})
        except OSError as exc:  # the registry still says normal_exit; the daemon writes the line later
            _warn(f"could not append to {history}: {exc.strerror or exc}")
    _record(registry, uni_id, state=state, error_type=error_type, exit_status=returncode, ended_at=_now())
    # Only now: a signal arriving while the final state is written must not kill us before it is.
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    return ExecResult(returncode, state, error_type)


def _say_done(done_fd: int, pgid: int) -> None:
    """One byte when nothing of CMD's process group is left (a background process of the task
    may still hold the GPU otherwise), then EOF. EOF alone tells the daemon nothing: a
    supervisor that dies closes the pipe too, and then only its exit status counts."""
    try:
        if not _killpg(pgid, 0):
            os.write(done_fd, b"d")
    except OSError:
        pass
    finally:
        try:
            os.close(done_fd)
        except OSError:
            pass


def _wait(child: subprocess.Popen, timeout_s: float | None, grace_s: float, log: IO[bytes] | None,
          fence: tuple[str, float] | None = None) -> tuple[int, str | None]:
    """CMD's raw status, and why it was ended if it was: "timeout" (its time limit) or "fenced"
    (the fence went stale). Ending: SIGTERM to its group, SIGKILL to the group after the grace
    period (whatever of it still runs)."""
    started = time.monotonic()
    why = None
    while why is None:
        step = _FENCE_CHECK_S if fence else None
        if timeout_s is not None:
            left = timeout_s - (time.monotonic() - started)
            if left <= 0:
                why = "timeout"
                break
            step = left if step is None else min(step, left)
        try:
            return child.wait(timeout=step), None
        except subprocess.TimeoutExpired:
            pass
        if fence and _stale(*fence):
            why = "fenced"
    if why == "timeout":
        _limit_note(log, f"time limit: SIGTERM to the task's process group after {timeout_s:g} s")
    else:
        _limit_note(log, f"fence: {fence[0]} not touched for {fence[1]:g} s (this node's agent is gone or "
                         "cut off; the task runs again elsewhere): SIGTERM to the task's process group")
    _killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    raw = None
    # The grace period is for the whole group (a shell's python child saving a checkpoint),
    # not only its leader: SIGKILL goes once it passes with any of the group left.
    while time.monotonic() < deadline:
        if raw is None:
            raw = child.poll()
        if raw is not None and not _killpg(child.pid, 0):
            return raw, why
        time.sleep(0.05)
    _limit_note(log, f"{'time limit' if why == 'timeout' else 'fence'}: SIGKILL to what is left of the group "
                     f"after a further {grace_s:g} s")
    _killpg(child.pid, signal.SIGKILL)
    return (child.wait() if raw is None else raw), why


_FENCE_CHECK_S = 1.0


def _stale(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime > seconds
    except FileNotFoundError:
        return True
    except OSError:  # unreadable for another reason: not a proof that the agent is gone
        return False


def _killpg(pgid: int, sig: int) -> bool:
    """Signal a process group; False when none of it is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _limit_note(log: IO[bytes] | None, text: str) -> None:
    if log:
        try:
            log.write(f"==== {_now()} {text}\n".encode())
        except (OSError, ValueError):
            pass


def _open_registry(registry: Registry | str | os.PathLike[str] | None) -> Registry | None:
    if registry is None or not isinstance(registry, (str, os.PathLike)):
        return registry
    from .registry import Registry

    return Registry(registry)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _now() -> str:
    return _iso(time.time())


def main(argv: list[str] | None = None) -> int:
    """Entry used by the daemon (`python -m gpu_compete.supervisor`): no click, fast start."""
    import argparse

    parser = argparse.ArgumentParser(prog="gpu_compete.supervisor")
    parser.add_argument("--uni-id", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--log")
    parser.add_argument("--history")
    parser.add_argument("--meta", default="{}")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--title", help="What the log header says is running (default: the command)")
    parser.add_argument("--timeout", type=float, help="Seconds before CMD's group gets SIGTERM (then SIGKILL)")
    parser.add_argument("--grace", type=float, default=10.0, help="Seconds between SIGTERM and SIGKILL")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    import json

    result = run(cmd, args.uni_id, args.registry, args.log, quiet=args.quiet,
                 history=args.history, meta=json.loads(args.meta), title=args.title, timeout_s=args.timeout,
                 grace_s=args.grace)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
