"""Resuming after a crash or a restart: what an earlier daemon left, adopted or accounted for.

A mixin of `Daemon` (its state lives there); split out so each piece stays small.
"""

from __future__ import annotations

from typing import Any

import structlog

from . import evidence, journal, launcher, vram
from .gpus.base import key_from_record
from .registry import RegistryError
from .tasks import Task, TaskState
from .timefmt import parse_iso as _parse_iso

log = structlog.get_logger("gpu_compete")


class DaemonError(Exception):
    """Cannot start: another daemon holds the state directory, or it is unusable."""


class Reconciling:
    def resume(self) -> None:
        """Reconcile with what an earlier daemon left: completed tasks from the history,
        live processes adopted, failures and backoffs carried on."""
        now, wall = self.clock(), self.wall()
        try:
            self.steer.migrate()
            # One read, and the tail goes on from where it ended: a success appended while we
            # start is then either in this read or in the first round's, never in neither.
            past = self.history.tail.new_entries(strict=True)
        except OSError as exc:
            raise DaemonError(f"cannot read {self.config.history}: {exc.strerror or exc}") from None
        self.history.journaled = journal.completed(past)
        gave_up = {} if self.config.fresh else journal.failed_for_good(past)
        done = set() if self.config.fresh else set(self.history.journaled)
        try:
            records = self.records.read()
        except RegistryError as exc:
            log.error("registry unreadable; starting without it", error=str(exc))
            records = {}
        # Processes of our tasks still alive, found by their environment: the registry may have
        # been damaged while no daemon watched, and a live task must never be started twice.
        live = evidence.live_task_processes(self.tasks, self.namespace)
        stale = []
        for uid, task in self.tasks.items():
            record = records.get(uid)
            if uid in done:
                task.state = TaskState.COMPLETED
                if record is not None and record.get("state") != "running":
                    stale.append(uid)
                continue
            if uid in live and (record is None or not evidence.record_alive(record, uid, self.namespace)):
                # A live process of the task: whatever the registry says now (nothing, a stale
                # or clobbered record), it is adopted, never killed or started again.
                self._adopt(task, {**(record or {}), **live[uid]}, now)
                continue
            if (record is None or record.get("state") == "running") and self._supervised(uid):
                # Its supervisor still runs (its task may have ended, its outcome not yet written).
                self._adopt(task, record or {}, now)
                continue
            if uid in gave_up and not (record and record.get("state") == "running"):
                task.state, task.error_type = TaskState.FAILED, gave_up[uid].get("error_type")
                task.retry_count = max(record["retry_count"] if record else 0, gave_up[uid].get("attempt") or 0)
                continue
            if record is None:
                continue
            self.known[uid] = record
            task.retry_count = 0 if self.config.fresh else record["retry_count"]
            task.gpu = key_from_record(record.get("gpu"))
            vram.restore(task, record, self.config.fresh)
            state = record.get("state")
            if state == "running":
                if evidence.record_alive(record, uid, self.namespace):
                    self._adopt(task, record, now)
                else:
                    self._settle(task, evidence.unseen_outcome(task.uni_id, record,
                                                               launcher.log_path(self.config.state_dir, task.uni_id)),
                                 record, now)
            elif state == "normal_exit":
                if not self.config.fresh:
                    self._completed(task, record, now)
            elif self.config.fresh:
                continue
            elif record.get("gave_up") is True:
                task.state, task.error_type = TaskState.FAILED, record.get("error_type")
            elif "retry_at" in record:
                task.state, task.error_type = TaskState.RETRY, record.get("error_type")
                at = _parse_iso(record["retry_at"])
                task.retry_at = now + max(0.0, (at if at is not None else wall) - wall)
            else:
                self._failed(task, self._why(task, record), now)
        if stale:
            self.records.forget(stale)
        self.steer.restore()

    def _adopt(self, task: Task, record: dict[str, Any], now: float) -> None:
        """Wait on a task an earlier daemon started, rather than start it again."""
        task.state, task.adopted, task.launched_at = TaskState.RUNNING, True, now
        gpu = key_from_record(record.get("gpu"))
        if gpu is not None:
            task.gpu = gpu
        vram.restore(task, record, False)
        self.known.setdefault(task.uni_id, {}).update({k: v for k, v in record.items() if k != "gpu"})
        log.info("adopted running task", uni_id=task.uni_id, pid=record.get("pid"), gpu=task.gpu)

    def _alive(self, uid: str, record: dict[str, Any] | None) -> bool:
        return self.node.alive(uid, record, self.known.get(uid))

    def _supervised(self, uid: str) -> bool:
        return evidence.supervisor_running(launcher.log_path(self.config.state_dir, uid))
