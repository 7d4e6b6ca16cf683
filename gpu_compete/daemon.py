"""The daemon: `tick()` is one scheduling round, `run()` the loop around it.

A round: collect tasks that ended (from our children, the supervisors' history lines and the
registry), confirm launches that now show on their GPU, plan with the pure policy, launch,
and write `status.json`. Signal handlers only set flags; the loop acts on them.
"""

from __future__ import annotations

import os
import random
import select
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import structlog

from . import journal, launcher, pidfile, procs, status
from .classify import classify
from .gpus.base import GpuProbe, GpuSnapshot, current_user
from .gpus.simulated import NAMESPACE_ENV
from .policy import (Placement, RetryPolicy, build_views, candidates, lease_active, plan_round,
                     queue_status)
from .registry import Registry, RegistryError, private_dirs
from .tasks import Queue, Task, TaskSpec, TaskState, group_queues

log = structlog.get_logger("gpu_compete")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 130
# What a record says of one attempt, dropped when the next attempt starts.
_ATTEMPT_FIELDS = ("error_type", "retry_at", "gave_up", "exit_status", "ended_at", "pgid", "exec_pid")


class DaemonError(Exception):
    """Cannot start: another daemon holds the state directory, or it is unusable."""


@dataclass
class Config:
    work_dir: Path
    state_dir: Path
    registry: Path
    exclusive: bool = True
    poll: float = 5.0
    settle: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    status_every: float = 60.0
    seed: int | None = None
    pick: str = "longest"
    fresh: bool = False
    kill_grace: float = 10.0

    @property
    def history(self) -> Path:
        return self.state_dir / "history.jsonl"


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(wall))


def _parse_iso(text: Any) -> float | None:
    try:
        return time.mktime(time.strptime(str(text)[:19], "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None


class Daemon:
    def __init__(self, config: Config, specs: list[TaskSpec], probe: GpuProbe, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 rng: random.Random | None = None, out: Callable[[str], None] = print):
        self.config = config
        self.probe = probe
        self.clock, self.wall = clock, wall
        self.rng = rng or random.Random(config.seed)
        self.out = out
        self.user = current_user()
        self.registry = Registry(config.registry)
        self.paths = launcher.LaunchPaths(config.work_dir, config.state_dir, config.registry, config.history)
        self.queues = {q: Queue(Task(s) for s in ss) for q, ss in group_queues(specs).items()}
        self.tasks: dict[str, Task] = {t.uni_id: t for q in self.queues.values() for t in q}
        self.children: dict[str, launcher.Child] = {}
        self.known: dict[str, dict[str, Any]] = {}  # last registry record we wrote or saw, per task
        self.history = journal.Tail(config.history)
        self.journaled: set[str] = set()  # uni_ids with a success line in the history
        self._unjournaled: dict[str, dict[str, Any]] = {}  # success lines the disk refused so far
        self._problems: dict[str, str] = {}  # what is failing now, reported once, not every round
        self._pending: list[Callable[[dict[str, Any]], Any]] = []  # registry changes not yet written
        self.snapshots: list[GpuSnapshot] = []
        self.draining = self.force = self.status_requested = False
        self.next_status = 0.0
        self._pidfile_fd: int | None = None
        self._wake_r = self._wake_w = -1

    # --- start-up --------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the state directory: a lock held for the daemon's life, and `daemon.pid`."""
        try:
            private_dirs(self.config.state_dir / "logs")
            private_dirs(self.config.registry.parent)
        except OSError as exc:
            raise DaemonError(f"cannot use state directory {self.config.state_dir}: {exc.strerror or exc}") from None
        try:
            self._pidfile_fd = pidfile.acquire(self.config.state_dir)
        except pidfile.PidFileBusy as exc:
            raise DaemonError(str(exc)) from None
        except OSError as exc:
            raise DaemonError(f"cannot create {self.config.state_dir / pidfile.NAME}: {exc.strerror or exc}") from None

    def release(self) -> None:
        if self._pidfile_fd is not None:
            pidfile.release(self._pidfile_fd)
            self._pidfile_fd = None

    def resume(self) -> None:
        """Reconcile with what an earlier daemon left: completed tasks from the history,
        live processes adopted, failures and backoffs carried on."""
        now, wall = self.clock(), self.wall()
        try:
            self.journaled = journal.completed(self.config.history)
        except OSError as exc:
            raise DaemonError(f"cannot read {self.config.history}: {exc.strerror or exc}") from None
        done = set() if self.config.fresh else set(self.journaled)
        self.history.new_entries()  # start reading after what is already there
        try:
            records = self.registry.read()
        except RegistryError as exc:
            log.error("registry unreadable; starting without it", error=str(exc))
            records = {}
        # Processes of our tasks still alive, found by their environment: the registry may have
        # been damaged while no daemon watched, and a live task must never be started twice.
        live = self._live_task_processes()
        stale = []
        for uid, task in self.tasks.items():
            record = records.get(uid)
            if uid in done:
                task.state = TaskState.COMPLETED
                if record is not None and record.get("state") != "running":
                    stale.append(uid)
                continue
            if record is None:
                if uid in live:
                    self._adopt(task, live[uid], now)
                continue
            self.known[uid] = record
            task.retry_count = record["retry_count"]
            if isinstance(record.get("gpu"), int) and not isinstance(record.get("gpu"), bool):
                task.gpu = record["gpu"]
            state = record.get("state")
            if state == "running":
                if self._record_alive(record):
                    self._adopt(task, record, now)
                else:
                    self._lost(task, "its process died while no daemon watched", now)
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
                self._failed(task, record.get("error_type") or "unknown", now)
        if stale:
            self._registry_write(lambda data: [data.pop(u, None) for u in stale])

    def _live_task_processes(self) -> dict[str, dict[str, Any]]:
        """{uni_id: {pid, create_time, gpu}} of the oldest live process carrying one of our
        task ids and our namespace in its environment."""
        found: dict[str, dict[str, Any]] = {}
        for proc, env in procs.scan_env(**{NAMESPACE_ENV: str(self.config.state_dir)}):
            uid = env.get("GPU_COMPETE_UNI_ID")
            try:
                ct = proc.create_time()
            except psutil.Error:
                continue
            if uid in self.tasks and (uid not in found or ct < found[uid]["create_time"]):
                gpu = env.get("CUDA_VISIBLE_DEVICES", "")
                found[uid] = {"pid": proc.pid, "create_time": ct, "gpu": int(gpu) if gpu.isdigit() else None}
        return found

    def _adopt(self, task: Task, record: dict[str, Any], now: float) -> None:
        """Wait on a task an earlier daemon started, rather than start it again."""
        task.state, task.adopted, task.launched_at = TaskState.RUNNING, True, now
        if isinstance(record.get("gpu"), int):
            task.gpu = record["gpu"]
        self.known.setdefault(task.uni_id, {}).update({k: v for k, v in record.items() if k != "gpu"})
        log.info("adopted running task", uni_id=task.uni_id, pid=record.get("pid"), gpu=task.gpu)

    def _record_alive(self, record: dict[str, Any]) -> bool:
        if procs.liveness(record.get("supervisor_pid"), record.get("supervisor_create_time")) == "alive":
            return True
        # Only a verified identity: a record with no create time may name anyone's process now.
        return procs.liveness(record.get("pid"), record.get("create_time")) == "alive"

    # --- one round -------------------------------------------------------------------------

    def tick(self) -> None:
        now = self.clock()
        if self._unjournaled:
            self._write_history()
        if self._pending:
            self._registry_write(lambda data: None)  # retry what a failing disk refused before
        self._collect(now)
        self.snapshots = self.probe.snapshot()
        self._confirm(now)
        if not self.draining and not self.force:
            self._plan_and_launch(now)
        self._write_status()

    def _registry_write(self, change: Callable[[dict[str, Any]], Any]) -> bool:
        """Apply `change` to the registry. On failure (full disk, no permission) it is kept and
        applied, in order, with the next write that works: what the daemon knows is never lost,
        and running tasks are never stopped for it."""
        self._pending.append(change)

        def apply_all(data: dict[str, Any]) -> None:
            for pending in self._pending:
                pending(data)

        try:
            self.registry.update(apply_all)
        except RegistryError as exc:
            self._report("registry", "cannot write the registry; running tasks go on", exc)
            return False
        self._pending.clear()
        self._report("registry")
        return True

    def _report(self, what: str, message: str | None = None, error: object = None) -> None:
        """Log a failing write once when it starts failing (or fails differently) and once when
        it works again, not every round (a full disk at --poll 0.2 would log five a second)."""
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

    def _collect(self, now: float) -> None:
        successes = self._sync_history()
        running = [t for t in self.tasks.values() if t.state is TaskState.RUNNING]
        if not running:
            return
        try:
            records = self.registry.read()
        except RegistryError as exc:
            log.warning("registry unreadable this round", error=str(exc))
            records = {}
        missing = {}
        for task in running:
            uid = task.uni_id
            record = records.get(uid)
            if record is not None:
                self.known[uid] = record
            child = self.children.get(uid)
            if child is not None:
                rc = child.poll()
                if rc is None:
                    if record is None and uid in self.known:
                        missing[uid] = self.known[uid]  # wiped by someone: put our record back
                    continue
                del self.children[uid]
                final = record is not None and record.get("state") in ("normal_exit", "abnormal_exit")
                if uid in successes or (final and record["state"] == "normal_exit") or (rc == 0 and not final):
                    self._completed(task, record or {}, now, exit_status=rc)
                elif rc < 0 and not final:
                    self._lost(task, f"its supervisor was killed by signal {-rc}", now)
                else:
                    error = (record or {}).get("error_type") if final else None
                    self._failed(task, error or classify(rc, self._log_tail(uid)) or "unknown", now)
                continue
            # Adopted: not our child, so the registry and the history tell how it ended.
            if uid in successes or (record and record.get("state") == "normal_exit"):
                self._completed(task, record or {}, now)
            elif record and record.get("state") == "abnormal_exit":
                self._failed(task, record.get("error_type") or "unknown", now)
            elif not self._record_alive(record or self.known.get(uid, {})):
                self._lost(task, "its process died without recording how it ended", now)
            elif record is None and uid in self.known:
                missing[uid] = self.known[uid]
        if missing:
            log.warning("registry records vanished; writing them back", uni_ids=sorted(missing))
            self._registry_write(lambda data: [data.setdefault(u, r) for u, r in missing.items()])

    def _sync_history(self) -> set[str]:
        """uni_ids whose success lines appeared in the history since the last look. A task we
        did not think was running (an orphan of an earlier daemon finished) is completed too:
        a success in the history is never run again."""
        successes = {e["uni_id"] for e in self.history.new_entries()
                     if e.get("state") == "normal_exit" and isinstance(e.get("uni_id"), str)}
        self.journaled |= successes
        for uid in successes:
            task = self.tasks.get(uid)
            if task is not None and task.state in (TaskState.PENDING, TaskState.RETRY):
                log.warning("a success was recorded for a task not known to run; counting it", uni_id=uid)
                task.state = TaskState.COMPLETED
                self._registry_write(lambda data, uid=uid: data.pop(uid, None))
        return successes

    def _log_tail(self, uni_id: str) -> str:
        path = launcher.log_path(self.config.state_dir, uni_id)
        try:
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - 65536))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _completed(self, task: Task, record: dict[str, Any], now: float, exit_status: int = 0) -> None:
        uid = task.uni_id
        task.state, task.error_type = TaskState.COMPLETED, None
        self._sync_history()  # the supervisor may have written its line since this round began
        if uid not in self.journaled:
            # The supervisor could not write it (or a wrapper said normal_exit itself).
            entry = {"uni_id": uid, "state": "normal_exit", "queue": task.spec.queue, "gpu": task.gpu,
                     "attempt": task.retry_count + 1, "exit_status": exit_status,
                     "start": record.get("started_at"), "end": _iso(self.wall()), "by": "daemon"}
            self._unjournaled[uid] = entry
        self._write_history()
        if uid not in self._unjournaled:
            self._registry_write(lambda data: data.pop(uid, None))
        self.known.pop(uid, None)
        log.info("task completed", uni_id=uid, queue=task.spec.queue, gpu=task.gpu)

    def _write_history(self) -> None:
        """Append the success lines not yet written; each task's record leaves the registry only
        once its line is in the history, so a full disk cannot make a success be forgotten
        (a restart finds the normal_exit record and writes the line then)."""
        for uid, entry in list(self._unjournaled.items()):
            try:
                journal.append(self.config.history, entry)
            except OSError as exc:
                self._report("history", "cannot append to the history", exc)
                return
            del self._unjournaled[uid]
            self.journaled.add(uid)
            self._registry_write(lambda data, uid=uid: data.pop(uid, None))
        self._report("history")

    def _lost(self, task: Task, why: str, now: float) -> None:
        # Whatever the supervisor left behind is ended before the task runs again: its
        # recorded process group, and any process still carrying this task's id and our
        # namespace in its environment (the supervisor may have died before recording).
        procs.signal_group(*_worker_group(self.known.get(task.uni_id, {})), signal.SIGKILL)
        procs.kill_all(procs.processes_with_env(GPU_COMPETE_UNI_ID=task.uni_id,
                                                **{NAMESPACE_ENV: str(self.config.state_dir)}))
        self._failed(task, "lost", now, note=why)

    def _failed(self, task: Task, error_type: str, now: float, note: str | None = None) -> None:
        decision = self.config.retry.after_failure(task.retry_count, now)
        task.retry_count, task.error_type = decision.retry_count, error_type
        fields: dict[str, Any] = {"state": "abnormal_exit", "error_type": error_type,
                                  "retry_count": decision.retry_count}
        if decision.action == "give_up":
            task.state = TaskState.FAILED
            fields["gave_up"] = True
            log.error("task failed for good; its queue is blocked", uni_id=task.uni_id, error_type=error_type,
                      retries=decision.retry_count, note=note)
        else:
            task.state, task.retry_at = TaskState.RETRY, decision.at
            fields["retry_at"] = _iso(self.wall() + (decision.at - now))
            log.warning("task failed; will retry" if decision.action == "retry" else "task failed; backing off",
                        uni_id=task.uni_id, error_type=error_type, retry_count=decision.retry_count,
                        retry_in_s=round(decision.at - now, 1), note=note)
        self.children.pop(task.uni_id, None)
        uid = task.uni_id

        def change(data: dict[str, Any]) -> None:
            record = data.get(uid) if isinstance(data.get(uid), dict) else {}
            record.update(fields)
            record["updated_at"] = _iso(self.wall())
            data[uid] = record

        self._registry_write(change)
        try:
            journal.append(self.config.history, {"uni_id": uid, "state": "abnormal_exit", "error_type": error_type,
                                                 "queue": task.spec.queue, "gpu": task.gpu,
                                                 "attempt": decision.retry_count, "end": _iso(self.wall())})
        except OSError as exc:
            log.error("cannot append to the history", error=str(exc))

    def _confirm(self, now: float) -> None:
        """A launch is confirmed once a process of its tree shows on its GPU."""
        waiting = [t for t in self.tasks.values() if t.state is TaskState.RUNNING and not t.confirmed]
        if not waiting:
            return
        on_gpu = {s.index: {p.pid for p in s.processes} for s in self.snapshots}
        if not any(on_gpu.get(t.gpu) for t in waiting):
            return
        children = _children_map()  # one scan of the process table for every waiting task
        for task in waiting:
            pids = on_gpu.get(task.gpu, set())
            if pids and self._tree_pids(task, children) & pids:
                task.confirmed = True
                log.debug("launch confirmed on its GPU", uni_id=task.uni_id, gpu=task.gpu,
                          after_s=round(now - (task.launched_at or now), 2))

    def _tree_pids(self, task: Task, children: dict[int, list[int]]) -> set[int]:
        """The task's supervisor, the pid the registry names for it, and all their descendants."""
        record = self.known.get(task.uni_id, {})
        todo = [p for p in (record.get("supervisor_pid"), record.get("pid")) if isinstance(p, int)]
        child = self.children.get(task.uni_id)
        if child is not None:
            todo.append(child.pid)
        out: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid not in out:
                out.add(pid)
                todo.extend(children.get(pid, ()))
        return out

    def placements(self, now: float) -> list[Placement]:
        return [Placement(t.gpu, t.spec.vram_bytes, lease_active(t, now, self.config.settle))
                for t in self.tasks.values() if t.state is TaskState.RUNNING and t.gpu is not None]

    def _plan_and_launch(self, now: float) -> None:
        cands = candidates(self.queues, now)
        if not cands:
            return
        views = build_views(self.snapshots, self.placements(now), self.user)
        for launch in plan_round(cands, views, self.rng, self.config.exclusive, self.config.pick):
            self._launch(self.tasks[launch.uni_id], launch.gpu, now)

    def _launch(self, task: Task, gpu: int, now: float) -> None:
        attempt = task.retry_count + 1
        try:
            child = launcher.start(task.spec, gpu, attempt, self.paths)
        except OSError as exc:
            log.error("cannot start task", uni_id=task.uni_id, error=str(exc))
            self._failed(task, "unknown", now, note=f"launch failed: {exc}")
            return
        self.children[task.uni_id] = child
        task.state, task.gpu, task.launched_at, task.confirmed, task.adopted = TaskState.RUNNING, gpu, now, False, False
        ct = procs.create_time(child.pid)
        fields = {"state": "running", "retry_count": task.retry_count, "gpu": gpu, "queue": task.spec.queue,
                  "attempt": attempt, "supervisor_pid": child.pid, "supervisor_create_time": ct,
                  "started_at": _iso(self.wall()), "updated_at": _iso(self.wall())}
        uid = task.uni_id

        def change(data: dict[str, Any]) -> None:
            old = data.get(uid) if isinstance(data.get(uid), dict) else {}
            if old.get("exec_pid") == child.pid:
                # This attempt's supervisor wrote first (a fast task may even have ended): what
                # it recorded (worker pid, group, final state, error type) stays.
                record = {**old, **{k: v for k, v in fields.items() if k != "state"}}
            else:
                # Fields of the previous attempt go; its process group above all, which must
                # never be taken for this attempt's.
                record = {k: v for k, v in old.items() if k not in _ATTEMPT_FIELDS}
                record.update(fields, pid=child.pid, create_time=ct)
            data[uid] = record
            self.known[uid] = dict(record)

        self._registry_write(change)
        log.info("task started", uni_id=uid, queue=task.spec.queue, gpu=gpu, attempt=attempt, pid=child.pid)

    # --- status ----------------------------------------------------------------------------

    def dry_run(self) -> str:
        """Queues, expanded commands, and where the heads would start now; launches nothing."""
        now = self.clock()
        self.resume_view_only()
        self.snapshots = self.probe.snapshot()
        views = build_views(self.snapshots, [], self.user)
        plan = plan_round(candidates(self.queues, now), views, self.rng, self.config.exclusive, self.config.pick)
        return status.render_dry_run(self, views, {launch.uni_id: launch.gpu for launch in plan})

    def resume_view_only(self) -> None:
        """Mark tasks the history says are completed, without touching any file."""
        if not self.config.fresh:
            for uid in journal.completed(self.config.history) & set(self.tasks):
                self.tasks[uid].state = TaskState.COMPLETED

    def view(self) -> dict[str, Any]:
        now = self.clock()
        try:
            records = self.registry.read()
        except RegistryError:
            records = {}
        return status.build(self, now, records)

    def _write_status(self) -> None:
        try:
            status.write_json(self.config.state_dir / "status.json", self.view())
        except OSError as exc:
            self._report("status.json", "cannot write status.json", exc)
        else:
            self._report("status.json")

    # --- the loop --------------------------------------------------------------------------

    def finished(self) -> bool:
        running = any(t.state is TaskState.RUNNING for t in self.tasks.values())
        if self.draining:
            return not running
        return all(queue_status(q) in ("DONE", "BLOCKED") for q in self.queues.values())

    def exit_code(self) -> int:
        states = {t.state for t in self.tasks.values()}
        if states <= {TaskState.COMPLETED}:
            return EXIT_OK
        if all(queue_status(q) in ("DONE", "BLOCKED") for q in self.queues.values()):
            return EXIT_FAILED
        return EXIT_STOPPED

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum in (signal.SIGINT, signal.SIGTERM):
            if self.draining:
                self.force = True
            self.draining = True
        elif signum == signal.SIGUSR2:
            self.draining = self.force = True
        elif signum == signal.SIGUSR1:
            self.status_requested = True

    def _install_signals(self) -> dict[int, Any]:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        signal.set_wakeup_fd(self._wake_w)
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            previous[sig] = signal.signal(sig, self._on_signal)
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select
        return previous

    def _sleep_until(self, deadline: float) -> None:
        """Sleep until `deadline` (monotonic) or until a signal or a child's exit wakes us."""
        remaining = deadline - self.clock()
        if remaining > 0:
            ready, _, _ = select.select([self._wake_r], [], [], remaining)
            if ready:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass

    def run(self) -> int:
        previous = self._install_signals()
        was_draining = False
        try:
            while True:
                start = self.clock()
                self.tick()
                if self.draining and not was_draining:
                    was_draining = True
                    running = sum(t.state is TaskState.RUNNING for t in self.tasks.values())
                    log.warning("draining: nothing new starts; waiting for running tasks "
                                "(signal again or `gpu-compete stop --kill` to end them)", running=running)
                self._maybe_print_status(start)
                if self.force:
                    self.kill_all()
                    break
                if self.finished():
                    break
                self._sleep_until(start + self.config.poll)
        finally:
            signal.set_wakeup_fd(-1)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._write_status()
        self.out(status.render(self.view()))
        code = self.exit_code()
        if code == EXIT_STOPPED:
            log.warning("stopped before every task completed; run the same command again to resume "
                        "(completed tasks are skipped, live ones adopted)")
        return code

    def _maybe_print_status(self, now: float) -> None:
        due = self.config.status_every > 0 and now >= self.next_status
        if due or self.status_requested:
            self.status_requested = False
            if due:
                self.next_status = now + self.config.status_every
            self.out(status.render(self.view()))

    def kill_all(self) -> None:
        """End every running task's process group: SIGTERM, SIGKILL after the grace period.
        The tasks are recorded as stopped, so a restart runs them again without counting a failure."""
        running = [t for t in self.tasks.values() if t.state is TaskState.RUNNING]
        log.warning("ending running tasks", count=len(running))
        groups = []
        for task in running:
            record = self.known.get(task.uni_id, {})
            sup, sup_ct = record.get("supervisor_pid"), record.get("supervisor_create_time")
            if procs.is_pid(sup) and procs.liveness(sup, sup_ct) == "alive":
                try:
                    os.kill(sup, signal.SIGTERM)  # the supervisor forwards it to the task's group
                except ProcessLookupError:
                    pass
            pgid = record.get("pgid")
            groups += [g for g in (sup, pgid) if procs.is_pid(g)]
        deadline = self.clock() + self.config.kill_grace
        while self.clock() < deadline and any(procs.group_alive(g) for g in groups):
            for child in self.children.values():
                child.poll()
            time.sleep(0.05)
        for task in running:
            record = self.known.get(task.uni_id, {})
            procs.signal_group(record.get("supervisor_pid"), record.get("supervisor_create_time"), signal.SIGKILL)
            procs.signal_group(*_worker_group(record), signal.SIGKILL)
        for child in self.children.values():
            child.wait(timeout=5)
        self.children.clear()
        stopped = {t.uni_id: t for t in running}
        now_iso = _iso(self.wall())

        def change(data: dict[str, Any]) -> None:
            for uid, task in stopped.items():
                record = data.get(uid) if isinstance(data.get(uid), dict) else {}
                if record.get("state") == "normal_exit":
                    continue  # it finished in the grace period; collected on restart
                record.update(state="abnormal_exit", error_type="stopped", retry_count=task.retry_count,
                              retry_at=now_iso, updated_at=now_iso)
                data[uid] = record

        self._registry_write(change)
        for task in running:
            task.state, task.retry_at, task.error_type = TaskState.RETRY, 0.0, "stopped"


def _worker_group(record: dict[str, Any]) -> tuple[Any, Any]:
    """The process group the task's worker leads, with the leader's recorded create time (None,
    so nothing is signalled, when the record doesn't say the leader is its worker)."""
    pgid = record.get("pgid")
    return pgid, record.get("create_time") if record.get("pid") == pgid else None


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        children.setdefault(proc.info["ppid"], []).append(proc.pid)
    return children
