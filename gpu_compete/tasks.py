"""Task values: what one block of the command file asks for, and how its placeholders expand.

Nothing here touches processes or files; the daemon keeps the mutable run state elsewhere.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import re
from dataclasses import dataclass, field
from enum import Enum

GIB = 1024**3

#: The characters a uni_id (and a queue id) may hold: safe in file names and shell words.
SAFE_ID = re.compile(r"[A-Za-z0-9_.-]+")

PLACEHOLDERS = ("work_dir", "uni_id", "available_gpu")

# Marker shown by `check` where the GPU index will go; chosen at launch.
GPU_MARKER = "<gpu>"

# `${uni_id}` is shell syntax for a shell variable: it is left to the shell (with a warning).
_PLACEHOLDER = re.compile(r"(?<!\$)\{(" + "|".join(PLACEHOLDERS) + r")\}")
_SHELL_PLACEHOLDER = re.compile(r"\$\{(" + "|".join(PLACEHOLDERS) + r")\}")
# `{word}` not preceded by `$` (so `${HOME}` is not a candidate).
_BRACE_WORD = re.compile(r"(?<!\$)\{([A-Za-z][A-Za-z0-9_-]*)\}")
_NORMALISED = {p.replace("_", ""): p for p in PLACEHOLDERS}
# Words people use for the GPU that are surely meant as `{available_gpu}`.
_GPU_WORDS = {"gpu", "gpuid", "gpus", "gpuindex", "device", "cudadevice", "availablegpus"}


def is_safe_id(value: str) -> bool:
    """True when `value` may be used as a uni_id or queue id (file names, shell words)."""
    return bool(SAFE_ID.fullmatch(value)) and value not in (".", "..")


def make_uni_id(queue: str, commands: tuple[str, ...], occurrence: int = 1) -> str:
    """Stable id from the queue and the commands (and, for the n-th identical block of one
    queue, n): `q1-3fa9c1d2`, `q1-3fa9c1d2-2`.

    Not the position: inserting or removing a task leaves every other task's id alone, so a
    finished experiment is never run again because the file changed around it. Editing a
    task's commands gives it a new id, so a changed experiment is never taken for a done one.
    """
    digest = hashlib.sha1("\n".join(commands).encode()).hexdigest()[:8]
    return f"q{queue}-{digest}" if occurrence <= 1 else f"q{queue}-{digest}-{occurrence}"


def legacy_uni_id(queue: str, position: int, commands: tuple[str, ...]) -> str:
    """The id versions before 0.2 gave a task (it carried the position in the queue): read
    when resuming a history they wrote."""
    digest = hashlib.sha1("\n".join(commands).encode()).hexdigest()[:8]
    return f"q{queue}-{position}-{digest}"


@dataclass(frozen=True)
class TaskSpec:
    """One task block: commands to run in one shell, on one GPU with `vram_gb` free."""

    queue: str
    position: int  # 1-based within its queue
    commands: tuple[str, ...]
    vram_gb: float
    line: int  # line of the first command, for messages
    uni_id: str = field(default="")
    occurrence: int = 1  # n for the n-th block of its queue with exactly these commands
    # Options of the queue line (`QUEUE_ID,VRAM_GB,key=value...`); the defaults are what a
    # plain `QUEUE_ID,VRAM_GB` line means. They are not part of the uni_id: changing when or
    # how urgently a task runs does not make it a different experiment (as VRAM_GB doesn't).
    gpus: int = 1  # GPUs it needs, each with vram_gb free
    timeout_s: float | None = None  # None: the daemon's --timeout, if any
    priority: int = 0  # higher is placed first among idle queue heads
    retries: int | None = None  # None: the daemon's --max-retries
    after: tuple[str, ...] = ()  # queues that must be done before it starts
    queue_line: int = 0  # line of its QUEUE_ID,VRAM_GB line, for messages

    def options(self) -> dict[str, object]:
        """The options given on its queue line (not the defaults), as `check --json` shows them."""
        out: dict[str, object] = {}
        if self.gpus != 1:
            out["gpus"] = self.gpus
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        if self.priority:
            out["priority"] = self.priority
        if self.retries is not None:
            out["retries"] = self.retries
        if self.after:
            out["after"] = list(self.after)
        return out

    def __post_init__(self) -> None:
        if not self.uni_id:
            object.__setattr__(self, "uni_id", make_uni_id(self.queue, self.commands, self.occurrence))

    @property
    def legacy_uni_id(self) -> str:
        return legacy_uni_id(self.queue, self.position, self.commands)

    @functools.cached_property
    def vram_bytes(self) -> int:
        return int(self.vram_gb * GIB)

    def expanded(self, work_dir: str, gpu: int | str | None = None) -> list[str]:
        """The commands with placeholders replaced; `gpu=None` shows the marker instead."""
        gpu_text = GPU_MARKER if gpu is None else str(gpu)
        return [expand(c, work_dir=work_dir, uni_id=self.uni_id, available_gpu=gpu_text) for c in self.commands]


def expand(command: str, **values: str) -> str:
    """Replace exactly `{work_dir}`, `{uni_id}`, `{available_gpu}`; every other brace survives.

    One pass, so a value that itself holds a placeholder (a work dir named `{uni_id}`) is
    inserted verbatim, not expanded again.
    """
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), command)


def shell_style_placeholders(command: str) -> list[str]:
    """Placeholder names written as shell variables (`${uni_id}`): left to the shell, warned of."""
    return [m.group(1) for m in _SHELL_PLACEHOLDER.finditer(command)]


def suspicious_placeholders(command: str) -> list[tuple[str, str]]:
    """Brace words that look like a misspelled placeholder: [(found, meant)]."""
    found = []
    for match in _BRACE_WORD.finditer(command):
        word = match.group(1)
        if word in PLACEHOLDERS:
            continue
        key = word.lower().replace("_", "").replace("-", "")
        if key in _NORMALISED:
            found.append((word, _NORMALISED[key]))
        elif key in _GPU_WORDS:
            found.append((word, "available_gpu"))
        else:
            close = difflib.get_close_matches(key, list(_NORMALISED), n=1, cutoff=0.8)
            if close:
                found.append((word, _NORMALISED[close[0]]))
    return found


def group_queues(specs: list[TaskSpec]) -> dict[str, list[TaskSpec]]:
    """Queues in order of first appearance, each with its tasks in file order."""
    queues: dict[str, list[TaskSpec]] = {}
    for spec in specs:
        queues.setdefault(spec.queue, []).append(spec)
    return queues


class TaskState(str, Enum):
    PENDING = "pending"  # not started yet
    RUNNING = "running"  # launched (or adopted) and not ended
    RETRY = "retry"  # failed; relaunched once `retry_at` passes (a backoff when that is later)
    COMPLETED = "completed"
    FAILED = "failed"  # gave up after --max-retries; the rest of its queue is blocked
    SKIPPED = "skipped"  # `gpu-compete skip`: will not run; its queue goes on without it


@dataclass
class Task:
    """A task's run state inside the daemon. Times are monotonic seconds."""

    spec: TaskSpec
    state: TaskState = TaskState.PENDING
    retry_count: int = 0
    retry_at: float = 0.0
    error_type: str | None = None
    gpu: str | None = None  # the GpuSnapshot.key it runs on
    launched_at: float | None = None
    confirmed: bool = False  # its process has shown up on its GPU
    adopted: bool = False  # started by an earlier daemon
    gpus: tuple[str, ...] = ()  # every GPU of a gpus=N task (`gpu` is the first)
    vram_gb_needed: float | None = None  # raised after an oom: what the next attempt asks for
    peak_vram_bytes: int | None = None  # most its processes held on one of its GPUs, this attempt
    peak_gpu: str | None = None  # where that peak was
    peak_written: int = 0  # the peak last written to its registry record
    warned_over: bool = False  # told once that it uses more than it declared

    @property
    def uni_id(self) -> str:
        return self.spec.uni_id

    @property
    def gpu_keys(self) -> tuple[str, ...]:
        """Every GPU it runs on (one for most tasks)."""
        return self.gpus or ((self.gpu,) if self.gpu is not None else ())

    @property
    def need_bytes(self) -> int:
        """VRAM on each of its GPUs the next attempt needs: declared, or more after an oom."""
        if self.vram_gb_needed is None or self.vram_gb_needed <= self.spec.vram_gb:
            return self.spec.vram_bytes
        return int(self.vram_gb_needed * GIB)


# States a queue's head moves past: done with, one way or the other.
_PASSED = (TaskState.COMPLETED, TaskState.SKIPPED)


class Queue(list):
    """A queue's tasks in order, with a cursor at its head.

    Tasks of a queue complete (or are skipped) in order and never un-complete, so the cursor
    only moves forward (but for `unskip`, which rewinds it): finding the head is amortized O(1) per round, not O(tasks in the queue).
    """

    def __init__(self, tasks=()):
        super().__init__(tasks)
        self._cursor = 0

    def head(self) -> Task | None:
        while self._cursor < len(self) and self[self._cursor].state in _PASSED:
            self._cursor += 1
        return self[self._cursor] if self._cursor < len(self) else None

    def rewind(self) -> None:
        """A task behind the cursor may run again (`unskip`): look for the head from the start."""
        self._cursor = 0

    def remaining(self) -> int:
        """Tasks from the head on (one completed out of order further back still counts);
        call after head(), which moves the cursor."""
        return len(self) - self._cursor
