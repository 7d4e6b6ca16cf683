"""A living queue: the daemon's side of command-file reloads and of `skip`, `unskip`,
`retry`, `kill`, `pause`, `resume` and `reload`.

Requests themselves are answered in `orders`. Everything here runs in the daemon's one thread: reloads at the start of a round, requests
from the control socket between rounds (each answered at once from the daemon's state, then a
round runs). Skips and retries are history lines, so they survive restarts; pauses last as
long as the daemon.

Reload rule: a queue's tasks in progress (running, failed and waiting to retry, failed for
good) stay at its front in their order; the rest follow in the order the file now gives. So
a task's place is its place in the file at the moment its queue next picks a head, and an
edit never starts a second task of a queue beside a running one.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import structlog

from . import journal, legacy
from .commandbook import CommandBook, Diff, diff
from .control import ControlServer
from .orders import Orders
from .tasks import Queue, Task, TaskState, group_queues

if TYPE_CHECKING:  # pragma: no cover
    from .daemon import Daemon

log = structlog.get_logger("gpu_compete")

IN_PROGRESS = (TaskState.RUNNING, TaskState.RETRY, TaskState.FAILED)


def skipped_in_history(path: Any) -> set[str]:
    """uni_ids whose last skip/unskip line in the history is a skip."""
    out: set[str] = set()
    for e in journal.entries(path):
        uid = e.get("uni_id")
        if isinstance(uid, str) and e.get("state") == "skipped":
            out.add(uid)
        elif isinstance(uid, str) and e.get("state") == "unskipped":
            out.discard(uid)
    return out


def rebuild(queues: dict[str, Queue], tasks: dict[str, Task], specs: list, history: Any, fresh: bool,
            journaled: Callable[[], set[str]], removed: set[str]) -> tuple[dict[str, Queue], dict[str, Task], Diff]:
    """The queues and tasks after a reload to `specs` (the rule is in the module's docstring),
    and the diff; said in the log when it changes anything. A task new to the run starts as the
    history says: completed (`journaled()`, the uni_ids with a success line), skipped, or failed
    for good. `removed` (running tasks no longer in the file, dropped once they end) is updated
    in place."""
    change = diff({u: t.state is TaskState.RUNNING for u, t in tasks.items()}, specs)
    new_ids = {s.uni_id for s in specs}
    done = journaled() if change.added and not fresh else set()
    gave_up = {} if fresh else journal.failed_for_good(history) if change.added else {}
    skipped = skipped_in_history(history) if change.added and not fresh else set()
    new_tasks: dict[str, Task] = {}
    new_queues: dict[str, Queue] = {}
    by_queue = group_queues(list(specs))
    for name in list(by_queue) + [q for q in queues if q not in by_queue]:
        old = queues.get(name, [])
        front = [t for t in old if t.state in IN_PROGRESS
                 and (t.uni_id in new_ids or t.state is TaskState.RUNNING)]
        rest, in_front = [], {id(t) for t in front}
        for spec in by_queue.get(name, []):
            task = tasks.get(spec.uni_id)
            if task is None:
                task = Task(spec)
                if spec.uni_id in done:
                    task.state = TaskState.COMPLETED
                elif spec.uni_id in skipped:
                    task.state = TaskState.SKIPPED
                elif spec.uni_id in gave_up:
                    task.state, task.error_type = TaskState.FAILED, gave_up[spec.uni_id].get("error_type")
            elif task.state is not TaskState.RUNNING:
                task.spec = spec
            if id(task) not in in_front:
                rest.append(task)
        if front or rest:
            new_queues[name] = Queue(front + rest)
            new_tasks.update((t.uni_id, t) for t in new_queues[name])
    removed |= set(change.removed_running)
    removed -= new_ids
    if not change.empty:
        log.info("command file reloaded", added=len(change.added), dropped=len(change.removed_pending),
                 running_out=len(change.removed_running), unchanged=len(change.unchanged))
    return new_queues, new_tasks, change


def drop_ended(removed: set[str], tasks: dict[str, Task], queues: dict[str, Queue]) -> None:
    """Tasks no longer in the command file that have ended since: out of their queues."""
    for uid in [u for u in removed if tasks.get(u) is None or tasks[u].state is not TaskState.RUNNING]:
        removed.discard(uid)
        task = tasks.pop(uid, None)
        if task is not None:
            queue = queues.get(task.spec.queue)
            if queue is not None and task in queue:
                rest = [t for t in queue if t is not task]
                if rest:
                    queues[task.spec.queue] = Queue(rest)
                else:
                    del queues[task.spec.queue]
            log.info("task no longer in the command file ended; dropped", uni_id=uid)


class Steering(Orders):
    def __init__(self, daemon: "Daemon", book: CommandBook | None = None, follow: bool = False):
        self.d = daemon
        self.book = book
        self.follow = follow
        self.reload_requested = False
        self.paused: set[str] = set()
        self.paused_all = False
        self.removed: set[str] = set()  # running tasks no longer in the file: dropped when they end
        self.killing: dict[str, dict[str, Any]] = {}  # uid -> {deadline, skip, record}
        self.last_reload: str | None = None
        self.server: ControlServer | None = None
        self.control_error: str | None = None

    # --- start-up ---------------------------------------------------------------------------

    def migrate(self) -> None:
        """Carry a history written with position-based uni_ids over to today's ids."""
        d = self.d
        aliases = legacy.migrate(list(self._specs()), d.config.history, d.records,
                                 lambda uid, rec: d._alive(uid, rec), write=not d.records.read_only)
        if aliases:
            if self.book is not None:
                self.book.aliases = aliases
            specs = [dataclasses.replace(s, uni_id=aliases[s.uni_id]) if s.uni_id in aliases else s for s in self._specs()]
            d.queues = {q: Queue(Task(s) for s in ss) for q, ss in group_queues(specs).items()}
            d.tasks = {t.uni_id: t for q in d.queues.values() for t in q}

    def _specs(self):
        return (t.spec for q in self.d.queues.values() for t in q)

    def restore(self) -> None:
        """After resume: skips recorded in the history hold again."""
        if self.d.config.fresh:
            return
        for uid in skipped_in_history(self.d.config.history):
            task = self.d.tasks.get(uid)
            if task is not None and task.state in (TaskState.PENDING, TaskState.RETRY, TaskState.FAILED):
                task.state = TaskState.SKIPPED

    def open(self, loop: Any) -> None:
        self.server = ControlServer(self.d.config.state_dir, self.handle, self.d.clock)
        self.control_error = self.server.open(loop)
        if self.control_error:
            log.error(f"no steering: {self.control_error}")
            self.server = None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    # --- each round -------------------------------------------------------------------------

    def before_round(self, now: float) -> None:
        if self.server is not None:
            self.server.expire()
        if self.book is not None:
            force, self.reload_requested = self.reload_requested, False
            specs = self.book.check(force=force)
            if specs is not None:
                self.apply(specs)

    def after_collect(self, now: float) -> None:
        """Drop removed tasks that have ended; SIGKILL killed tasks past their grace."""
        drop_ended(self.removed, self.d.tasks, self.d.queues)
        for uid, kill in list(self.killing.items()):
            task = self.d.tasks.get(uid)
            if task is None or task.state is not TaskState.RUNNING:
                self.killing.pop(uid, None)  # it ended some other way (even with success)
                continue
            if now >= kill["deadline"] and not kill.get("forced"):
                kill["forced"] = True
                self.d.node.force(uid, self.d.known.get(uid, {}))

    def allowed(self, cands: list) -> list:
        if self.paused_all:
            return []
        return [c for c in cands if c.queue not in self.paused] if self.paused else cands

    def stopped_on_purpose(self, task: Task, now: float) -> bool:
        """A task ended by `kill` is recorded as stopped (not a failure): it runs again at the
        next round, or with `--skip` not at all. False for any other ending."""
        kill = self.killing.pop(task.uni_id, None)
        if kill is None:
            return False
        uid = task.uni_id
        self.d._task_ended(task, now)
        skip = kill["skip"]
        task.error_type = "stopped"
        task.state, task.retry_at = (TaskState.SKIPPED, 0.0) if skip else (TaskState.RETRY, now)
        self.d.records.stopped({uid: {"retry_count": task.retry_count}})
        self.d.history.append({"uni_id": uid, "state": "stopped", "queue": task.spec.queue,
                              "attempt": task.retry_count + 1, "by": "kill"})
        if skip:
            self.d.history.append({"uni_id": uid, "state": "skipped", "queue": task.spec.queue})
        log.warning("task stopped by request", uni_id=uid, skip=skip)
        return True

    # --- what the requests do to this machine (`orders`) -------------------------------------

    def _record(self, entry: dict[str, Any]) -> None:
        self.d.history.append(entry)

    def _journaled(self) -> set[str]:
        return self.d.history.journaled

    def _reset_records(self, uid: str) -> None:
        """After `retry`: the registry record forgets the give-up and the count."""
        self.d.records.retried([uid])

    def _end(self, task: Task) -> str | None:
        """SIGTERM to a running task, through the daemon's agent; why not, when it cannot."""
        return self.d.node.terminate(task.uni_id, self.d.known.get(task.uni_id, {}))

    def finished_ok(self) -> bool:
        """With --follow the daemon waits for more work instead of exiting."""
        return not self.follow

    # --- reload -----------------------------------------------------------------------------

    def apply(self, specs: list) -> Diff:
        d = self.d
        d.queues, d.tasks, change = rebuild(d.queues, d.tasks, specs, d.config.history, d.config.fresh,
                                            self._journaled, self.removed)
        for uid in change.removed_pending:
            self.killing.pop(uid, None)
        if not change.empty:
            self.last_reload = change.summary()
        return change

    # --- status -----------------------------------------------------------------------------

    def view(self, view: dict[str, Any]) -> None:
        """Add what steering knows to a status view."""
        for q in view.get("queues", []):
            if (self.paused_all or q["queue"] in self.paused) and q["status"] in ("IDLE", "BUSY", "WAITING") \
                    and q["current_state"] != "running":
                q["status"] = "PAUSED"
                q["why"] = "paused: starts after `gpu-compete resume`"
        view["steering"] = {
            "paused_all": self.paused_all, "paused": sorted(self.paused), "follow": self.follow,
            "commands_file": str(self.book.path) if self.book else None,
            "commands_error": self.book.error if self.book else None,
            "last_reload": self.last_reload, "running_out": sorted(self.removed),
            "skipped": sorted(u for u, t in self.d.tasks.items() if t.state is TaskState.SKIPPED),
            "control": None if self.server else self.control_error,
        }
