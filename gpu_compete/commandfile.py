"""Command file text -> TaskSpec list.

Format: `#` comment lines; blank lines separate task blocks; a block is one or more command
lines and then one `QUEUE_ID,VRAM_GB[,key=value...]` line (options: see `options`). A line
ending in a backslash continues on the next one. Every error names the file and the line, and
nothing is half-parsed: either the whole file is good or `CommandFileError` is raised.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from . import options
from .tasks import GIB, TaskSpec, is_safe_id, shell_style_placeholders, suspicious_placeholders

# A line shaped like a queue line: QUEUE,VRAM with no spaces inside either, then options.
_QUEUE_SHAPE = re.compile(r"^\s*(?P<queue>[^,\s]+)\s*,\s*(?P<vram>[^,\s]+)\s*(?:,(?P<opts>.*))?$")


class CommandFileError(Exception):
    """Bad command file; `str()` is `FILE:LINE: message`."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Warning_:
    line: int
    message: str


@dataclass(frozen=True)
class ParsedFile:
    path: str
    tasks: list[TaskSpec]
    warnings: list[Warning_]


def load(path: str | Path) -> ParsedFile:
    """Read and parse a command file; raises CommandFileError for anything wrong with it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CommandFileError(path, None, "no such file") from None
    except IsADirectoryError:
        raise CommandFileError(path, None, "is a directory, not a command file") from None
    except OSError as exc:
        raise CommandFileError(path, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CommandFileError(path, line, f"not UTF-8 text (byte 0x{data[exc.start]:02x})") from None
    return parse(text, str(path))


def parse(text: str, path: str = "<commands>") -> ParsedFile:
    if text.startswith("\ufeff"):
        text = text[1:]
    blocks = _blocks(_logical_lines(text, path))
    tasks: list[TaskSpec] = []
    warnings: list[Warning_] = []
    positions: dict[str, int] = {}
    seen: dict[tuple[str, tuple[str, ...]], int] = {}  # identical blocks of a queue: occurrence numbers
    for block in blocks:
        queue, vram, commands, opts = _parse_block(block, path)
        positions[queue] = positions.get(queue, 0) + 1
        cmds = tuple(c for _, c in commands)
        seen[queue, cmds] = seen.get((queue, cmds), 0) + 1
        tasks.append(TaskSpec(queue=queue, position=positions[queue], commands=cmds,
                              vram_gb=vram, line=commands[0][0], occurrence=seen[queue, cmds],
                              queue_line=block[-1][0], **opts))
        for line_no, command in commands:
            for found, meant in suspicious_placeholders(command):
                warnings.append(Warning_(line_no, f"{{{found}}} is not a placeholder; did you mean {{{meant}}}?"))
            for name in shell_style_placeholders(command):
                warnings.append(Warning_(line_no, f"${{{name}}} is a shell variable and is left to the shell; "
                                                  f"write {{{name}}} for gpu-compete's placeholder"))
    if not tasks:
        raise CommandFileError(path, None, "no tasks: expected blocks of commands each ending in a QUEUE_ID,VRAM_GB line")
    _check_after(tasks, path)
    return ParsedFile(path=path, tasks=tasks, warnings=warnings)


def _check_after(tasks: list[TaskSpec], path: str) -> None:
    """Unknown queues and cycles in `after=`, found before anything runs."""
    waits: dict[str, set[str]] = {}
    for t in tasks:
        if t.after:
            waits.setdefault(t.queue, set()).update(t.after)
    if not waits:
        return
    problem = options.after_problems(waits, {t.queue for t in tasks})
    if problem:
        queue, dep, message = problem
        line = next(t.queue_line for t in tasks if t.queue == queue and dep in t.after)
        raise CommandFileError(path, line, message)


def _logical_lines(text: str, path: str) -> list[tuple[int, str | None]]:
    """(line number, text) with continuations joined; None marks a blank line."""
    out: list[tuple[int, str | None]] = []
    pending: list[str] = []
    start = 0
    # Lines end at "\n" (or "\r\n") only, as editors and `grep -n` count them; str.splitlines()
    # would also split at form feeds, U+2028, NEL... and name the wrong line in messages.
    physical = text.split("\n")
    if physical and physical[-1] == "":
        physical.pop()
    for number, raw in enumerate(physical, start=1):
        if raw.endswith("\r"):
            raw = raw[:-1]
        if "\x00" in raw:
            raise CommandFileError(path, number, "contains a NUL byte")
        if not pending:
            start = number
            stripped = raw.strip()
            if not stripped:
                out.append((number, None))
                continue
            if stripped.startswith("#"):
                continue
        # As in the shell: an odd number of trailing backslashes continues the line (an even
        # number is escaped backslashes). Spaces after the backslash are forgiven rather than
        # leaving a dangling backslash that would join the next line of the task's script.
        body = raw.rstrip()
        if (len(body) - len(body.rstrip("\\"))) % 2:
            pending.append(body[:-1])
            continue
        pending.append(raw)
        out.append((start, _strip_command("".join(pending))))
        pending = []
    if pending:
        raise CommandFileError(path, start, "the file ends inside a continued line (a line ending in '\\')")
    return out


def _strip_command(text: str) -> str:
    stripped = text.strip()
    if (len(stripped) - len(stripped.rstrip("\\"))) % 2:
        # It ended in an escaped space (`a\ ` before a blank continued line): keep that space,
        # or the backslash would dangle and join the next line of the task's script.
        stripped = text.lstrip()[: len(stripped) + 1]
    return stripped


def _blocks(lines: list[tuple[int, str | None]]) -> list[list[tuple[int, str]]]:
    blocks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    for number, content in lines:
        if content is None:
            if current:
                blocks.append(current)
                current = []
        else:
            current.append((number, content))
    if current:
        blocks.append(current)
    return blocks


def _queue_line(content: str) -> tuple[str, str, list[str]] | None:
    match = _QUEUE_SHAPE.match(content)
    if not match:
        return None
    return match["queue"], match["vram"], ([] if match["opts"] is None else match["opts"].split(","))


def _vram(text: str) -> float | None:
    # float() also takes "1_0" and non-ASCII digits ("\u0663"); a VRAM is plain ASCII.
    if not text.isascii() or "_" in text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value + 0.0  # -0.0 -> 0.0


def _parse_block(block: list[tuple[int, str]], path: str) -> tuple[str, float, list[tuple[int, str]], dict]:
    *commands, (last_no, last) = block
    # A queue line in the middle means the blank line between two blocks is missing.
    for i, (number, content) in enumerate(commands):
        shape = _queue_line(content)
        if (shape and _vram(shape[1]) is not None and is_safe_id(shape[0])
                and (not shape[2] or options.looks_like_options(shape[2]))):
            if i == 0:
                raise CommandFileError(path, number, f"queue line {content!r} has no commands before it")
            nxt = block[i + 1][0]
            raise CommandFileError(path, nxt, f"command after the queue line at line {number}; "
                                              "separate task blocks with a blank line")
    shape = _queue_line(last)
    if shape is None:
        if not commands and "," not in last:
            raise CommandFileError(path, last_no, f"task block has no queue line: {last!r} must be followed by "
                                                  "a QUEUE_ID,VRAM_GB line (e.g. 1,20)")
        raise CommandFileError(path, last_no, f"task block must end with a QUEUE_ID,VRAM_GB line (e.g. 1,20), "
                                              f"got {last!r}")
    queue, vram_text, items = shape
    if not commands:
        raise CommandFileError(path, last_no, f"queue line {last!r} has no commands before it")
    if not is_safe_id(queue):
        raise CommandFileError(path, last_no, f"bad queue id {queue!r}: use an integer or a name of letters, "
                                              "digits, '_', '.' and '-'")
    vram = _vram(vram_text)
    if vram is None:
        raise CommandFileError(path, last_no, f"bad VRAM {vram_text!r}: expected a number of GB, e.g. 20 or 7.5")
    if not math.isfinite(vram):
        raise CommandFileError(path, last_no, f"bad VRAM {vram_text!r}: must be a finite number of GB")
    if vram < 0:
        raise CommandFileError(path, last_no, f"bad VRAM {vram_text!r}: must not be negative")
    if not math.isfinite(vram * GIB):
        raise CommandFileError(path, last_no, f"bad VRAM {vram_text!r}: too large")
    if any(not item.strip() for item in items):
        raise CommandFileError(path, last_no, "empty option: write QUEUE_ID,VRAM_GB,key=value,... with no empty "
                                              "item between commas")
    try:
        opts = options.parse(items)
    except ValueError as exc:
        raise CommandFileError(path, last_no, str(exc)) from None
    return queue, vram, commands, opts
