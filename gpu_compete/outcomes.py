"""How a task's end is recorded: completed, failed (retry, backoff, give up), lost.

A mixin of `Daemon` (its state lives there); split out so each piece stays small.
"""

from __future__ import annotations

from typing import Any

import structlog

from . import evidence, launcher, vram
from .classify import is_permanent
from .gpus.base import key_to_record
from .tasks import Task, TaskState
from .timefmt import iso as _iso

log = structlog.get_logger("gpu_compete")
# How long the pids of an ended task are not counted on its GPU: NVML can list a process for
# a moment after it exits, and the GPU must not sit idle for a poll because of it.
GHOST_S = 10.0


def fail_attempt(task: Task, error_type: str, now: float, config: Any,
                 snapshots: list[Any]) -> tuple[Any, bool, float | None]:
    """An attempt failed: the retry policy decides (failed for good, or run again when), the
    task's count, error type and state follow, and an oom raises what the next attempt needs.
    The same on one machine and across nodes. Returns (the decision, whether the failure would
    only repeat, the new need in GB after an oom)."""
    permanent = is_permanent(error_type) and not config.retry_permanent
    decision = config.retry.after_failure(task.retry_count, now, max_retries=task.spec.retries, permanent=permanent)
    task.retry_count, task.error_type = decision.retry_count, error_type
    needed = vram.learn_from_oom(task, config.oom_growth, snapshots) if error_type == "oom" else None
    if decision.action == "give_up":
        task.state = TaskState.FAILED
    else:
        task.state, task.retry_at = TaskState.RETRY, decision.at
    return decision, permanent, needed


def say_failed(uid: str, error_type: str, decision: Any, permanent: bool, now: float, note: str | None,
               **context: Any) -> None:
    """The log line of a failed attempt, as the retry policy decided (`decision`): failed for
    good (at once, for a failure that would only repeat), or run again after `retry_in_s`.
    `context`: more fields (the node, with --ray)."""
    said = {**context, **({"note": note} if note else {})}
    if decision.action == "give_up" and permanent:
        log.error(f"task failed for good at once: {error_type} would only repeat (--retry-permanent "
                  "retries it); its queue is blocked", uni_id=uid, error_type=error_type, **said)
    elif decision.action == "give_up":
        log.error("task failed for good; its queue is blocked", uni_id=uid, error_type=error_type,
                  attempts=decision.retry_count, retries=decision.retry_count - 1, **said)
    else:
        log.warning("task failed; will retry" if decision.action == "retry" else "task failed; backing off",
                    uni_id=uid, error_type=error_type, failures=decision.retry_count,
                    retry_in_s=round(decision.at - now, 1), **said)


class Outcomes:
    def _why(self, task: Task, record: dict[str, Any] | None, returncode: int | None = None,
             supervisor_pid: int | None = None) -> str:
        tail = evidence.log_tail(launcher.log_path(self.config.state_dir, task.uni_id))
        return evidence.error_type(record, tail, task.uni_id, returncode, supervisor_pid)

    def _settle(self, task: Task, ended: evidence.Outcome, record: dict[str, Any], now: float,
                exit_status: int = 0) -> None:
        """Record an attempt's end as the evidence says (`evidence.outcome`)."""
        if ended.state == "normal_exit":
            self._completed(task, record, now, exit_status=exit_status)
        elif ended.state == "lost":
            self._lost(task, ended.why or "lost", now)
        else:
            self._failed(task, ended.error_type or "unknown", now)

    def _sync_history(self) -> set[str]:
        """uni_ids whose success lines appeared in the history since the last look. A task we
        did not think was running (an orphan of an earlier daemon finished) is completed too:
        a success in the history is never run again."""
        successes = self.history.new_successes()
        for uid in successes:
            task = self.tasks.get(uid)
            if task is not None and task.state in (TaskState.PENDING, TaskState.RETRY):
                log.warning("a success was recorded for a task not known to run; counting it", uni_id=uid)
                task.state = TaskState.COMPLETED
                self.records.forget([uid])
        return successes

    def _task_ended(self, task: Task, now: float) -> None:
        """Its processes may linger in NVML's list for a moment: not counted from now on (those
        seen on its GPU, and its supervisor and worker, for a task that ended before a round
        could see it there)."""
        for pid in self.gpu_pids.pop(task.uni_id, set()) | self._roots(task):
            self.ghosts[pid] = now + GHOST_S
        self._left(task, now)
        self._drop_child(task.uni_id)

    def _completed(self, task: Task, record: dict[str, Any], now: float, exit_status: int = 0) -> None:
        uid = task.uni_id
        task.state, task.error_type = TaskState.COMPLETED, None
        self._task_ended(task, now)
        self._sync_history()  # the supervisor may have written its line since this round began
        self.history.add_success(uid, {
            "uni_id": uid, "state": "normal_exit", "queue": task.spec.queue, "gpu": key_to_record(task.gpu),
            "attempt": task.retry_count + 1, "exit_status": exit_status,
            "start": record.get("started_at"), "end": _iso(self.wall()), "by": "daemon", **vram.usage_fields(task)})
        self.known.pop(uid, None)
        log.info("task completed", uni_id=uid, queue=task.spec.queue, gpu=task.gpu)

    def _lost(self, task: Task, why: str, now: float) -> None:
        if not self.records.read_only:  # a dry run touches no process
            self.node.end_leftovers(task.uni_id, self.known.get(task.uni_id, {}))
        self._failed(task, "lost", now, note=why)

    def _failed(self, task: Task, error_type: str, now: float, note: str | None = None) -> None:
        if self.steer.stopped_on_purpose(task, now):
            return
        self._task_ended(task, now)
        decision, permanent, needed = fail_attempt(task, error_type, now, self.config, self.snapshots)
        usage = vram.usage_fields(task)
        fields: dict[str, Any] = {"state": "abnormal_exit", "error_type": error_type,
                                  "retry_count": decision.retry_count, **usage}
        if needed is not None:
            fields["vram_gb_needed"] = needed
        if decision.action == "give_up":
            fields["gave_up"] = True
        else:
            fields["retry_at"] = _iso(self.wall() + (decision.at - now))
        say_failed(task.uni_id, error_type, decision, permanent, now, note)
        uid = task.uni_id
        self.records.failed(uid, {**fields, "updated_at": _iso(self.wall())})  # that attempt's record only
        known = self.known.get(uid, {})
        entry = {"uni_id": uid, "state": "abnormal_exit", "error_type": error_type, "queue": task.spec.queue,
                 "gpu": key_to_record(task.gpu), "attempt": decision.retry_count, "start": known.get("started_at"),
                 "exit_status": known.get("exit_status"), "end": known.get("ended_at") or _iso(self.wall()), **usage}
        if "vram_gb_needed" in fields:
            entry["vram_gb_needed"] = fields["vram_gb_needed"]
        if fields.get("gave_up"):
            entry["gave_up"] = True
        self.history.append(entry)
