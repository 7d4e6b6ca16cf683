"""Steering for a `--ray` run: `skip`, `unskip`, `retry`, `kill`, `pause`, `resume` and
`reload` reach the coordinator through the same control socket, and mean the same as on one
machine (`orders`); the history lines are the same, in the coordinator's history.

What differs is what touches a machine: a killed task is ended by its node's agent (in the
background, so the node's launches and answers go on meanwhile; its record says `stopped`,
so a restarted coordinator does not count a failure either), and a retried task's records on
the nodes forget their attempt, so a restarted coordinator does not take an outcome that the
retry set aside.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from . import journal
from .steering import Steering, drop_ended
from .tasks import Task, TaskState

if TYPE_CHECKING:  # pragma: no cover
    from .coordinator import Coordinator

log = structlog.get_logger("gpu_compete")


class ClusterSteering(Steering):
    d: "Coordinator"

    def _record(self, entry: dict[str, Any]) -> None:
        self.d._append(entry)

    def _journaled(self) -> set[str]:
        return journal.completed(self.d.config.history)

    def _reset_records(self, uid: str) -> None:
        for node in self.d.agents.nodes:  # not waited for; a node away now keeps its old record
            try:
                self.d.agents.submit(node, "retried", [uid])
            except Exception as exc:  # noqa: BLE001 - a node in trouble is found by its observe
                log.warning("cannot tell a node of a retry", node=node, uni_id=uid, error=str(exc))

    def _end(self, task: Task) -> str | None:
        node = self.d.where.get(task.uni_id)
        if node is None or node not in self.d.agents.nodes or node in self.d.unreachable:
            return f"{task.uni_id}: its node {node or '?'} is not answering; nothing sent"
        try:
            self.d.agents.submit(node, "end", [task.uni_id])
        except Exception as exc:  # noqa: BLE001 - refused or gone
            return f"{task.uni_id}: cannot reach its node {node}: {exc}"
        return None

    def after_collect(self, now: float) -> None:
        """Drop removed tasks that have ended; forget kills whose task ended some other way.
        (The node's agent sends SIGKILL after the grace period itself.)"""
        drop_ended(self.removed, self.d.tasks, self.d.queues)
        for uid in list(self.killing):
            task = self.d.tasks.get(uid)
            if task is None or task.state is not TaskState.RUNNING:
                self.killing.pop(uid, None)

    def stopped_on_purpose(self, task: Task, now: float) -> bool:
        """A task ended by `kill` is recorded as stopped, not as a failure: it runs again at the
        next round, or with `--skip` not at all."""
        kill = self.killing.pop(task.uni_id, None)
        if kill is None:
            return False
        self.d.stopped(task, self.d.where.get(task.uni_id, "?"), now, by="kill", skip=kill["skip"])
        return True
