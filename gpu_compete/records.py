"""A node's registry as its agent keeps it: the records of the tasks it runs, written in named
changes that survive a failing disk.

The registry (`uni_id.json`) is the blackboard this node shares with wrapped scripts. Only
the agent of the node writes our side of it; what runs where is decided elsewhere (the
daemon's round, or a coordinator), which tells the agent what to record in plain values:
an attempt started (`launched`), failed (`failed`), was stopped on purpose (`stopped`), grew
its VRAM (`peaks`), is to be run afresh (`retried`), has its success in the history
(`forget`).

A full disk or a lost permission must never stop a running task nor make the node forget
what it knows: a change that cannot be written is queued and applied, in order, with the
next write that works (`flush`, each round). Changes made inside `batch()` are written once,
at its end, with one lock and one fsync.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

from . import stopping
from .gpus.base import key_to_record
from .problems import Problems
from .registry import Registry, RegistryError

Change = Callable[[dict[str, Any]], Any]

# What a record says of one attempt, dropped when the next attempt starts.
ATTEMPT_FIELDS = ("error_type", "retry_at", "gave_up", "exit_status", "ended_at", "pgid", "exec_pid",
                  "peak_vram_gb", "peak_gpu", "gpus")


def launch_record(old: object, fields: dict[str, Any]) -> dict[str, Any]:
    """A task's registry record once its supervisor (`fields["supervisor_pid"]`) has started."""
    old = old if isinstance(old, dict) else {}
    sup = fields["supervisor_pid"]
    if old.get("exec_pid") == sup:
        # This attempt's supervisor wrote first (a fast task may even have ended): what it
        # recorded (worker pid, group, final state, error type) stays.
        return {**old, **{k: v for k, v in fields.items() if k != "state"}}
    # Fields of the previous attempt go; its process group above all, which must never be
    # taken for this attempt's.
    record = {k: v for k, v in old.items() if k not in ATTEMPT_FIELDS}
    record.update(fields, pid=sup, create_time=fields["supervisor_create_time"])
    return record


def launch_fields(keys: Sequence[str], queue: str, attempt: int, retry_count: int, supervisor_pid: int,
                  created: float | None, at: str, node: str | None = None) -> dict[str, Any]:
    """What a launch records of an attempt on these local GPU keys (its first is `gpu`, as
    wrapped scripts write it: a whole GPU as its index)."""
    fields: dict[str, Any] = {"state": "running", "retry_count": retry_count, "gpu": key_to_record(keys[0]),
                              "queue": queue, "attempt": attempt, "supervisor_pid": supervisor_pid,
                              "supervisor_create_time": created, "started_at": at, "updated_at": at}
    if node is not None:
        fields["node"] = node
    if len(keys) > 1:
        fields["gpus"] = [key_to_record(k) for k in keys]  # a gpus=N task is confirmed, and left, on all
    return fields


def same_attempt(record: object, supervisor_pid: int | None) -> bool:
    """Whether a record still speaks of the attempt this supervisor runs (None: not known,
    taken as yes). A later attempt's supervisor puts its own pid in the record (`exec_pid`,
    and `supervisor_pid` once launched): a change meant for the earlier attempt (its failure,
    its stop, its peak) must not land on it, however late a failing disk lets it be written."""
    if supervisor_pid is None or not isinstance(record, dict):
        return True
    return all(record.get(key) in (None, supervisor_pid) for key in ("supervisor_pid", "exec_pid"))


class Records:
    def __init__(self, registry: Registry, problems: Problems | None = None):
        self.registry = registry
        self.problems = problems or Problems()
        self.known: dict[str, dict[str, Any]] = {}  # last whole record we wrote or saw, per task
        self.read_only = False  # a dry run decides as a real run would, and writes nothing
        self.touched: set[str] = set()  # tasks a pending change is about (`failed`)
        self._pending: list[Change] = []  # changes not yet written
        self._vital = False  # a pending change must survive a power cut (Registry.update)
        self._batching = False
        self._lock = threading.RLock()  # a node's agent is called on two threads

    def read(self) -> dict[str, dict[str, Any]]:
        """The registry as it is on disk now (RegistryError: unreadable)."""
        return self.registry.read()

    def read_or_empty(self) -> dict[str, dict[str, Any]]:
        """The same, or no record while it cannot be read (for what can go on without it)."""
        try:
            return self.registry.read()
        except RegistryError:
            return {}

    # --- what is recorded ------------------------------------------------------------------

    def launched(self, uid: str, fields: dict[str, Any]) -> None:
        """An attempt's supervisor started (`launch_record`). Not vital: it says what runs,
        which a power cut makes untrue anyway."""
        def change(data: dict[str, Any]) -> None:
            record = launch_record(data.get(uid), fields)
            data[uid] = record
            self.known[uid] = dict(record)

        self._write(change, vital=False)

    def failed(self, uid: str, fields: dict[str, Any]) -> None:
        """An attempt (the one whose record we know, `known`) failed: these fields (error
        type, count, give-up or retry time) go on its record, which must reach the file before
        the task's next attempt writes its own (`write_pending`); never on a later attempt's."""
        supervisor_pid = self._supervisor(uid)

        def change(data: dict[str, Any]) -> None:
            if not same_attempt(data.get(uid), supervisor_pid):
                return
            record = data.get(uid) if isinstance(data.get(uid), dict) else {}
            record.update(fields)
            data[uid] = record

        self._write(change, uid)

    def stopped(self, fields: dict[str, dict[str, Any]], *, existing: bool = False,
                supervisors: dict[str, int | None] | None = None) -> None:
        """These tasks were ended on purpose ({uid: fields to add}): their records say
        `stopped`, so a restart runs them again without counting a failure; unless one
        finished meanwhile (its success stays). `existing`: only records still there;
        `supervisors`: the stopped attempts' ({uid: supervisor pid}; else those of the records
        we know), as for `failed`."""
        sups = {uid: self._supervisor(uid, supervisors) for uid in fields}

        def change(data: dict[str, Any]) -> None:
            for uid, extra in fields.items():
                if (not existing or isinstance(data.get(uid), dict)) and same_attempt(data.get(uid), sups[uid]):
                    stopping.mark_stopped(data, uid, **extra)

        self._write(change, fields)

    def peaks(self, grown: dict[str, dict[str, Any]], *, defer: bool = False,
              supervisors: dict[str, int | None] | None = None) -> None:
        """Running tasks' VRAM peaks grew ({uid: fields}; `supervisors` as for `stopped`).
        Not vital (what a task held, lost in a power cut at worst). `defer`: written with the
        next write or `flush`, not now (a node's agent answering the coordinator)."""
        sups = {uid: self._supervisor(uid, supervisors) for uid in grown}

        def change(data: dict[str, Any]) -> None:
            for uid, extra in grown.items():
                if isinstance(data.get(uid), dict) and same_attempt(data[uid], sups[uid]):
                    data[uid].update(extra)

        self._write(change, vital=False, defer=defer)

    def retried(self, uids: Iterable[str]) -> None:
        """`gpu-compete retry`: the records forget the give-up, the retry time and the count,
        and an ended one its attempt, so a restart does not take again an outcome the retry
        has set aside."""
        chosen = list(uids)

        def change(data: dict[str, Any]) -> None:
            for uid in chosen:
                record = data.get(uid)
                if isinstance(record, dict):
                    for key in ("gave_up", "retry_at"):
                        record.pop(key, None)
                    record["retry_count"] = 0
                    if record.get("state") in ("normal_exit", "abnormal_exit"):
                        record["attempt"] = 0

        self._write(change)

    def renamed(self, names: dict[str, str]) -> None:
        """Records carried over to new uni_ids ({old: new}; `legacy.py`), unless one is taken."""
        def change(data: dict[str, Any]) -> None:
            for old, new in names.items():
                if old in data and new not in data:
                    data[new] = data.pop(old)

        self._write(change)

    def forget(self, uids: Iterable[str], *, unless_running: bool = False, defer: bool = False) -> None:
        """These records leave the registry (their successes are in the history).
        `unless_running`: one that says it runs stays (it cannot be that success's record)."""
        chosen = list(uids)

        def change(data: dict[str, Any]) -> None:
            for uid in chosen:
                record = data.get(uid)
                if not (unless_running and isinstance(record, dict) and record.get("state") == "running"):
                    data.pop(uid, None)

        if chosen:
            self._write(change, defer=defer)

    def put_back(self, missing: dict[str, dict[str, Any]]) -> None:
        """Records someone wiped while their tasks run: ours go back, unless one is there again."""
        self._write(lambda data: [data.setdefault(uid, record) for uid, record in missing.items()])

    def _supervisor(self, uid: str, given: dict[str, int | None] | None = None) -> int | None:
        """The supervisor of the attempt a change is about: as given, else the one of the
        record we last wrote or saw (`known`; None: unknown, and the change applies)."""
        return given.get(uid) if given is not None else self.known.get(uid, {}).get("supervisor_pid")

    # --- when it is written ----------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Changes made inside are written once, at the end, in order (the launches of a
        round, say: one lock and fsync for all of them, after the forks). Changes that must
        precede a launch are written with `write_pending()` first."""
        self._batching = True
        try:
            yield
        finally:
            self._batching = False
            self.flush()

    def write_pending(self) -> None:
        """Write what a batch holds so far, now. Before a launch: a change meant for a task's
        last attempt (its failure) must reach the file before the new attempt's supervisor
        writes its own record, or it would be applied on top of that record."""
        self._batching, batching = False, self._batching
        try:
            self.flush()
        finally:
            self._batching = batching

    def flush(self) -> bool:
        """Write what is pending: what a failing disk refused before (each round), a batch's
        changes, deferred ones."""
        with self._lock:
            return self._apply() if self._pending and not self._batching else True

    def _write(self, change: Change, about: str | Iterable[str] | None = None, vital: bool = True,
               defer: bool = False) -> bool:
        """Apply `change` to the registry, with every change still pending before it;
        inside `batch()` at the batch's end, and with `defer` at the next write or flush.
        `about`: the task(s) it is about, for `touched`."""
        if self.read_only:
            return True
        with self._lock:
            self._pending.append(change)
            self._vital = self._vital or vital
            if about is not None:
                self.touched.update([about] if isinstance(about, str) else about)
            if self._batching or defer:
                return True
            return self._apply()

    def _apply(self) -> bool:
        """Every pending change, in order, in one locked update (with the lock held)."""
        def apply_all(data: dict[str, Any]) -> None:
            for pending in self._pending:
                pending(data)

        try:
            self.registry.update(apply_all, self._vital)
        except RegistryError as exc:
            self.problems.report("registry", "cannot write the registry; running tasks go on", exc)
            return False
        self._pending.clear()
        self.touched.clear()
        self._vital = False
        self.problems.report("registry")
        return True
