"""`history.jsonl`: one JSON object a line, appended, never rewritten.

Each line is written with a single `write` on an `O_APPEND` descriptor and fsynced, so lines
from several supervisors never interleave and a success, once written, survives a crash.
A torn last line (power cut mid-write) is skipped when read.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator


def append(path: str | os.PathLike[str], entry: dict[str, Any]) -> None:
    line = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def entries(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every readable line; a missing file has none. Other OSErrors (a directory in its place,
    a failing disk) propagate: the caller decides whether that is fatal."""
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    yield entry
    except FileNotFoundError:
        return


def completed(path: str | os.PathLike[str] | Iterable[dict[str, Any]]) -> set[str]:
    """uni_ids that have ended with normal_exit at least once (from a file, or from entries
    already read)."""
    lines = entries(path) if isinstance(path, (str, os.PathLike)) else path
    return {e["uni_id"] for e in lines if e.get("state") == "normal_exit" and isinstance(e.get("uni_id"), str)}


def failed_for_good(path: str | os.PathLike[str] | Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{uni_id: its gave-up line} for tasks whose last word in the history is that they failed
    for good: durable where a registry record is not (a script may overwrite it). A later
    success, or a line saying the task was retried on purpose (`"state": "retried"`), ends it."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries(path) if isinstance(path, (str, os.PathLike)) else path:
        uid = e.get("uni_id")
        if not isinstance(uid, str):
            continue
        if e.get("gave_up") is True:
            out[uid] = e
        elif e.get("state") in ("normal_exit", "retried"):
            out.pop(uid, None)
    return out


class Tail:
    """Reads the lines appended since the last call (the daemon's view of new successes)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.offset = 0

    def new_entries(self, strict: bool = False) -> list[dict[str, Any]]:
        """`strict`: an unreadable file raises OSError instead of a warning (at start-up)."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        except OSError as exc:  # read again next round, from the same place
            if strict:
                raise
            warnings.warn(f"cannot read {self.path}: {exc.strerror or exc}", stacklevel=2)
            return []
        end = data.rfind(b"\n") + 1  # leave a line still being written for next time
        self.offset += end
        out = []
        for raw in data[:end].splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if isinstance(entry, dict):
                out.append(entry)
        return out
