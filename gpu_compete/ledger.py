"""The daemon's writes to the registry and the history, kept until a failing disk takes them.

A full disk or a lost permission must never stop a running task nor make the daemon forget
what it knows: a registry change that cannot be written is queued and applied, in order,
with the next write that works; a success line that cannot be appended is kept (and the
task's registry record with it) until it can. Each kind of failure is logged once when it
starts and once when it ends, not every round.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import structlog

from . import journal
from .registry import Registry, RegistryError

log = structlog.get_logger("gpu_compete")

Change = Callable[[dict[str, Any]], Any]


class Ledger:
    def __init__(self, registry: Registry, history: Path):
        self.registry = registry
        self.history_path = history
        self.history = journal.Tail(history)
        self.journaled: set[str] = set()  # uni_ids with a success line in the history
        self.unjournaled: dict[str, dict[str, Any]] = {}  # success lines the disk refused so far
        self._pending: list[Change] = []  # registry changes not yet written
        self._problems: dict[str, str] = {}  # what is failing now
        self.read_only = False  # a dry run decides as a real run would, and writes nothing
        self._batching = False
        self.touched: set[str] = set()  # tasks a pending change is about (as the writer says)
        self._vital = False  # a pending change must survive a power cut (Registry.update)

    def write_pending(self) -> None:
        """Write what a batch holds so far, now. Before a launch: a change meant for a task's
        last attempt (its failure) must reach the file before the new attempt's supervisor
        writes its own record, or it would be applied on top of that record."""
        if self._pending:
            self._batching, batching = False, self._batching
            try:
                self.write(lambda data: None, vital=False)
            finally:
                self._batching = batching

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Registry changes made inside are written once, at the end, in order (the launches of
        a round, say: one lock and fsync for all of them, after the forks). Changes that must
        precede a launch are written with `write_pending()` first."""
        self._batching = True
        try:
            yield
        finally:
            self._batching = False
            if self._pending:
                self.write(lambda data: None, vital=False)

    # --- the registry -------------------------------------------------------------------

    def write(self, change: Change, uni_id: str | None = None, vital: bool = True) -> bool:
        """Apply `change` to the registry (with every change still pending before it); inside
        `batch()`, at the batch's end. `vital=False`: a change that only says what runs now
        (a launch), whose loss in a power cut is harmless."""
        if self.read_only:
            return True
        self._pending.append(change)
        self._vital = self._vital or vital
        if uni_id is not None:
            self.touched.add(uni_id)
        if self._batching:
            return True

        def apply_all(data: dict[str, Any]) -> None:
            for pending in self._pending:
                pending(data)

        try:
            self.registry.update(apply_all, self._vital)
        except RegistryError as exc:
            self.report("registry", "cannot write the registry; running tasks go on", exc)
            return False
        self._pending.clear()
        self.touched.clear()
        self._vital = False
        self.report("registry")
        return True

    def flush(self) -> None:
        """Retry what a failing disk refused before (history first: a success's record may
        leave the registry only once its line is written)."""
        if self.unjournaled:
            self.write_successes()
        if self._pending:
            self.write(lambda data: None, vital=False)

    # --- the history --------------------------------------------------------------------

    def new_successes(self) -> set[str]:
        """uni_ids whose success lines appeared in the history since the last look."""
        found = {e["uni_id"] for e in self.history.new_entries()
                 if e.get("state") == "normal_exit" and isinstance(e.get("uni_id"), str)}
        self.journaled |= found
        return found

    def add_success(self, uid: str, entry: dict[str, Any]) -> None:
        """A task succeeded: its line goes to the history unless the supervisor wrote it
        already, and then its record leaves the registry."""
        if self.read_only:
            return
        if uid in self.journaled:
            self.write(lambda data: data.pop(uid, None))
            return
        self.unjournaled[uid] = entry
        self.write_successes()

    def write_successes(self) -> None:
        """Append the success lines not yet written; each task's record leaves the registry
        only once its line is in the history, so a full disk cannot make a success be
        forgotten (a restart finds the normal_exit record and writes the line then)."""
        written: list[str] = []
        try:
            for uid, entry in list(self.unjournaled.items()):
                try:
                    journal.append(self.history_path, entry)
                except OSError as exc:
                    self.report("history", "cannot append to the history", exc)
                    return
                del self.unjournaled[uid]
                self.journaled.add(uid)
                written.append(uid)
            self.report("history")
        finally:
            if written:
                self.write(lambda data: [data.pop(u, None) for u in written])

    def append(self, entry: dict[str, Any]) -> None:
        """Any other history line (a failure, a skip): logged if the disk refuses it."""
        if self.read_only:
            return
        try:
            journal.append(self.history_path, entry)
        except OSError as exc:
            log.error("cannot append to the history", error=str(exc), entry=entry.get("state"))

    # --- problems, once -----------------------------------------------------------------

    def report(self, what: str, message: str | None = None, error: object = None) -> None:
        """Log a failing write once when it starts failing (or fails differently) and once when
        it works again (a full disk at --poll 0.2 would otherwise log five a second)."""
        before = self._problems.get(what)
        if message is None:
            if before is not None:
                del self._problems[what]
                log.info(f"{what} writable again")
            return
        problem = f"{message}: {error}"
        if problem != before:
            self._problems[what] = problem
            log.error(message, error=str(error), retry="each round")
