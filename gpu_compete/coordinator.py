"""The coordinator of a run across a Ray cluster (`gpu-compete run --ray ADDRESS`).

It holds what is global: the queues, the pure policy, the retry budget and the history (the
record of completions, in the state directory where it runs). Everything that touches a
machine is done by that machine's agent (`agent.py`), reached through `cluster.Agents`: a
GPU is named `node/index`, and a plan over every node's GPUs becomes a `launch` call to the
chosen node's agent.

Each agent always has one `observe` call in flight, which returns as soon as a task of that
node ends (or says its processes are gone) or after `--poll` seconds: a GPU that frees on any
node is planned for within milliseconds, and no node is asked more often than it has news.

Between rounds it waits for its agents in slices of `node_contact.WAIT_SLICE_S`, answering the control
socket (`cluster_steering`) and seeing signals in between: Ray's wait ends for neither.

Failures: an agent that dies while its node lives is started again at once and adopts its
tasks (they run under their own supervisors, not under the agent). A node that leaves the
cluster, or whose agent does not answer for `--node-timeout` seconds, has its running tasks
counted lost and retried elsewhere; if it comes back with one still running, that copy is
adopted again when the task has not started elsewhere yet, and ended otherwise, so nothing
runs twice.
"""

from __future__ import annotations

import json
import random
import signal
import time
from typing import Any, Callable

import structlog

from . import journal, status, vram
from .cluster_outcomes import ClusterOutcomes
from .cluster_steering import ClusterSteering
from .commandbook import CommandBook
from .daemon import EXIT_STOPPED, Config, all_ended, exit_code
from .gpus.base import GpuSnapshot, current_user
from .history import History
from .hooks import Hooks
from .node_contact import NodeContact
from .observe import Observer
from .placing import explain_waits
from .policy import Placement, build_views, candidates, fits, lease_active, plan_round
from .tasks import Queue, Task, TaskSpec, TaskState, group_queues
from .wakeloop import WakeLoop, set_flags

log = structlog.get_logger("gpu_compete")


def split_key(key: str) -> tuple[str, str]:
    node, _, local = key.rpartition("/")
    return node, local


class Coordinator(NodeContact, ClusterOutcomes):
    def __init__(self, config: Config, specs: list[TaskSpec], agents: Any, *, node_timeout: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 rng: random.Random | None = None, out: Callable[[str], None] = print,
                 book: CommandBook | None = None, follow: bool = False):
        """`book`: the command file, followed as on one machine (edits apply within a round,
        SIGHUP reads it at once); `follow`: wait for more work once everything has ended."""
        self.config, self.agents, self.node_timeout = config, agents, node_timeout
        self.clock, self.wall = clock, wall
        self.rng = rng or random.Random(config.seed)
        self.out = out
        self.user = current_user()
        self.queues = {q: Queue(Task(s) for s in ss) for q, ss in group_queues(specs).items()}
        self.tasks: dict[str, Task] = {t.uni_id: t for q in self.queues.values() for t in q}
        self.where: dict[str, str] = {}  # running task -> its node
        self.gone: set[str] = set()  # running tasks whose processes have ended (GPU free)
        self.abandoned: dict[str, str] = {}  # task counted lost with its node -> that node
        self.node_snapshots: dict[str, list[GpuSnapshot]] = {}
        self.inflight: dict[str, tuple[Any, float]] = {}  # node -> (its observe call, when asked)
        self.unreachable: dict[str, float] = {}  # node not heard from -> since when (its last ask)
        self.seen_nodes: set[str] = set()
        self.node_ghosts: dict[str, set[int]] = {}  # pids of ended tasks each agent says not to count
        self.node_guards: dict[str, dict[str, str]] = {}  # node whose host guard holds -> {why, since}
        self._told_too_large: set[str] = set()  # heads said (once) to fit no GPU of any node
        self.waiting_why: dict[str, str] = {}
        self.records: dict[str, dict[str, Any]] = {}  # uid -> its registry record, as its node last said
        # The record of completions; a success line the disk refuses is kept and written with a
        # later round, and only then does the task's record leave its node's registry.
        self.completed_on: dict[str, str] = {}  # success not yet in the history -> its node
        self.forgettable: dict[str, list[str]] = {}  # node -> successes in the history, to leave its registry
        self.history = History(config.history, forget=self._forget_completed)
        self.draining = self.force = self.status_requested = False
        self.next_status = 0.0
        self.steer = ClusterSteering(self, book, follow)  # reloads and control requests
        self.loop: WakeLoop | None = None
        hooks = Hooks(config.on_event, config.hook_timeout, config.state_dir / "hooks.log") if config.on_event else None
        self.observer = Observer(config.history, hooks, clock, wall)  # --on-event, and what status adds

    @property
    def snapshots(self) -> list[GpuSnapshot]:
        return [s for snaps in self.node_snapshots.values() for s in snaps]

    # --- start-up ---------------------------------------------------------------------------

    def resume(self) -> None:
        """Completions and give-ups from the history; tasks an earlier coordinator started and
        that still run (or ended unseen) are found on their nodes and adopted."""
        past = list(journal.entries(self.config.history)) if self.config.history.exists() else []
        done = set() if self.config.fresh else journal.completed(past)
        gave_up = {} if self.config.fresh else journal.failed_for_good(past)
        for entry in past if not self.config.fresh else ():
            task = self.tasks.get(entry.get("uni_id"))
            if task is not None and entry.get("state") == "abnormal_exit":
                task.retry_count = max(task.retry_count, int(entry.get("attempt") or 0))
                vram.restore(task, {"vram_gb_needed": entry.get("vram_gb_needed")}, fresh=False)
            elif task is not None and entry.get("state") == "retried":  # `retry`: a fresh budget
                task.retry_count = 0
        self.history.journaled = set(done)
        for uid, task in self.tasks.items():
            if uid in done:
                task.state = TaskState.COMPLETED
            elif uid in gave_up:
                task.state, task.error_type = TaskState.FAILED, gave_up[uid].get("error_type")
        self.steer.restore()  # skips
        self._restore_records()
        stops = {(e.get("uni_id"), e.get("attempt")) for e in past if e.get("state") == "stopped"}
        self.agents.refresh()
        open_ = [u for u, t in self.tasks.items() if t.state not in (TaskState.COMPLETED, TaskState.FAILED)]
        found = self.agents.call_all("find", open_, timeout=self.node_timeout)
        now = self.clock()
        best: dict[str, tuple[int, str, dict[str, Any]]] = {}
        for node, result in found.items():
            if isinstance(result, Exception):
                log.warning("node did not answer at start-up", node=node, error=str(result))
                continue
            for uid, info in result.items():
                attempt = info.get("attempt") if isinstance(info.get("attempt"), int) else 0
                if info.get("state") != "running" and (
                        attempt <= self.tasks[uid].retry_count or self.tasks[uid].state is TaskState.SKIPPED
                        or (info.get("error_type") == "stopped" and (uid, attempt) in stops)):
                    continue  # an ending the history already holds (a failure counted, a copy lost, a stop)
                if uid not in best or attempt > best[uid][0]:
                    best[uid] = (attempt, node, info)
        # Running or ended unseen: adopted, and the node's next answer says which.
        for uid, (_, node, info) in best.items():
            self._adopt(self.tasks[uid], node, info, now)

    def _restore_records(self) -> None:
        """The nodes' records as the coordinator before this one last showed them (a node
        reports a task's record only while it runs or as it ends): `status` keeps listing them."""
        try:
            rows = json.loads((self.config.state_dir / "status.json").read_text()).get("registry") or []
        except (OSError, ValueError, AttributeError):
            return
        for row in rows:
            if isinstance(row, dict) and row.get("uni_id") in self.tasks:
                self.records[row["uni_id"]] = {k: v for k, v in row.items() if k != "uni_id"}

    def _adopt(self, task: Task, node: str, info: dict[str, Any], now: float) -> None:
        task.state, task.adopted, task.launched_at, task.confirmed = TaskState.RUNNING, True, now, False
        task.gpu = f"{node}/{info.get('gpu')}" if info.get("gpu") is not None else None
        vram.restore(task, {"peak_vram_gb": info.get("peak_vram_gb")}, False)  # as its node recorded it
        self.where[task.uni_id] = node
        if info.get("state", "running") == "running":
            log.info("adopted running task", uni_id=task.uni_id, node=node, gpu=task.gpu)
        else:  # its node's next answer says how it ended
            log.info("found a task that ended while no coordinator watched", uni_id=task.uni_id, node=node)

    def dry_run(self) -> str:
        """Queues, expanded commands, and where the heads would start now on which node;
        launches nothing (the history is read, the agents are asked, nothing is written)."""
        self.resume()
        now = self.clock()
        for node, result in self.agents.call_all("snapshot", timeout=self.node_timeout).items():
            if isinstance(result, Exception):
                log.warning("node did not answer; left out of the plan", node=node, error=str(result))
            else:
                self.node_snapshots[node] = result
        views = self._views(now)
        plan = [launch for launch in plan_round(candidates(self.queues, now), views, self.rng, self.config.exclusive,
                                                self.config.pick)
                if len({split_key(k)[0] for k in launch.gpus}) == 1]
        return status.render_dry_run(self, views, {launch.uni_id: ",".join(launch.gpus) for launch in plan},
                                     {launch.uni_id: ",".join(split_key(k)[1] for k in launch.gpus) for launch in plan})

    # --- one round --------------------------------------------------------------------------

    def tick(self, wait_s: float) -> None:
        """Hear from the agents (waiting up to `wait_s` for news), then plan and launch."""
        self.history.flush()  # success lines a failing disk refused before
        self.steer.before_round(self.clock())
        now = self.clock()
        for node in self.agents.refresh():
            self._joined(node)
        for node in (set(self.inflight) | set(self.node_snapshots) | set(self.where.values())) - set(self.agents.nodes):
            asked = self.inflight.pop(node, (None, now))[1]
            self._unreachable(node, "its node left the cluster", asked)
        self._ask_all()
        for node, result in self._wait(wait_s):
            _, asked = self.inflight.pop(node)
            if isinstance(result, Exception):
                self._agent_failed(node, result, asked)
            else:
                if self.unreachable.pop(node, None) is not None:
                    log.info("node answering again", node=node)
                self._heard(node, result, self.clock())
        now = self.clock()
        for node, (_, asked) in list(self.inflight.items()):
            if now - asked > self._patience():
                self.inflight.pop(node)
                self.agents.forget(node)
                self._unreachable(node, f"its agent did not answer for {self.node_timeout:g} s", asked)
        for node, since in list(self.unreachable.items()):
            if now - since > self._patience():
                del self.unreachable[node]
                self._node_gone(node, f"not heard from for {now - since:.0f} s", now)
        self.steer.after_collect(now)
        if not self.draining and not self.force:
            self._plan_and_launch(now)
        self._write_status()

    # --- planning ---------------------------------------------------------------------------

    def placements(self, now: float) -> list[Placement]:
        return [Placement(key, t.need_bytes, lease_active(t, now, self.config.settle))
                for t in self.tasks.values() if t.state is TaskState.RUNNING and t.uni_id not in self.gone
                for key in t.gpu_keys]

    def _plan_and_launch(self, now: float) -> None:
        cands = self.steer.allowed(candidates(self.queues, now))
        if not cands or not self.node_snapshots:
            self.waiting_why = {}
            return
        if set(self.node_snapshots) <= set(self.node_guards):
            held = "; ".join(f"{n}: {g.get('why')}" for n, g in sorted(self.node_guards.items()))
            self.waiting_why = {c.uni_id: f"host guard holds every node ({held})" for c in cands}
            return
        if any(vram.cap_need(self.tasks[c.uni_id], self.snapshots) for c in cands):
            cands = self.steer.allowed(candidates(self.queues, now))  # with the needs brought down
        views = self._views(now)
        smallest = min(c.vram_bytes for c in cands)
        self.observer.planning(v.key for v in views if fits(v, smallest, self.config.exclusive))
        snaps = {s.key: s for s in self.snapshots}
        plan = plan_round(cands, views, self.rng, self.config.exclusive, self.config.pick)
        placed = set()
        for launch in plan:
            nodes = {split_key(k)[0] for k in launch.gpus}
            if len(nodes) != 1:
                continue  # a gpus=N task across nodes: not placed (it waits for N on one node)
            self._launch(self.tasks[launch.uni_id], nodes.pop(), [snaps[k] for k in launch.gpus], now)
            placed.add(launch.uni_id)
        self.waiting_why = explain_waits(cands, placed, self.snapshots, self.config.exclusive, self._told_too_large)

    def _views(self, now: float) -> list:
        placements = self.placements(now)
        views = []
        for node, snaps in self.node_snapshots.items():  # pids mean something on their own node only
            if node in self.node_guards:
                continue  # its host guard holds
            views += build_views(snaps, placements, self.user, ignored=self.node_ghosts.get(node, ()),
                                 topology={s.key: f"{node}/{s.group or ''}" for s in snaps})  # gpus=N: one node
        return views

    def _launch(self, task: Task, node: str, snaps: list[GpuSnapshot], now: float) -> None:
        attempt = task.retry_count + 1
        keys = [split_key(s.key)[1] for s in snaps]
        timeout = task.spec.timeout_s if task.spec.timeout_s is not None else self.config.timeout_s
        asked = self.clock()
        try:
            self.agents.call(node, "launch", task.spec, keys, [s.cuda_visible for s in snaps], attempt,
                             task.retry_count, timeout, timeout=self.node_timeout)
        except TimeoutError as exc:
            # No answer: the task may have started there (the call can still arrive). It counts
            # as running on that node, unconfirmed, until the node says: its next observe
            # (unknown to it: lost and retried) or its loss (the fence ends any copy first).
            log.error("no answer to a launch; the task counts as running there until the node says",
                      uni_id=task.uni_id, node=node, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - refused or gone: it did not start
            log.error("cannot start task", uni_id=task.uni_id, node=node, error=str(exc))
            return
        finally:
            if self.clock() - asked > 1.0:
                self._keep_contact(node)
        task.state, task.gpu, task.launched_at, task.confirmed, task.adopted = (
            TaskState.RUNNING, snaps[0].key, now, False, False)
        task.gpus = tuple(s.key for s in snaps) if len(snaps) > 1 else ()
        task.peak_vram_bytes, task.peak_gpu, task.peak_written = None, None, 0
        self.where[task.uni_id] = node
        log.info("task started", uni_id=task.uni_id, queue=task.spec.queue, gpu=task.gpu, attempt=attempt,
                 **({"gpus": list(task.gpus)} if task.gpus else {}))

    # --- status and the loop ----------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        scene = status.Scene(self.wall(), self.config.exclusive, self.config.settle, self.user, self.queues,
                             self.snapshots, (), self.draining, self.force, waiting_why=self.waiting_why)
        view = self.observer.annotate(status.build(scene, self.clock(), {}))
        view["cluster"] = {"nodes": sorted(self.agents.nodes), "unreachable": sorted(self.unreachable),
                           "host_guards": dict(sorted(self.node_guards.items()))}
        self.steer.view(view)
        view["registry"] = [{"uni_id": u, **r} for u, r in sorted(self.records.items()) if u in self.tasks]
        return view

    def _write_status(self, ending: int | None = None) -> None:
        view = self.view()
        self.observer.publish(view, ending)  # events for hooks, the idle counter; once a round
        try:
            status.write_json(self.config.state_dir / "status.json", view)
        except OSError as exc:
            log.warning("cannot write status.json", error=str(exc))

    def _heard_from_all(self) -> bool:
        """Every node has answered once, or is known not to: the first status shows them all."""
        return all(n in self.node_snapshots or n in self.unreachable for n in self.agents.nodes)

    def finished(self) -> bool:
        if self.draining:
            return not any(t.state is TaskState.RUNNING for t in self.tasks.values())
        return self.steer.finished_ok() and all_ended(self.queues)

    def exit_code(self) -> int:
        return exit_code(self.tasks, self.queues)

    def on_signal(self, signum: int) -> None:
        set_flags(self, signum)
        if signum == signal.SIGHUP:
            self.steer.reload_requested = True

    def run(self) -> int:
        self.loop = WakeLoop(self.on_signal, self.clock)
        with self.loop:
            self.steer.open(self.loop)
            try:
                self._rounds()
                self._forget_now()
            finally:
                self.steer.close()
        self._write_status(ending=self.exit_code())
        self.out(status.render(self.view()))
        if self.exit_code() == EXIT_STOPPED:
            log.warning("stopped before every task completed; run the same command again to resume "
                        "(completed tasks are skipped, live ones adopted)")
        return self.exit_code()

    def _rounds(self) -> None:
        was_draining = False
        while True:
            self.tick(self.config.poll)
            if self.draining and not self.force and not was_draining:
                was_draining = True
                log.warning("draining: nothing new starts; waiting for running tasks (signal again or "
                            "`gpu-compete stop --kill` to end them)",
                            running=sum(t.state is TaskState.RUNNING for t in self.tasks.values()))
            if self.status_requested or (self.config.status_every > 0 and self.clock() >= self.next_status
                                         and self._heard_from_all()):
                self.status_requested = False
                self.next_status = self.clock() + self.config.status_every
                self.out(status.render(self.view()))
            if self.force:
                self.kill_all()
                return
            if self.finished():
                return

    def kill_all(self) -> None:
        """`stop --kill`: each node ends its running tasks and records them as stopped, so a
        restart runs them again without counting a failure."""
        running = [u for u, t in self.tasks.items() if t.state is TaskState.RUNNING]
        log.warning("ending running tasks", count=len(running))
        for node in {self.where[u] for u in running if u in self.where}:
            try:
                self.agents.call(node, "kill", [u for u in running if self.where.get(u) == node], True,
                                 timeout=self.config.kill_grace + 5 + self.node_timeout)
            except Exception as exc:  # noqa: BLE001 - its fence ends them if the node is gone
                log.error("cannot end tasks on node", node=node, error=str(exc))
        for uid in running:
            self._release(self.tasks[uid])
            self.tasks[uid].state = TaskState.RETRY

    def nothing_running(self) -> bool:
        return not any(t.state is TaskState.RUNNING for t in self.tasks.values())
