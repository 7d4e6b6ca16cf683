"""The daemon: `tick()` is one scheduling round, `run()` the loop around it.

A round: collect tasks that ended (from our children, the supervisors' history lines and the
registry), confirm launches that now show on their GPU, plan with the pure policy, launch,
and write `status.json`. Signal handlers only set flags; the loop acts on them.

The pieces live apart: `history` (its writes, kept through a full disk), the node's agent
(`agent`: the GPUs, the supervisors, and the node's registry, `records`),
`evidence` (is a task alive, how did it end), `stopping` (ending tasks on purpose),
`wakeloop` (signals and sleeping), `policy` (every decision, pure).
"""

from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import structlog

from . import (
    hostguard,
    launcher,
    pidfile,
    status,
)
from .gpus.base import (
    GpuProbe,
    GpuSnapshot,
    current_user,
)
from .agent import Agent
from .hooks import Hooks
from .history import History
from .observe import Observer
from .outcomes import Outcomes
from .placing import Placing
from .policy import (
    RetryPolicy,
    build_views,
    candidates,
    plan_round,
    queue_status,
)
from .reconcile import DaemonError, Reconciling
from .registry import RegistryError, private_dirs
from .steering import Steering
from .tasks import Queue, Task, TaskSpec, TaskState, group_queues
from .timefmt import iso as _iso
from .wakeloop import WakeLoop, set_flags

log = structlog.get_logger("gpu_compete")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 130
STATUS_LATE_S = 0.05  # the most a status put off for waiting exits is late


def all_ended(queues: dict[str, Queue]) -> bool:
    """Every queue done or blocked by a task that failed for good."""
    return all(queue_status(q, queues) in ("DONE", "BLOCKED") for q in queues.values())


def exit_code(tasks: dict[str, Task], queues: dict[str, Queue]) -> int:
    """0 all completed (or skipped), 1 some failed for good, 130 stopped before the end."""
    if {t.state for t in tasks.values()} <= {TaskState.COMPLETED, TaskState.SKIPPED}:
        return EXIT_OK
    return EXIT_FAILED if all_ended(queues) else EXIT_STOPPED


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


class Daemon(Reconciling, Outcomes, Placing):
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
        # The node's side of the run (probe, supervisors, registry, logs, and what is known of
        # the processes on the GPUs) is the same Agent class a Ray node runs, in-process here.
        self.node = Agent(None, str(config.state_dir), str(config.work_dir), probe=probe, registry=config.registry,
                          kill_grace=config.kill_grace)
        self.namespace = self.node.namespace
        self.records = self.node.records  # the node's registry, which only the agent writes
        self.problems = self.records.problems  # failing writes, said once (registry, history, status.json)
        self.history = History(config.history, self.records.forget, self.problems)
        self.paths = self.node.paths
        self.queues = {q: Queue(Task(s) for s in ss) for q, ss in group_queues(specs).items()}
        self.tasks: dict[str, Task] = {t.uni_id: t for q in self.queues.values() for t in q}
        self.vacated: dict[str, float] = {}  # GPU our task has just left -> until when leftovers are looked for
        self.snapshots: list[GpuSnapshot] = []
        self.waiting_why: dict[str, str] = {}  # idle head -> why it did not start this round
        self.foreign_pids = False  # NVML's pids are another namespace's (a container)
        self._told_too_large: set[str] = set()
        self.vram = self.node.vram  # what each task's processes hold: sampled from the node's snapshot
        self.guard = hostguard.GuardWatch(config.guard, config.work_dir, lambda: _iso(self.wall()))
        self.draining = self.force = self.status_requested = self.status_owed = False
        self.next_status = 0.0
        self._pidfile_fd: int | None = None
        hooks = Hooks(config.on_event, config.hook_timeout, config.state_dir / "hooks.log") if config.on_event else None
        self.observer = Observer(config.history, hooks, clock, wall)
        self.steer = Steering(self, book, follow)  # reloads and control requests

    # The node's facts, kept by its agent: supervisors we started, the pids seen on each
    # running task's GPUs, and pids of ended tasks not counted until when.

    @property
    def known(self) -> dict[str, dict[str, Any]]:
        """The last whole registry record the agent wrote or we saw, per task."""
        return self.records.known

    @property
    def children(self) -> dict[str, launcher.Child]:
        return self.node.children

    @property
    def gpu_pids(self) -> dict[str, set[int]]:
        return self.node.gpu_pids

    @property
    def ghosts(self) -> dict[int, float]:
        return self.node.ghosts

    @ghosts.setter
    def ghosts(self, value: dict[int, float]) -> None:
        self.node.ghosts = value

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

    # --- one round -------------------------------------------------------------------------

    def tick(self) -> None:
        now = self.clock()
        self.history.flush()  # what a failing disk refused before: success lines first
        self.records.flush()
        self.steer.before_round(now)
        with self.records.batch():
            self._collect(now)
            self.steer.after_collect(now)
            self.snapshots = self.node.snapshot()
            self._check_pid_namespace(now)
            self._ghost_leftovers(now)
            self._confirm(now)
            self._watch_vram()
            if not self.draining and not self.force:
                self._plan_and_launch(now)
        self._write_status_unless_busy()

    def _write_status_unless_busy(self) -> None:
        """Write `status.json` (and run the round's events), unless more exits are already
        waiting: when eight tasks end together, the next round's launches come first and the
        status is written once, by the round that finds nothing waiting (or STATUS_LATE_S later)."""
        loop = getattr(self, "loop", None)
        if loop is not None and loop.pending():
            self.status_owed = True
            return
        self.status_owed = False
        self._write_status()

    def _collect(self, now: float) -> None:
        self._hear_all(now)
        successes = self._sync_history()
        running = [t for t in self.tasks.values() if t.state is TaskState.RUNNING]
        if not running:
            return
        try:
            records = self.records.read()
        except RegistryError as exc:
            log.warning("registry unreadable this round", error=str(exc))
            records = {}
        for task in running:
            record = records.get(task.uni_id)
            if record is not None and not record.get("legacy"):
                self.known[task.uni_id] = record
        ended, missing = self.node.outcomes({t.uni_id: self.known.get(t.uni_id) for t in running}, records, successes)
        for task in running:
            if task.uni_id in ended:
                how, rc = ended[task.uni_id]
                self._drop_child(task.uni_id)
                self._settle(task, how, records.get(task.uni_id) or {}, now, exit_status=rc or 0)
        if missing:
            log.warning("registry records vanished; writing them back", uni_ids=sorted(missing))
            self.records.put_back(missing)

    # --- status ----------------------------------------------------------------------------

    def dry_run(self) -> str:
        """Queues, expanded commands, and where the heads would start now; launches nothing."""
        self.records.read_only = self.history.read_only = True
        self.resume()
        now = self.clock()
        self.snapshots = self.node.snapshot()
        views = build_views(self.snapshots, [], self.user)
        plan = plan_round(candidates(self.queues, now), views, self.rng, self.config.exclusive, self.config.pick)
        return status.render_dry_run(self, views, {launch.uni_id: ",".join(launch.gpus) for launch in plan})

    def scene(self) -> status.Scene:
        return status.Scene(self.wall(), self.config.exclusive, self.config.settle, self.user, self.queues,
                            self.snapshots, self.ghosts, self.draining, self.force, self.guard.why, self.guard.since,
                            self.waiting_why)

    def view(self) -> dict[str, Any]:
        now = self.clock()
        records = self.records.read_or_empty()
        view = self.observer.annotate(status.build(self.scene(), now, records))
        self.steer.view(view)
        return view

    def _write_status(self, ending: int | None = None) -> None:
        view = self.view()
        self.observer.publish(view, ending)  # events for hooks, the idle counter; once a round
        try:
            status.write_json(self.config.state_dir / "status.json", view)
        except OSError as exc:
            self.problems.report("status.json", "cannot write status.json", exc)
        else:
            self.problems.report("status.json")

    # --- the loop --------------------------------------------------------------------------

    def finished(self) -> bool:
        running = any(t.state is TaskState.RUNNING for t in self.tasks.values())
        if self.draining:
            return not running
        return self.steer.finished_ok() and all_ended(self.queues)

    def exit_code(self) -> int:
        return exit_code(self.tasks, self.queues)

    def on_signal(self, signum: int) -> None:
        """Runs in the signal handler: only flags."""
        set_flags(self, signum)
        if signum == signal.SIGHUP:
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
                    wake = start + self.config.poll
                    self.loop.sleep_until(min(wake, self.clock() + STATUS_LATE_S) if self.status_owed else wake)
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

        self.node.end_all([self.known.get(t.uni_id, {}) for t in running], self.clock)
        for uid in list(self.children):
            self._drop_child(uid)
        now_iso = _iso(self.wall())
        # (one that finished in the grace period keeps its success, collected on restart)
        self.records.stopped({t.uni_id: {"retry_count": t.retry_count, "retry_at": now_iso, "updated_at": now_iso}
                              for t in running})
        for task in running:
            task.state, task.retry_at, task.error_type = TaskState.RETRY, 0.0, "stopped"


