"""How an attempt on a node ended, in the coordinator: completed (its line in the history),
stopped on purpose, or failed (the retry policy decides, and the oom lesson is learned).

A mixin of `Coordinator` (its state lives there); split out so each piece stays small.
"""

from __future__ import annotations

from typing import Any, Iterable

import structlog

from . import vram
from .outcomes import fail_attempt, say_failed
from .tasks import Task, TaskState
from .timefmt import iso

log = structlog.get_logger("gpu_compete")
#: How long the end of a run waits for a node to take its completed tasks' records out.
FORGET_TIMEOUT_S = 5.0


class ClusterOutcomes:
    def _ended(self, task: Task, node: str, how: dict[str, Any], now: float) -> None:
        if task.peak_vram_bytes is None:  # (one adopted after a restart: its node's record has it)
            vram.restore(task, {"peak_vram_gb": how.get("peak_vram_gb")}, False)
        by_stop = how.get("error_type") == "stopped" and task.uni_id not in self.steer.killing  # (a kill: _failed)
        if how["outcome"] == "abnormal_exit" and by_stop:
            # Ended on purpose (`stop --kill`, or a `kill` asked of an earlier coordinator): its
            # node's record says so. It runs again, not counted as a failure.
            self.stopped(task, node, now, by="kill or stop --kill")
        elif how["outcome"] == "normal_exit":
            self._release(task)
            task.state, task.error_type = TaskState.COMPLETED, None
            self.completed_on[task.uni_id] = node
            self.history.add_success(task.uni_id, {
                "uni_id": task.uni_id, "state": "normal_exit", "queue": task.spec.queue, "node": node,
                "gpu": task.gpu, "attempt": task.retry_count + 1, "exit_status": how.get("exit_status"),
                "start": how.get("started_at"), "end": how.get("ended_at") or iso(self.wall()),
                **vram.usage_fields(task), "by": "coordinator"})
            log.info("task completed", uni_id=task.uni_id, queue=task.spec.queue, gpu=task.gpu)
        else:
            self._failed(task, node, how.get("error_type") or "unknown", now, note=how.get("why"),
                         how=how)

    def stopped(self, task: Task, node: str, now: float, *, by: str, skip: bool = False) -> None:
        """Ended on purpose (`kill`, `stop --kill`): not a failure; it runs again at the next
        round, or is skipped."""
        self._release(task)
        task.state, task.retry_at = (TaskState.SKIPPED, 0.0) if skip else (TaskState.RETRY, now)
        task.error_type = "stopped"
        self._append({"uni_id": task.uni_id, "state": "stopped", "queue": task.spec.queue, "node": node,
                      "gpu": task.gpu, "attempt": task.retry_count + 1, "by": by})
        if skip:
            self._append({"uni_id": task.uni_id, "state": "skipped", "queue": task.spec.queue})
        log.warning(f"task stopped by {by}; " + ("skipped" if skip else "it runs again, not counted as a failure"),
                    uni_id=task.uni_id, node=node)

    def _failed(self, task: Task, node: str, error_type: str, now: float, note: str | None = None,
                how: dict[str, Any] | None = None) -> None:
        if self.steer.stopped_on_purpose(task, now):
            return  # ended by `gpu-compete kill`, however it ended
        self._release(task)
        decision, permanent, needed = fail_attempt(task, error_type, now, self.config, self.snapshots)
        entry = {"uni_id": task.uni_id, "state": "abnormal_exit", "error_type": error_type, "queue": task.spec.queue,
                 "node": node, "gpu": task.gpu, "attempt": decision.retry_count,
                 "exit_status": (how or {}).get("exit_status"), "start": (how or {}).get("started_at"),
                 "end": (how or {}).get("ended_at") or iso(self.wall()), **vram.usage_fields(task)}
        if needed is not None:  # the next attempt asks for what this one was seen to use, and more
            entry["vram_gb_needed"] = needed
        if decision.action == "give_up":
            entry["gave_up"] = True
        say_failed(task.uni_id, error_type, decision, permanent, now, note, node=node)
        self._append(entry)

    def _release(self, task: Task) -> None:
        self.where.pop(task.uni_id, None)
        self.gone.discard(task.uni_id)

    def _forget_completed(self, uids: Iterable[str]) -> None:
        """Successes now in the history: their records leave their nodes' registries (told
        with each node's next observe call; a node away, or whose call fails, keeps them: a
        completed record harms nothing there), and `status` stops listing them, as on one
        machine."""
        for uid in uids:
            self.records.pop(uid, None)
            node = self.completed_on.pop(uid, None)
            if node is not None:
                self.forgettable.setdefault(node, []).append(uid)

    def _forget_now(self) -> None:
        """At the end of a run: the successes not yet told to their nodes (no observe call
        follows to carry them)."""
        for node, uids in list(self.forgettable.items()):
            if node in self.unreachable:
                continue  # it keeps them (as when an observe call carrying them fails)
            try:
                self.agents.call(node, "forget_records", uids, timeout=FORGET_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - a node away keeps the records; status on it lists them
                pass
        self.forgettable.clear()

    def _append(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
