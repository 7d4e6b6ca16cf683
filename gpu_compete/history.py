"""Writes to the history (`history.jsonl`, the record of completions) by the daemon or the
coordinator, kept until a failing disk takes them.

A success line that cannot be appended is kept, and the task's registry record with it,
until it can: a task's record leaves the registry (`forget`, the node's records) only once its
line is in the history, so a full disk cannot make a success be forgotten (a restart finds
the normal_exit record and writes the line then).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import structlog

from . import journal
from .problems import Problems

log = structlog.get_logger("gpu_compete")


class History:
    def __init__(self, path: Path, forget: Callable[[Iterable[str]], None], problems: Problems | None = None):
        """`forget`: takes tasks' records out of the registry once their success lines are written."""
        self.path = path
        self.tail = journal.Tail(path)
        self.forget = forget
        self.problems = problems or Problems()
        self.journaled: set[str] = set()  # uni_ids with a success line in the history
        self.unjournaled: dict[str, dict[str, Any]] = {}  # success lines the disk refused so far
        self.read_only = False  # a dry run writes nothing

    def new_successes(self) -> set[str]:
        """uni_ids whose success lines appeared in the history since the last look."""
        found = {e["uni_id"] for e in self.tail.new_entries()
                 if e.get("state") == "normal_exit" and isinstance(e.get("uni_id"), str)}
        self.journaled |= found
        return found

    def add_success(self, uid: str, entry: dict[str, Any]) -> None:
        """A task succeeded: its line goes to the history unless its supervisor wrote it
        already, and then its record leaves the registry."""
        if self.read_only:
            return
        if uid in self.journaled:
            self.forget([uid])
            return
        self.unjournaled[uid] = entry
        self.flush()

    def flush(self) -> None:
        """Append the success lines not yet written (each round, before the registry's own
        pending changes: a success's record may leave the registry only once its line is
        written)."""
        written: list[str] = []
        try:
            for uid, entry in list(self.unjournaled.items()):
                try:
                    journal.append(self.path, entry)
                except OSError as exc:
                    self.problems.report("history", "cannot append to the history", exc)
                    return
                del self.unjournaled[uid]
                self.journaled.add(uid)
                written.append(uid)
            if written:
                self.problems.report("history")
        finally:
            if written:
                self.forget(written)

    def append(self, entry: dict[str, Any]) -> None:
        """Any other line (a failure, a skip): logged if the disk refuses it."""
        if self.read_only:
            return
        try:
            journal.append(self.path, entry)
        except OSError as exc:
            log.error("cannot append to the history", error=str(exc), entry=entry.get("state"))
