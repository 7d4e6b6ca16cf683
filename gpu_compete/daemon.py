"""The daemon: `tick()` is one scheduling round, `run()` the loop around it.

A round: collect tasks that ended (from our children, the supervisors' history lines and the
registry), confirm launches that now show on their GPU, plan with the pure policy, launch,
and write `status.json`. Signal handlers only set flags; the loop acts on them.

The pieces live apart: `ledger` (registry and history writes that survive a full disk),
`evidence` (is a task alive, how did it end), `stopping` (ending tasks on purpose),
`wakeloop` (signals and sleeping), `policy` (every decision, pure).
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import structlog

from . import evidence, hostguard, journal, launcher, pidfile, procs, status, stopping, vram
from .classify import is_permanent
from .gpus.base import (PID_NAMESPACE_WARNING, GpuProbe, GpuSnapshot, current_user, key_from_record,
                        key_to_record, pid_namespace_mismatch, without_owners)
from .hooks import Hooks
from .ledger import Ledger
from .observe import Observer
from .policy import (Placement, RetryPolicy, build_views, candidates, fits, lease_active, plan_round,
                     queue_status, why_unplaceable)
from .registry import Registry, RegistryError, private_dirs
from .steering import Steering
from .tasks import GIB, Queue, Task, TaskSpec, TaskState, group_queues
from .vram import VramWatch
from .wakeloop import WakeLoop

log = structlog.get_logger("gpu_compete")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 130
# What a record says of one attempt, dropped when the next attempt starts.
_ATTEMPT_FIELDS = ("error_type", "retry_at", "gave_up", "exit_status", "ended_at", "pgid", "exec_pid",
                   "peak_vram_gb", "peak_gpu", "gpus")
# How long the pids of an ended task are not counted on its GPU: NVML can list a process for
# a moment after it exits, and the GPU must not sit idle for a poll because of it.
GHOST_S = 10.0


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
    on_event: str | None = None  # shell command run (not waited for) on task_start, task_end, ...
    hook_timeout: float = 30.0
    timeout_s: float | None = None  # --timeout: the limit of a task without timeout=
    retry_permanent: bool = False  # --retry-permanent: retry not_found/syntax/import errors too
    oom_growth: float = 1.25  # after an oom: the next attempt needs last peak x this
    guard: hostguard.HostGuard = field(default_factory=hostguard.HostGuard)

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
                 rng: random.Random | None = None, out: Callable[[str], None] = print,
                 book: Any = None, follow: bool = False):
        self.config = config
        self.probe = probe
        self.clock, self.wall = clock, wall
        self.rng = rng or random.Random(config.seed)
        self.out = out
        self.user = current_user()
        self.namespace = str(config.state_dir)
        self.registry = Registry(config.registry)
        self.ledger = Ledger(self.registry, config.history)
        self.paths = launcher.LaunchPaths(config.work_dir, config.state_dir, config.registry, config.history)
        self.queues = {q: Queue(Task(s) for s in ss) for q, ss in group_queues(specs).items()}
        self.tasks: dict[str, Task] = {t.uni_id: t for q in self.queues.values() for t in q}
        self.children: dict[str, launcher.Child] = {}
        self.known: dict[str, dict[str, Any]] = {}  # last registry record we wrote or saw, per task
        self.gpu_pids: dict[str, set[int]] = {}  # pids of each running task seen on its GPU
        self.ghosts: dict[int, float] = {}  # pid of an ended task -> until when it is not counted
        self.snapshots: list[GpuSnapshot] = []
        self.waiting_why: dict[str, str] = {}  # idle head -> why it did not start this round
        self.foreign_pids = False  # NVML's pids are another namespace's (a container)
        self._told_too_large: set[str] = set()
        self.vram = VramWatch(_descends, self.user)
        self.guard = hostguard.GuardWatch(config.guard, config.work_dir, lambda: _iso(self.wall()))
        self.draining = self.force = self.status_requested = False
        self.next_status = 0.0
        self._pidfile_fd: int | None = None
        hooks = Hooks(config.on_event, config.hook_timeout, config.state_dir / "hooks.log") if config.on_event else None
        self.observer = Observer(config.history, hooks, clock, wall)
        self.steer = Steering(self, book, follow)  # reloads and control requests

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
            self.steer.migrate()
            # One read, and the tail goes on from where it ended: a success appended while we
            # start is then either in this read or in the first round's, never in neither.
            past = self.ledger.history.new_entries(strict=True)
        except OSError as exc:
            raise DaemonError(f"cannot read {self.config.history}: {exc.strerror or exc}") from None
        self.ledger.journaled = journal.completed(past)
        gave_up = {} if self.config.fresh else journal.failed_for_good(past)
        done = set() if self.config.fresh else set(self.ledger.journaled)
        try:
            records = self.registry.read()
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
                    self._ended_unseen(task, record, now)
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
            self.ledger.write(lambda data: [data.pop(u, None) for u in stale])
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
        return evidence.record_alive(record or self.known.get(uid, {}), uid, self.namespace) or (
            record is not None and uid in self.known and evidence.record_alive(self.known[uid], uid, self.namespace)
        ) or self._supervised(uid)

    def _supervised(self, uid: str) -> bool:
        return evidence.supervisor_running(launcher.log_path(self.config.state_dir, uid))

    # --- one round -------------------------------------------------------------------------

    def tick(self) -> None:
        now = self.clock()
        self.ledger.flush()
        self.steer.before_round(now)
        with self.ledger.batch():
            self._collect(now)
            self.steer.after_collect(now)
            self.snapshots = self.probe.snapshot()
            self._check_pid_namespace(now)
            self._confirm(now)
            self._watch_vram()
            if not self.draining and not self.force:
                self._plan_and_launch(now)
        self._write_status()

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
            if record is not None and not record.get("legacy"):
                self.known[uid] = record
            child = self.children.get(uid)
            if child is not None:
                rc = child.poll()
                if rc is None:
                    if record is None and uid in self.known:
                        missing[uid] = self.known[uid]  # wiped by someone: put our record back
                    continue
                del self.children[uid]
                said = evidence.wrapper_ending(record, child.pid)
                if uid in successes or (said and said.state == "normal_exit") or (rc == 0 and not said):
                    self._completed(task, record or {}, now, exit_status=rc)
                elif rc < 0 and not said:
                    self._lost(task, f"its supervisor was killed by signal {-rc}", now)
                else:
                    self._failed(task, self._why(task, record, rc, child.pid), now)
                continue
            # Adopted: not our child, so the registry, the history and the log tell how it ended.
            sup = self.known.get(uid, {}).get("supervisor_pid")
            said = evidence.wrapper_ending(record, sup if procs.is_pid(sup) else None)
            if uid in successes or (said and said.state == "normal_exit"):
                self._completed(task, record or {}, now)
            elif said:
                self._failed(task, self._why(task, record, None, sup if procs.is_pid(sup) else None), now)
            elif not self._alive(uid, record):
                self._ended_unseen(task, record or {}, now)
            elif record is None and uid in self.known:
                missing[uid] = self.known[uid]
        if missing:
            log.warning("registry records vanished; writing them back", uni_ids=sorted(missing))
            self.ledger.write(lambda data: [data.setdefault(u, r) for u, r in missing.items()])

    def _why(self, task: Task, record: dict[str, Any] | None, returncode: int | None = None,
             supervisor_pid: int | None = None) -> str:
        tail = evidence.log_tail(launcher.log_path(self.config.state_dir, task.uni_id))
        return evidence.error_type(record, tail, task.uni_id, returncode, supervisor_pid)

    def _ended_unseen(self, task: Task, record: dict[str, Any], now: float) -> None:
        """A task whose process is gone and whose end nobody recorded in the registry: the
        supervisor's end line in its log may still say how it ended; only without one is it
        lost."""
        uid = task.uni_id
        tail = evidence.log_tail(launcher.log_path(self.config.state_dir, uid))
        ended = evidence.supervisor_ending(tail, uid)
        if ended is not None and ended.state == "normal_exit":
            self._completed(task, record, now)
        elif ended is not None:
            self._failed(task, evidence.error_type(record, tail, uid), now)
        else:
            self._lost(task, "its process died without recording how it ended", now)

    def _sync_history(self) -> set[str]:
        """uni_ids whose success lines appeared in the history since the last look. A task we
        did not think was running (an orphan of an earlier daemon finished) is completed too:
        a success in the history is never run again."""
        successes = self.ledger.new_successes()
        for uid in successes:
            task = self.tasks.get(uid)
            if task is not None and task.state in (TaskState.PENDING, TaskState.RETRY):
                log.warning("a success was recorded for a task not known to run; counting it", uni_id=uid)
                task.state = TaskState.COMPLETED
                self.ledger.write(lambda data, uid=uid: data.pop(uid, None))
        return successes

    def _task_ended(self, task: Task, now: float) -> None:
        """Its processes may linger in NVML's list for a moment: not counted from now on (those
        seen on its GPU, and its supervisor and worker, for a task that ended before a round
        could see it there)."""
        for pid in self.gpu_pids.pop(task.uni_id, set()) | self._roots(task):
            self.ghosts[pid] = now + GHOST_S
        self.children.pop(task.uni_id, None)

    def _completed(self, task: Task, record: dict[str, Any], now: float, exit_status: int = 0) -> None:
        uid = task.uni_id
        task.state, task.error_type = TaskState.COMPLETED, None
        self._task_ended(task, now)
        self._sync_history()  # the supervisor may have written its line since this round began
        self.ledger.add_success(uid, {
            "uni_id": uid, "state": "normal_exit", "queue": task.spec.queue, "gpu": key_to_record(task.gpu),
            "attempt": task.retry_count + 1, "exit_status": exit_status,
            "start": record.get("started_at"), "end": _iso(self.wall()), "by": "daemon", **vram.usage_fields(task)})
        self.known.pop(uid, None)
        log.info("task completed", uni_id=uid, queue=task.spec.queue, gpu=task.gpu)

    def _lost(self, task: Task, why: str, now: float) -> None:
        # Whatever the supervisor left behind is ended before the task runs again: its
        # recorded process group, and any process still carrying this task's id and our
        # namespace in its environment (the supervisor may have died before recording).
        if self.ledger.read_only:  # a dry run touches no process
            self._failed(task, "lost", now, note=why)
            return
        procs.signal_group(*stopping.worker_group(self.known.get(task.uni_id, {})), signal.SIGKILL)
        procs.kill_all(procs.processes_with_env(**{evidence.UNI_ID_ENV: task.uni_id,
                                                   evidence.NAMESPACE_ENV: self.namespace}))
        self._failed(task, "lost", now, note=why)

    def _failed(self, task: Task, error_type: str, now: float, note: str | None = None) -> None:
        if self.steer.stopped_on_purpose(task, now):
            return
        permanent = is_permanent(error_type) and not self.config.retry_permanent
        decision = self.config.retry.after_failure(task.retry_count, now, max_retries=task.spec.retries,
                                                   permanent=permanent)
        task.retry_count, task.error_type = decision.retry_count, error_type
        self._task_ended(task, now)
        usage = vram.usage_fields(task)
        fields: dict[str, Any] = {"state": "abnormal_exit", "error_type": error_type,
                                  "retry_count": decision.retry_count, **usage}
        if error_type == "oom":
            fields["vram_gb_needed"] = vram.learn_from_oom(task, self.config.oom_growth, self.snapshots)
        if decision.action == "give_up" and permanent:
            task.state = TaskState.FAILED
            fields["gave_up"] = True
            log.error(f"task failed for good at once: {error_type} would only repeat (--retry-permanent "
                      "retries it); its queue is blocked", uni_id=task.uni_id, error_type=error_type,
                      **({"note": note} if note else {}))
        elif decision.action == "give_up":
            task.state = TaskState.FAILED
            fields["gave_up"] = True
            log.error("task failed for good; its queue is blocked", uni_id=task.uni_id, error_type=error_type,
                      attempts=decision.retry_count, retries=decision.retry_count - 1, note=note)
        else:
            task.state, task.retry_at = TaskState.RETRY, decision.at
            fields["retry_at"] = _iso(self.wall() + (decision.at - now))
            log.warning("task failed; will retry" if decision.action == "retry" else "task failed; backing off",
                        uni_id=task.uni_id, error_type=error_type, failures=decision.retry_count,
                        retry_in_s=round(decision.at - now, 1), note=note)
        uid = task.uni_id

        def change(data: dict[str, Any]) -> None:
            record = data.get(uid) if isinstance(data.get(uid), dict) else {}
            record.update(fields)
            record["updated_at"] = _iso(self.wall())
            data[uid] = record

        self.ledger.write(change, uid)
        known = self.known.get(uid, {})
        entry = {"uni_id": uid, "state": "abnormal_exit", "error_type": error_type, "queue": task.spec.queue,
                 "gpu": key_to_record(task.gpu), "attempt": decision.retry_count, "start": known.get("started_at"),
                 "exit_status": known.get("exit_status"), "end": known.get("ended_at") or _iso(self.wall()), **usage}
        if "vram_gb_needed" in fields:
            entry["vram_gb_needed"] = fields["vram_gb_needed"]
        if fields.get("gave_up"):
            entry["gave_up"] = True
        self.ledger.append(entry)

    def _check_pid_namespace(self, now: float) -> None:
        """In a container without --pid=host NVML lists host pids: none of our tasks ever shows
        up as itself. Said once; from then on owners of GPU processes are not guessed from pids
        that mean something else here, and leases end at --settle."""
        if not self.foreign_pids:
            settled = {}
            for t in self.tasks.values():
                if (t.state is TaskState.RUNNING and not t.confirmed and t.gpu is not None
                        and t.launched_at is not None and now - t.launched_at >= self.config.settle):
                    settled.setdefault(t.gpu, set()).update(self._roots(t))
            if settled and pid_namespace_mismatch(self.snapshots, settled):
                self.foreign_pids = True
                log.warning(PID_NAMESPACE_WARNING)
        if self.foreign_pids:
            self.snapshots = without_owners(self.snapshots)

    def _confirm(self, now: float) -> None:
        """A launch is confirmed once a process of its tree shows on its GPU; the pids seen
        there are remembered, so they are not counted once the task has ended."""
        self.ghosts = {pid: until for pid, until in self.ghosts.items() if until > now}
        waiting = [t for t in self.tasks.values() if t.state is TaskState.RUNNING and not t.confirmed]
        if not waiting:
            return
        on_gpu = {s.key: {p.pid for p in s.processes} for s in self.snapshots}
        if not any(on_gpu.get(t.gpu) for t in waiting):
            return
        claimed = {pid for pids in self.gpu_pids.values() for pid in pids}
        for task in waiting:
            roots = self._roots(task)
            # A gpus=N task is confirmed once its tree shows on every one of its GPUs.
            seen = [{pid for pid in on_gpu.get(key, ()) if pid not in claimed and _descends(pid, roots)}
                    for key in task.gpu_keys]
            mine = set().union(*seen) if seen and all(seen) else set()
            if mine:
                task.confirmed = True
                self.gpu_pids[task.uni_id] = mine
                claimed |= mine
                log.debug("launch confirmed on its GPU", uni_id=task.uni_id, gpu=task.gpu,
                          after_s=round(now - (task.launched_at or now), 2))

    def _roots(self, task: Task) -> set[int]:
        """The task's supervisor and the pid the registry names for it: a process on the GPU
        that is one of these or descends from one is the task's."""
        record = self.known.get(task.uni_id, {})
        roots = {p for p in (record.get("supervisor_pid"), record.get("pid")) if procs.is_pid(p)}
        child = self.children.get(task.uni_id)
        if child is not None:
            roots.add(child.pid)
        return roots

    def placements(self, now: float) -> list[Placement]:
        """One per GPU a running task holds (a gpus=N task holds N)."""
        return [Placement(key, t.need_bytes, lease_active(t, now, self.config.settle))
                for t in self.tasks.values() if t.state is TaskState.RUNNING for key in t.gpu_keys]

    def _plan_and_launch(self, now: float) -> None:
        cands = self.steer.allowed(candidates(self.queues, now))
        if not cands:
            self.waiting_why = {}
            return
        if self._guarded(cands):
            return
        views = build_views(self.snapshots, self.placements(now), self.user, ignored=self.ghosts,
                            topology={s.key: s.group for s in self.snapshots if s.group is not None})
        smallest = min(c.vram_bytes for c in cands)
        self.observer.planning(v.key for v in views if fits(v, smallest, self.config.exclusive))
        snaps = {s.key: s for s in self.snapshots}
        plan = plan_round(cands, views, self.rng, self.config.exclusive, self.config.pick)
        if any(launch.uni_id in self.ledger.touched for launch in plan):
            self.ledger.write_pending()  # a failure recorded this round lands before its retry starts
        for launch in plan:
            self._launch(self.tasks[launch.uni_id], [snaps[key] for key in launch.gpus], now)
        self._explain_waits(cands, {launch.uni_id for launch in plan})

    def _guarded(self, cands: list) -> bool:
        """The host guards (--min-free-ram, --min-free-disk): while one holds, nothing starts."""
        was = self.guard.why
        why = self.guard.check()
        if why is None:
            if was is not None:
                log.info("host guard released; tasks start again", was=was)
            return False
        if was is None:
            log.warning("host guard holds every queue; nothing starts until it clears", why=why)
        self.waiting_why = {c.uni_id: f"host guard: {why} (since {self.guard.since})" for c in cands}
        return True

    def _explain_waits(self, cands: list, launched: set[str]) -> None:
        """Why each idle head did not start, for status; a head that fits no GPU in scope at
        all (too large, or more GPUs than there are) is said once in the log, not every round."""
        totals = [s.total_bytes for s in self.snapshots if s.available]
        why = {}
        for cand in cands:
            if cand.uni_id in launched:
                continue
            need = _gb(cand.vram_bytes)
            never = why_unplaceable(cand.vram_bytes, cand.gpus, totals) if totals else None
            if never:
                why[cand.uni_id] = never
                if cand.uni_id not in self._told_too_large:
                    self._told_too_large.add(cand.uni_id)
                    log.error("task fits no GPU in scope; it waits until one does (edit its VRAM, gpus= or --gpus)",
                              uni_id=cand.uni_id, why=never)
            else:
                mode = "free and none of your processes" if self.config.exclusive else "free"
                what = f"{cand.gpus} GPUs with {need} GB each" if cand.gpus > 1 else f"a GPU with {need} GB"
                why[cand.uni_id] = f"waiting for {what} {mode}"
        self.waiting_why = why

    def _launch(self, task: Task, snaps: list[GpuSnapshot], now: float) -> None:
        attempt = task.retry_count + 1
        gpu = snaps[0].key
        keys = tuple(s.key for s in snaps)
        timeout = task.spec.timeout_s if task.spec.timeout_s is not None else self.config.timeout_s
        try:
            child = launcher.start(task.spec, gpu, attempt, self.paths, cuda_visible=",".join(s.cuda_visible for s in snaps),
                                   gpus=keys, timeout_s=timeout, grace_s=self.config.kill_grace)
        except OSError as exc:
            log.error("cannot start task", uni_id=task.uni_id, error=str(exc))
            self._failed(task, "unknown", now, note=f"launch failed: {exc}")
            return
        self.children[task.uni_id] = child
        task.state, task.gpu, task.launched_at, task.confirmed, task.adopted = TaskState.RUNNING, gpu, now, False, False
        task.gpus = keys if len(keys) > 1 else ()
        task.peak_vram_bytes, task.peak_gpu, task.peak_written = None, None, 0
        fields: dict[str, Any] = {
            "state": "running", "retry_count": task.retry_count, "gpu": key_to_record(gpu),
            "queue": task.spec.queue, "attempt": attempt, "supervisor_pid": child.pid,
            "supervisor_create_time": procs.create_time(child.pid),
            "started_at": _iso(self.wall()), "updated_at": _iso(self.wall())}
        if task.gpus:
            fields["gpus"] = [key_to_record(k) for k in task.gpus]
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
                record.update(fields, pid=child.pid, create_time=fields["supervisor_create_time"])
            data[uid] = record
            self.known[uid] = dict(record)

        self.ledger.write(change)
        log.info("task started", uni_id=uid, queue=task.spec.queue, gpu=gpu, attempt=attempt, pid=child.pid)

    # --- what tasks use ---------------------------------------------------------------------

    def _watch_vram(self) -> None:
        """Each running task's peak VRAM from this round's snapshot, written as it grows."""
        running = {t.uni_id: (t, self._roots(t)) for t in self.tasks.values()
                   if t.state is TaskState.RUNNING and t.gpu_keys}
        grown = vram.update_peaks(self.vram, self.snapshots, running, not self.config.exclusive) if running else {}
        if grown:
            def change(data: dict[str, Any]) -> None:
                for uid, fields in grown.items():
                    if isinstance(data.get(uid), dict):
                        data[uid].update(fields)
            self.ledger.write(change)

    # --- status ----------------------------------------------------------------------------

    def dry_run(self) -> str:
        """Queues, expanded commands, and where the heads would start now; launches nothing."""
        self.ledger.read_only = True
        self.resume()
        now = self.clock()
        self.snapshots = self.probe.snapshot()
        views = build_views(self.snapshots, [], self.user)
        plan = plan_round(candidates(self.queues, now), views, self.rng, self.config.exclusive, self.config.pick)
        return status.render_dry_run(self, views, {launch.uni_id: ",".join(launch.gpus) for launch in plan})

    def view(self) -> dict[str, Any]:
        now = self.clock()
        try:
            records = self.registry.read()
        except RegistryError:
            records = {}
        view = status.build(self, now, records)
        self.steer.view(view)
        return view

    def _write_status(self, ending: int | None = None) -> None:
        view = self.view()
        if ending is None:
            self.observer.round(view)  # events for hooks, the idle counter; once a round
        else:
            self.observer.close(view, ending)
        try:
            status.write_json(self.config.state_dir / "status.json", view)
        except OSError as exc:
            self.ledger.report("status.json", "cannot write status.json", exc)
        else:
            self.ledger.report("status.json")

    # --- the loop --------------------------------------------------------------------------

    def finished(self) -> bool:
        running = any(t.state is TaskState.RUNNING for t in self.tasks.values())
        if self.draining:
            return not running
        return self.steer.finished_ok() and all(queue_status(q, self.queues) in ("DONE", "BLOCKED") for q in self.queues.values())

    def exit_code(self) -> int:
        states = {t.state for t in self.tasks.values()}
        if states <= {TaskState.COMPLETED, TaskState.SKIPPED}:
            return EXIT_OK
        if all(queue_status(q, self.queues) in ("DONE", "BLOCKED") for q in self.queues.values()):
            return EXIT_FAILED
        return EXIT_STOPPED

    def on_signal(self, signum: int) -> None:
        """Runs in the signal handler: only flags."""
        if signum in (signal.SIGINT, signal.SIGTERM):
            if self.draining:
                self.force = True
            self.draining = True
        elif signum == signal.SIGUSR2:
            self.draining = self.force = True
        elif signum == signal.SIGUSR1:
            self.status_requested = True
        elif signum == signal.SIGHUP:
            self.steer.reload_requested = True

    def run(self) -> int:
        was_draining = False
        self.loop = WakeLoop(self.on_signal, self.clock)
        with self.loop:
            self.steer.open(self.loop)
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
                    self.loop.sleep_until(start + self.config.poll)
            finally:
                self.steer.close()
                self._write_status(ending=self.exit_code())  # all_done, and running hooks finish
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

        def reap() -> None:
            for child in self.children.values():
                child.poll()

        stopping.end_tasks([self.known.get(t.uni_id, {}) for t in running], self.config.kill_grace, reap,
                           self.clock)
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

        self.ledger.write(change)
        for task in running:
            task.state, task.retry_at, task.error_type = TaskState.RETRY, 0.0, "stopped"


def _gb(size: int) -> str:
    return f"{size / GIB:.1f}".removesuffix(".0")


def _descends(pid: int, roots: set[int], depth: int = 32) -> bool:
    """True when `pid` is one of `roots` or a descendant of one: walking up from the few pids
    on a GPU costs a handful of reads, where a map of every process's children cost a scan of
    the whole process table on the path from one task's exit to the next one's start."""
    for _ in range(depth):
        if pid in roots:
            return True
        if pid <= 1:
            return False
        try:
            pid = psutil.Process(pid).ppid()
        except psutil.Error:
            return False
    return False
