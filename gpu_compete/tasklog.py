"""A task's log, `STATE_DIR/logs/<uni_id>.log`: every attempt appended, each opened by a
`==== TIME start UNI_ID ...` header and closed by a `==== TIME end UNI_ID: ...` line (both
written by the supervisor). Split it into attempts, and follow it like `tail -f`.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

# `==== TIME start UNI_ID (supervisor PID): attempt N on GPU G: ...` from the daemon;
# `==== TIME start UNI_ID (supervisor PID): CMD` from `gpu-compete exec --log`.
_START = re.compile(rb"^==== \S+ start (\S+) \(supervisor \d+\)(?:: attempt (\d+) on GPU)?", re.M)


@dataclass(frozen=True)
class Section:
    number: int  # the attempt number the header names, else its position (1-based)
    start: int  # byte offsets in the file
    end: int
    ended: bool  # its `==== ... end` line is there


def sections(data: bytes, uni_id: str) -> list[Section]:
    """The attempts in a log's bytes. Output before the first header (none is written by
    gpu-compete) belongs to no attempt."""
    heads = [m for m in _START.finditer(data) if m.group(1).decode(errors="replace") == uni_id]
    out = []
    for i, m in enumerate(heads):
        stop = heads[i + 1].start() if i + 1 < len(heads) else len(data)
        number = int(m.group(2)) if m.group(2) else i + 1
        out.append(Section(number, m.start(), stop, ended_in(data[m.start():stop], uni_id)))
    return out


def ended_in(chunk: bytes, uni_id: str) -> bool:
    return re.search(rb"^==== \S+ end " + re.escape(uni_id.encode()) + rb":", chunk, re.M) is not None


def select(data: bytes, uni_id: str, attempt: int | None) -> bytes | None:
    """The whole log, or one attempt's part (None when the log has no such attempt yet)."""
    if attempt is None:
        return data
    found = [s for s in sections(data, uni_id) if s.number == attempt]
    return data[found[-1].start:found[-1].end] if found else None


def follow(path: Path, uni_id: str, attempt: int | None, done: Callable[[], bool],
           interval: float = 0.25, sleep: Callable[[float], None] = time.sleep) -> Iterator[bytes]:
    """Yield the log's bytes as they are appended, until the task has ended: with `attempt`,
    when that attempt's end line is written; else when `done()` says the task is over (it
    completed, gave up, or nothing runs it and no daemon will), and the file has stopped
    growing. A log that does not exist yet is waited for."""
    offset, data, emitted = 0, b"", 0
    while True:
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                new = fh.read()
        except FileNotFoundError:
            new = b""
        offset += len(new)
        data += new
        parts = sections(data, uni_id)
        if attempt is None:
            if new:
                yield new
            if done():
                # Once more: the end line may have come between our read and done().
                try:
                    if os.path.getsize(path) == offset:
                        return
                except FileNotFoundError:
                    return
                continue
        else:
            mine = [p for p in parts if p.number == attempt]
            if mine:
                s = mine[-1]
                if s.end - s.start > emitted:
                    yield data[s.start + emitted:s.end]
                    emitted = s.end - s.start
                if s.ended or (done() and not new):
                    return
            elif any(p.number > attempt for p in parts) or done():
                return  # that attempt never ran and will not
        sleep(interval)
