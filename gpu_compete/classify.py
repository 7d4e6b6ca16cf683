"""Exit status + the tail of a task's output -> why it failed.

`oom` (CUDA or host allocator out of memory), `runtime_error` (a Python RuntimeError),
`killed` (ended by a signal), `unknown` otherwise. The daemon adds `lost` (the process died
without anyone recording how) and `stopped` (ended by `gpu-compete stop --kill`).
"""

from __future__ import annotations

import re
import signal

ERROR_TYPES = ("oom", "runtime_error", "killed", "lost", "stopped", "unknown")

_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|out of memory|CUBLAS_STATUS_ALLOC_FAILED|"
                  r"RESOURCE_EXHAUSTED", re.IGNORECASE)
_RUNTIME = re.compile(r"\bRuntimeError\b")

# A shell reports a child ended by signal N as exit status 128+N; these are the signals that
# mean "someone ended it" rather than "it crashed".
_KILL_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGKILL, signal.SIGTERM}


def killed_by(returncode: int) -> int | None:
    """The signal that ended the process, from Popen's negative code or a shell's 128+N."""
    if returncode < 0:
        return -returncode
    if returncode - 128 in _KILL_SIGNALS:
        return returncode - 128
    return None


def classify(returncode: int, output_tail: str) -> str | None:
    """None for success, else one of ERROR_TYPES."""
    if returncode == 0:
        return None
    if killed_by(returncode) is not None:
        return "killed"
    if _OOM.search(output_tail):
        return "oom"
    if _RUNTIME.search(output_tail):
        return "runtime_error"
    return "unknown"
