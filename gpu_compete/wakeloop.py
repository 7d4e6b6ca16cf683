"""The daemon's sleep: until the next round is due, or at once when a signal arrives, a
child exits, or a registered file descriptor (a control or metrics socket) is readable.

Signal handlers only set flags (the callback given); the loop acts on them. Everything runs
in the one thread: the daemon forks task supervisors, and a fork beside other threads could
copy a lock another thread holds.
"""

from __future__ import annotations

import os
import select
import signal
from typing import Any, Callable

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def set_flags(target: Any, signum: int) -> None:
    """What the run signals mean, as flags on `target` (a daemon or a coordinator); runs in the
    signal handler. SIGINT/SIGTERM drain (a second one forces: the tasks are ended), SIGUSR2
    forces at once, SIGUSR1 asks for status now."""
    if signum in (signal.SIGINT, signal.SIGTERM):
        if target.draining:
            target.force = True
        target.draining = True
    elif signum == signal.SIGUSR2:
        target.draining = target.force = True
    elif signum == signal.SIGUSR1:
        target.status_requested = True


class WakeLoop:
    def __init__(self, on_signal: Callable[[int], None], clock: Callable[[], float]):
        self.on_signal = on_signal
        self.clock = clock
        self._readers: dict[int, Callable[[], bool | None]] = {}
        self._wake_r = self._wake_w = -1
        self._previous: dict[int, Any] = {}

    def add_reader(self, fd: int, callback: Callable[[], bool | None]) -> None:
        """Call `callback` (in the loop, never in a signal handler) when `fd` is readable;
        a true answer ends the sleep (a request that wants a round at once)."""
        self._readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self._readers.pop(fd, None)

    def __enter__(self) -> "WakeLoop":
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, lambda signum, _frame: self.on_signal(signum))
        self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select
        return self

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(-1)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def pending(self) -> bool:
        """True when a signal, a child's exit or a reader is already waiting to be served."""
        if self._wake_r < 0:
            return False
        try:
            ready, _, _ = select.select([self._wake_r, *self._readers], [], [], 0)
        except (InterruptedError, OSError, ValueError):
            return True  # look again in a moment rather than never
        return bool(ready)

    def sleep_until(self, deadline: float) -> None:
        """Sleep until `deadline` (monotonic) or until a signal, a child's exit or a reader
        wakes us; readers are served as they become ready, without ending the sleep early."""
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0 or self._serve(remaining):
                return

    def serve(self) -> bool:
        """Serve what is ready now, without waiting; True when a signal, a child's exit or a
        reader asks for a round at once (for a loop that waits on something else, in slices)."""
        return self._serve(0)

    def _serve(self, timeout: float) -> bool:
        try:
            ready, _, _ = select.select([self._wake_r, *self._readers], [], [], timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            return False
        woken = False
        for fd in ready:
            if fd == self._wake_r:
                woken = True
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            elif fd in self._readers and self._readers[fd]():
                woken = True
        return woken
