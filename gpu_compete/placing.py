"""Putting tasks on GPUs: confirming launches, the container check, planning and launching.

A mixin of `Daemon` (its state lives there); split out so each piece stays small.
"""

from __future__ import annotations

from typing import Any, Collection, Iterable, Mapping

import psutil
import structlog

from . import launcher, procs, vram
from .gpus.base import (
    PID_NAMESPACE_WARNING,
    GpuSnapshot,
    pid_namespace_mismatch,
    without_owners,
)
from .records import launch_fields
from .policy import (
    Placement,
    build_views,
    candidates,
    fits,
    lease_active,
    plan_round,
    why_unplaceable,
)
from .outcomes import GHOST_S
from .tasks import GIB, Task, TaskState
from .timefmt import iso as _iso

log = structlog.get_logger("gpu_compete")


class Placing:
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
            mine = tree_on(on_gpu, task.gpu_keys, self._roots(task), claimed)
            if mine:
                task.confirmed = True
                self.gpu_pids[task.uni_id] = mine
                claimed |= mine
                log.debug("launch confirmed on its GPU", uni_id=task.uni_id, gpu=task.gpu,
                          after_s=round(now - (task.launched_at or now), 2))

    def _roots(self, task: Task) -> set[int]:
        """The task's supervisor and the pid the registry names for it: a process on the GPU
        that is one of these or descends from one is the task's."""
        return roots_of(self.known.get(task.uni_id, {}), self.children.get(task.uni_id))

    def placements(self, now: float) -> list[Placement]:
        """One per GPU a running task holds (a gpus=N task holds N). A task whose supervisor
        has said that its processes are all gone holds nothing while its outcome is written:
        another queue's task may start there (its own queue waits for the outcome)."""
        return [Placement(key, t.need_bytes, lease_active(t, now, self.config.settle))
                for t in self.tasks.values() if t.state is TaskState.RUNNING and not self._worker_done(t)
                for key in t.gpu_keys]

    def _worker_done(self, task: Task) -> bool:
        child = self.children.get(task.uni_id)
        return child is not None and child.worker_done

    # --- the supervisors' word that a task's processes are gone ------------------------------

    def _listen(self, child: launcher.Child) -> None:
        loop = getattr(self, "loop", None)  # none when rounds are driven by hand (tests)
        if loop is not None and child.done_fd is not None:
            loop.add_reader(child.done_fd, lambda: self._hear(child))

    def _hear(self, child: launcher.Child) -> bool:
        """Read the word if it came (a true answer wakes the loop for a round at once)."""
        fd = child.done_fd
        said = child.read_done()
        self._unlisten(fd, child)
        return said

    def _unlisten(self, fd: int | None, child: launcher.Child) -> None:
        if fd is not None and child.done_fd is None:
            loop = getattr(self, "loop", None)
            if loop is not None:
                loop.remove_reader(fd)

    def _drop_child(self, uid: str) -> None:
        child = self.children.pop(uid, None)
        if child is not None:
            fd = child.done_fd
            child.close_done()
            self._unlisten(fd, child)

    def _hear_all(self, now: float) -> None:
        """Supervisors that said their task's processes are gone: the pids seen on the GPU are
        not counted from now on, so the GPU is free for this round's plan."""
        for uid, child in self.children.items():
            if child.done_fd is not None:
                self._hear(child)
            if child.worker_done:
                for pid in self.gpu_pids.get(uid, ()):
                    self.ghosts.setdefault(pid, now + GHOST_S)
                task = self.tasks.get(uid)
                if task is not None:
                    self._left(task, now)

    def _left(self, task: Task, now: float) -> None:
        """Our task has left its GPUs: what NVML still lists there is looked at once more."""
        for key in task.gpu_keys:
            self.vacated[key] = now + GHOST_S

    def _ghost_leftovers(self, now: float) -> None:
        """On a GPU one of our tasks has just left, a listed pid whose process no longer exists
        is a leftover of that task's tree (a short-lived child no round saw, listed by NVML a
        moment after it exited): not counted, like the task's own pids. Never where NVML's pids
        are another namespace's (a container), where every pid would look dead."""
        self.vacated = {key: until for key, until in self.vacated.items() if until > now}
        if self.foreign_pids or not self.vacated:
            return
        for pid in dead_listed(self.snapshots, self.vacated, self.ghosts):
            self.ghosts[pid] = now + GHOST_S

    def _plan_and_launch(self, now: float) -> None:
        cands = self.steer.allowed(candidates(self.queues, now))
        if not cands:
            self.waiting_why = {}
            return
        if any(vram.cap_need(self.tasks[c.uni_id], self.snapshots) for c in cands):
            cands = self.steer.allowed(candidates(self.queues, now))  # with the needs brought down
        if self._guarded(cands):
            return
        views = build_views(self.snapshots, self.placements(now), self.user, ignored=self.ghosts,
                            topology={s.key: s.group for s in self.snapshots if s.group is not None})
        smallest = min(c.vram_bytes for c in cands)
        self.observer.planning(v.key for v in views if fits(v, smallest, self.config.exclusive))
        snaps = {s.key: s for s in self.snapshots}
        plan = plan_round(cands, views, self.rng, self.config.exclusive, self.config.pick)
        if any(launch.uni_id in self.records.touched for launch in plan):
            self.records.write_pending()  # a failure recorded this round lands before its retry starts
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
        self.waiting_why = explain_waits(cands, launched, self.snapshots, self.config.exclusive, self._told_too_large)

    def _launch(self, task: Task, snaps: list[GpuSnapshot], now: float) -> None:
        attempt = task.retry_count + 1
        gpu = snaps[0].key
        keys = tuple(s.key for s in snaps)
        timeout = task.spec.timeout_s if task.spec.timeout_s is not None else self.config.timeout_s
        try:
            child = self.node.start(task.spec, list(keys), [s.cuda_visible for s in snaps], attempt, timeout)
        except OSError as exc:
            log.error("cannot start task", uni_id=task.uni_id, error=str(exc))
            self._failed(task, "unknown", now, note=f"launch failed: {exc}")
            return
        self._listen(child)
        task.state, task.gpu, task.launched_at, task.confirmed, task.adopted = TaskState.RUNNING, gpu, now, False, False
        task.gpus = keys if len(keys) > 1 else ()
        task.peak_vram_bytes, task.peak_gpu, task.peak_written = None, None, 0
        uid = task.uni_id
        self.records.launched(uid, launch_fields(keys, task.spec.queue, attempt, task.retry_count, child.pid,
                                                 procs.create_time(child.pid), _iso(self.wall())))
        log.info("task started", uni_id=uid, queue=task.spec.queue, gpu=gpu, attempt=attempt, pid=child.pid,
                 **({"gpus": list(task.gpus)} if task.gpus else {}))  # a gpus=N task: all of them

    def _watch_vram(self) -> None:
        """Each running task's peak VRAM from this round's snapshot, written as it grows."""
        running = {t.uni_id: (t, self._roots(t)) for t in self.tasks.values()
                   if t.state is TaskState.RUNNING and t.gpu_keys}
        grown = vram.update_peaks(self.vram, self.snapshots, running, not self.config.exclusive) if running else {}
        if grown:
            self.records.peaks(grown)


def explain_waits(cands: list, launched: set[str], snapshots: list[GpuSnapshot], exclusive: bool,
              told: set[str]) -> dict[str, str]:
    """Why each idle head did not start, for status; a head that fits no GPU in scope at
    all (too large, or more GPUs than there are) is said once in the log, not every round."""
    totals = [s.total_bytes for s in snapshots if s.available]
    why = {}
    for cand in cands:
        if cand.uni_id in launched:
            continue
        need = _gb(cand.vram_bytes)
        never = why_unplaceable(cand.vram_bytes, cand.gpus, totals) if totals else None
        if never:
            why[cand.uni_id] = never
            if cand.uni_id not in told:
                told.add(cand.uni_id)
                log.error("task fits no GPU in scope; it waits until one does (edit its VRAM, gpus= or --gpus)",
                          uni_id=cand.uni_id, why=never)
        else:
            mode = "free and none of your processes" if exclusive else "free"
            what = f"{cand.gpus} GPUs with {need} GB each" if cand.gpus > 1 else f"a GPU with {need} GB"
            why[cand.uni_id] = f"waiting for {what} {mode}"
    return why


def _gb(size: int) -> str:
    return f"{size / GIB:.1f}".removesuffix(".0")


def roots_of(record: dict[str, Any], child: launcher.Child | None) -> set[int]:
    """The pids a task's processes descend from: its supervisor and the pid its record names."""
    roots = {p for p in (record.get("supervisor_pid"), record.get("pid")) if procs.is_pid(p)}
    if child is not None:
        roots.add(child.pid)
    return roots


def tree_on(on_gpu: Mapping[str, Collection[int]], keys: Iterable[str], roots: set[int],
            skip: Collection[int]) -> set[int]:
    """The pids of a task's tree (its `roots` and what descends from them) listed on its GPUs,
    once it shows on every one of them (a gpus=N task on all N); empty before. `skip`: pids
    known to be something else (another task's, an ended task's)."""
    seen = [{pid for pid in on_gpu.get(key, ()) if pid not in skip and descends(pid, roots)} for key in keys]
    return set().union(*seen) if seen and all(seen) else set()


def dead_listed(snapshots: list[GpuSnapshot], keys: Collection[str], known: Collection[int]) -> list[int]:
    """Pids listed on these GPUs, not in `known`, whose process no longer exists (a zombie
    counts as gone): what NVML lists for a moment after a process exits."""
    return [p.pid for snap in snapshots if snap.key in keys for p in snap.processes
            if p.pid not in known and procs.liveness(p.pid) == "dead"]


def descends(pid: int, roots: set[int], depth: int = 32) -> bool:
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
