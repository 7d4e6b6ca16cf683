"""Exit status + the tail of a task's output -> why it failed, from one small table.

Each rule says where it looks (`exit`: the exit status; `exception`: the last Python exception
line of the output, so an `ImportError` printed as a warning early on does not decide a later
failure; `output`: anywhere in the tail), what it finds, the error type it gives, and whether
that failure is *permanent*: retrying cannot help (a typo, a missing module), so by default the
task fails for good at once. The first rule that matches wins. Add a row to `RULES` to teach
the classifier a new failure; nothing else needs to change.

Before the table: `timeout` (the supervisor ended it at its time limit), `killed` (ended by a
signal we sent, or SIGTERM/SIGINT/SIGHUP from anyone), `host_oom` (SIGKILL that we did not
send: the kernel's OOM killer, as a shell reports it, "Killed", exit 137). The daemon adds
`lost` (the process died without anyone recording how) and `stopped` (`gpu-compete stop --kill`).
"""

from __future__ import annotations

import re
import signal
from typing import NamedTuple


class Rule(NamedTuple):
    where: str  # "exit", "exception" or "output"
    match: int | re.Pattern[str]  # an exit status, or a pattern
    error_type: str
    permanent: bool  # retrying cannot help: fail for good at once (unless --retry-permanent)
    why: str  # shown in the README table


_I = re.IGNORECASE
RULES: tuple[Rule, ...] = (
    Rule("exit", 126, "not_found", True, "exit 126: the command is not executable"),
    Rule("exit", 127, "not_found", True, "exit 127: command not found"),
    Rule("output", re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|"
                              r"CUDA error: out of memory|RESOURCE_EXHAUSTED|\bout of memory\b", _I),
         "oom", False, "CUDA/allocator out of memory (PyTorch, torch.OutOfMemoryError, JAX, TF)"),
    Rule("output", re.compile(r"\bNCCL error\b|\bncclInternalError\b|\bncclUnhandledCudaError\b|"
                              r"\bncclSystemError\b|\bncclRemoteError\b|\bDistBackendError\b|"
                              r"Watchdog caught collective operation timeout"),
         "nccl_error", False, "NCCL / torch.distributed communication failure"),
    Rule("exception", re.compile(r"^(SyntaxError|IndentationError|TabError)\b"), "syntax_error", True,
         "Python SyntaxError / IndentationError"),
    Rule("exception", re.compile(r"^(ModuleNotFoundError|ImportError)\b"), "import_error", True,
         "Python ModuleNotFoundError / ImportError"),
    Rule("output", re.compile(r"can't open file .*\[Errno 2\] No such file or directory"), "not_found", True,
         "python: can't open file (the script does not exist)"),
    Rule("exception", re.compile(r"^(\w+\.)*RuntimeError\b"), "runtime_error", False, "Python RuntimeError"),
)

# Types decided before the table, and those the daemon adds.
OTHER_TYPES = ("timeout", "killed", "host_oom", "lost", "stopped", "unknown")
ERROR_TYPES = tuple(dict.fromkeys([r.error_type for r in RULES] + list(OTHER_TYPES)))
PERMANENT = frozenset(r.error_type for r in RULES if r.permanent)

# The last line of a Python traceback: `ModuleNotFoundError: No module named 'x'`,
# `torch.OutOfMemoryError: ...`, or a bare `SyntaxError: invalid syntax`.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)\b(?::.*)?$",
                             re.MULTILINE)

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


def last_exception(output_tail: str) -> str | None:
    found = None
    for found in _EXCEPTION_LINE.finditer(output_tail):
        pass
    return found.group(0) if found else None


def classify(returncode: int, output_tail: str, *, signalled: bool = False, timed_out: bool = False) -> str | None:
    """None for success, else one of ERROR_TYPES. `signalled`: we (the supervisor, the daemon)
    sent the task a signal; `timed_out`: it was ended at its time limit (a failure even when
    it then exits 0: it did not finish its work)."""
    if timed_out:
        return "timeout"
    if returncode == 0:
        return None
    sig = killed_by(returncode)
    if sig is not None:
        if sig == signal.SIGKILL and not signalled:
            return "host_oom"
        return "killed"
    exception = None
    for rule in RULES:
        if rule.where == "exit":
            hit = returncode == rule.match
        elif rule.where == "exception":
            if exception is None:
                exception = last_exception(output_tail) or ""
            hit = bool(rule.match.search(exception))  # type: ignore[union-attr]
        else:
            hit = bool(rule.match.search(output_tail))  # type: ignore[union-attr]
        if hit:
            return rule.error_type
    return "unknown"


def is_permanent(error_type: str | None) -> bool:
    """Would retrying only repeat it? (By default such a task fails for good at once.)"""
    return error_type in PERMANENT
