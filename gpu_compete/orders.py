"""Requests from the control socket (`skip`, `unskip`, `retry`, `kill`, `pause`, `resume`,
`reload`), each answered at once from the daemon's state: `{"ok": true, "message": ...}`, or a
refusal with `code` 1 (not in a state where that makes sense) or 2 (a malformed request).

A mixin of `steering.Steering`: it runs in the daemon's one thread, between rounds. What
touches the machine is the host's (`_record`, a history line; `_reset_records`, the registry
after a retry; `_end`, signalling a task): a daemon's own processes, or a node's agent in a
`--ray` run (`cluster_steering`).
"""

from __future__ import annotations

from typing import Any

import structlog

from .tasks import Task, TaskState

log = structlog.get_logger("gpu_compete")


class Orders:
    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        handler = getattr(self, f"_op_{op}", None) if isinstance(op, str) and op.isidentifier() else None
        if handler is None:
            return _refuse(f"unknown request {op!r}", code=2)
        answer = handler(req)
        if answer.get("ok") and op != "ping":
            log.info("control request", op=op, message=answer.get("message"))
        return answer

    def _task(self, req: dict[str, Any]) -> Task | dict[str, Any]:
        uid = req.get("uni_id")
        if not isinstance(uid, str) or len(uid) > 512:
            return _refuse("malformed request: uni_id must be a string", code=2)
        task = self.d.tasks.get(uid)
        if task is None:
            return _refuse(f"unknown uni_id {uid!r}: not a task of this daemon (see `gpu-compete status`)")
        return task

    def _op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "message": "daemon is running"}

    def _op_skip(self, req: dict[str, Any]) -> dict[str, Any]:
        task = self._task(req)
        if isinstance(task, dict):
            return task
        if task.state is TaskState.SKIPPED:
            return _ok(f"{task.uni_id} is already skipped")
        if task.state not in (TaskState.PENDING, TaskState.RETRY, TaskState.FAILED):
            hint = "; use `gpu-compete kill --skip`" if task.state is TaskState.RUNNING else ""
            return _refuse(f"{task.uni_id} is {task.state.value}: only a pending, backing-off or failed task "
                           f"can be skipped{hint}")
        task.state = TaskState.SKIPPED
        self._record({"uni_id": task.uni_id, "state": "skipped", "queue": task.spec.queue})
        return _ok(f"skipped {task.uni_id}; queue {task.spec.queue} goes on without it")

    def _op_unskip(self, req: dict[str, Any]) -> dict[str, Any]:
        task = self._task(req)
        if isinstance(task, dict):
            return task
        if task.state is not TaskState.SKIPPED:
            return _refuse(f"{task.uni_id} is {task.state.value}, not skipped")
        task.state, task.retry_at = TaskState.PENDING, 0.0
        self.d.queues[task.spec.queue].rewind()
        self._record({"uni_id": task.uni_id, "state": "unskipped", "queue": task.spec.queue})
        return _ok(f"{task.uni_id} will run again in its place in queue {task.spec.queue}")

    def _op_retry(self, req: dict[str, Any]) -> dict[str, Any]:
        task = self._task(req)
        if isinstance(task, dict):
            return task
        if task.state not in (TaskState.FAILED, TaskState.RETRY):
            return _refuse(f"{task.uni_id} is {task.state.value}: only a task that failed for good or is "
                           "backing off can be retried")
        uid = task.uni_id
        task.state, task.retry_at, task.retry_count = TaskState.RETRY, self.d.clock(), 0
        self._reset_records(uid)
        self._record({"uni_id": uid, "state": "retried", "queue": task.spec.queue})
        return _ok(f"{uid} runs again at the next round, with a fresh retry budget")

    def _op_kill(self, req: dict[str, Any]) -> dict[str, Any]:
        task = self._task(req)
        if isinstance(task, dict):
            return task
        if task.state is not TaskState.RUNNING:
            return _refuse(f"{task.uni_id} is {task.state.value}, not running")
        skip = bool(req.get("skip"))
        refusal = self._end(task)
        if refusal:
            return _refuse(refusal)
        self.killing[task.uni_id] = {"deadline": self.d.clock() + self.d.config.kill_grace, "skip": skip}
        then = "skipped" if skip else "it runs again at the next round"
        return _ok(f"sent SIGTERM to {task.uni_id} (SIGKILL after {self.d.config.kill_grace:g} s); {then}")

    def _queues(self, req: dict[str, Any]) -> list[str] | dict[str, Any]:
        names = req.get("queues") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return _refuse("malformed request: queues must be a list of names", code=2)
        unknown = [n for n in names if n not in self.d.queues]
        if unknown:
            return _refuse(f"no queue {unknown[0]!r} (queues: {', '.join(self.d.queues) or 'none'})")
        return names

    def _op_pause(self, req: dict[str, Any]) -> dict[str, Any]:
        names = self._queues(req)
        if isinstance(names, dict):
            return names
        if not names:
            self.paused_all = True
            return _ok("paused: nothing new starts; running tasks go on")
        self.paused.update(names)
        return _ok(f"paused queue{'s' if len(names) > 1 else ''} {', '.join(names)}; running tasks go on")

    def _op_resume(self, req: dict[str, Any]) -> dict[str, Any]:
        names = self._queues(req)
        if isinstance(names, dict):
            return names
        if not names:
            self.paused_all = False
            self.paused.clear()
            return _ok("resumed every queue")
        self.paused.difference_update(names)
        return _ok(f"resumed queue{'s' if len(names) > 1 else ''} {', '.join(names)}"
                   + ("; the daemon as a whole is still paused" if self.paused_all else ""))

    def _op_reload(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.book is None:
            return _refuse("this daemon does not follow a command file")
        specs = self.book.check(force=True)
        if specs is None:
            return _refuse(f"not applied: {self.book.error}" if self.book.error else "cannot read the command file")
        change = self.apply(specs)
        return _ok(f"reloaded {self.book.path}: {change.summary()}", diff={
            "added": list(change.added), "dropped": list(change.removed_pending),
            "running_out": list(change.removed_running)})


def _ok(message: str, **extra: Any) -> dict[str, Any]:
    return {"ok": True, "message": message, **extra}


def _refuse(message: str, code: int = 1) -> dict[str, Any]:
    return {"ok": False, "code": code, "message": message}
