"""The coordinator of a run across a Ray cluster (`gpu-compete run --ray ADDRESS`).

It holds what is global: the queues, the pure policy, the retry budget and the history (the
record of completions, in the state directory where it runs). Everything that touches a
machine is done by that machine's agent (`agent.py`), reached through `cluster.Agents`: a
GPU is named `node/index`, and a plan over every node's GPUs becomes a `launch` call to the
chosen node's agent.

Each agent always has one `observe` call in flight, which returns as soon as a task of that
node ends (or says its processes are gone) or after `--poll` seconds: a GPU that frees on any
node is planned for within milliseconds, and no node is asked more often than it has news.

Between rounds it waits for its agents in slices of `WAIT_SLICE_S`, answering the control
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
from .classify import is_permanent
from .cluster_steering import ClusterSteering
from .commandbook import CommandBook
from .daemon import EXIT_STOPPED, Config, all_ended, exit_code
from .gpus.base import GpuSnapshot, current_user
from .history import History
from .hooks import Hooks
from .observe import Observer
from .outcomes import say_failed
from .placing import explain_waits
from .policy import Placement, build_views, candidates, fits, lease_active, plan_round
from .tasks import Queue, Task, TaskSpec, TaskState, group_queues
from .timefmt import iso
from .wakeloop import WakeLoop, set_flags

log = structlog.get_logger("gpu_compete")
#: Seconds a coordinator waits, beyond --node-timeout, before it runs elsewhere what ran on a
#: node it does not hear from (the node's supervisors end their tasks at --node-timeout).
FENCE_MARGIN_S = 2.0
#: Seconds beyond --poll an agent keeps its node's heartbeat going without a call from the
#: coordinator (its observe calls come once per --poll at the least): past that, a node cut
#: off from a live coordinator lets its tasks' fence run out (Agent.should_beat).
CONTACT_SLACK_S = 2.0
#: Seconds the coordinator waits for its agents at a stretch before it looks at the control
#: socket and at signals (Ray's wait does not end for either).
WAIT_SLICE_S = 0.1


def contact_s(poll: float) -> float:
    return poll + CONTACT_SLACK_S


def split_key(key: str) -> tuple[str, str]:
    node, _, local = key.rpartition("/")
    return node, local


class Coordinator:
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
        # later round (the nodes keep their records: nothing to take out of a registry here).
        self.history = History(config.history, forget=lambda uids: None)
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

    def _wait(self, wait_s: float) -> list[tuple[str, Any]]:
        """The agents' answers that come within `wait_s`: waited for in slices, between which
        control requests are answered and signals seen; a request that changes what may
        start (or a signal) ends the wait, so its round runs at once."""
        deadline = self.clock() + wait_s
        while True:
            remaining = deadline - self.clock()
            if self.inflight:
                results = self.agents.gather(self.inflight, max(0.0, min(remaining, WAIT_SLICE_S)))
                if results:
                    return results
            elif remaining > 0:
                time.sleep(min(remaining, WAIT_SLICE_S))  # no node to hear from: look again later
            if self.loop is not None and self.loop.serve():
                return []
            if self.clock() >= deadline:
                return []

    def _keep_contact(self, slow: str) -> None:
        """After a slow call, a word to every other agent: its heartbeat goes on while it hears
        from us (`Agent.should_beat`), and a round stuck on one node must not let the others'
        tasks be fenced."""
        for node in self.agents.nodes:
            if node != slow:
                try:
                    self.agents.submit(node, "ping")  # not waited for
                except Exception:  # noqa: BLE001 - a node in trouble is found by its observe
                    pass

    def _ask_all(self) -> None:
        """One observe call in flight per node; a node not heard from yet (new, or back) is
        asked not to wait, so its GPUs are planned for at once, not a --poll later."""
        for node in self.agents.nodes:
            if node not in self.inflight:
                expected = [u for u, n in self.where.items() if n == node]
                wait = self.config.poll if node in self.node_snapshots else 0.0
                self.inflight[node] = (self.agents.submit(node, "observe", expected, wait), self.clock())

    def _heard(self, node: str, result: dict[str, Any], now: float) -> None:
        self.node_snapshots[node] = result["snapshots"]
        self.node_ghosts[node] = set(result.get("ghosts", ()))
        self._guard(node, result.get("guard"))
        for uid, how in result["tasks"].items():
            if "record" in how and uid in self.tasks:
                row = how["record"]
                self.records[uid] = {**row, "node": node,
                                     "gpu": f"{node}/{row['gpu']}" if row.get("gpu") is not None else None}
            task = self.tasks.get(uid)
            if task is None or self.where.get(uid) != node:
                if how["state"] == "running" and uid in self.tasks:
                    self._stray(uid, node, now)
                continue
            if how["state"] == "running":
                task.confirmed = task.confirmed or how["confirmed"]
                vram.note_usage(task, how.get("vram") or {}, not self.config.exclusive)
                if how["gone"]:
                    self.gone.add(uid)
            elif how["state"] == "ended":
                self._ended(task, node, how, now)
            else:  # the node knows nothing of it: its agent never started it
                self._failed(task, node, "lost", now, note="its node has no trace of it")

    def _guard(self, node: str, guard: dict[str, str] | None) -> None:
        """A node's host guard (--min-free-ram, --min-free-disk): nothing starts there while it
        holds; said when it starts holding and when it lets go, not every round."""
        was = self.node_guards.pop(node, None)
        if guard:
            self.node_guards[node] = guard
            if was is None:
                log.warning("host guard holds a node; nothing starts there until it clears", node=node,
                            why=guard.get("why"))
        elif was is not None:
            log.info("host guard released; tasks start on the node again", node=node, was=was.get("why"))

    def _joined(self, node: str) -> None:
        """A node with a new agent: one that joined, came back, or whose agent was replaced."""
        if node not in self.seen_nodes:
            self.seen_nodes.add(node)
            log.info("node joined", node=node)
        back = [u for u, n in self.abandoned.items() if n == node]
        if not back:
            return
        try:
            found = self.agents.call(node, "find", back, timeout=self.node_timeout)
        except Exception as exc:  # noqa: BLE001 - a node that fails again is handled next round
            log.warning("returning node did not answer", node=node, error=str(exc))
            return
        now = self.clock()
        for uid in back:
            self.abandoned.pop(uid, None)
            if uid in found:
                self._stray(uid, node, now, found[uid])

    def _stray(self, uid: str, node: str, now: float, info: dict[str, Any] | None = None) -> None:
        """A copy of a task running on a node we had given up on: adopted again if the task
        has not started anywhere since, ended otherwise (never two copies)."""
        task = self.tasks[uid]
        if task.state in (TaskState.PENDING, TaskState.RETRY):
            log.warning("task found still running on a node that came back; adopting it", uni_id=uid, node=node)
            self._adopt(task, node, info or {}, now)
        elif self.where.get(uid) != node:
            log.warning("task found running on a node that came back while it runs or ran elsewhere; "
                        "ending that copy", uni_id=uid, node=node)
            self.agents.submit(node, "kill", [uid])

    def _patience(self) -> float:
        """How long a node may go unheard before its tasks count as lost: how long its agent
        goes on beating without a call (`contact_s`), the --node-timeout, and a margin, so that
        the supervisors' fence (--node-timeout after the node's last heartbeat) has ended the
        old copies before they run elsewhere."""
        return contact_s(self.config.poll) + self.node_timeout + FENCE_MARGIN_S

    def _agent_failed(self, node: str, exc: Exception, asked: float) -> None:
        """A dead agent on a live node is replaced (the next refresh starts a new one, which
        adopts the node's tasks); until the node answers again it is unreachable, and its tasks
        are lost once that has lasted `_patience()`."""
        self.agents.forget(node)
        self.node_snapshots.pop(node, None)
        if node not in self.unreachable:
            log.warning("node not answering; a new agent is asked for while it is alive, and its running tasks "
                        f"count as lost if it is not back within {self.node_timeout:g} s", node=node,
                        error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self.unreachable.setdefault(node, asked)

    def _unreachable(self, node: str, why: str, since: float) -> None:
        self.node_snapshots.pop(node, None)
        if node not in self.unreachable:
            log.warning(f"node unreachable ({why}); its running tasks count as lost if it is not back within "
                        f"{self.node_timeout:g} s", node=node)
        self.unreachable.setdefault(node, since)

    def _node_gone(self, node: str, why: str, now: float) -> None:
        self.node_snapshots.pop(node, None)
        self.node_ghosts.pop(node, None)
        self.node_guards.pop(node, None)
        lost = [t for u, t in self.tasks.items() if self.where.get(u) == node]
        if lost:
            log.error("node gone; its running tasks are lost and run again elsewhere", node=node, why=why,
                      tasks=[t.uni_id for t in lost])
        for task in lost:
            self.abandoned[task.uni_id] = node
            self._failed(task, node, "lost", now, note=why)

    # --- outcomes ---------------------------------------------------------------------------

    def _ended(self, task: Task, node: str, how: dict[str, Any], now: float) -> None:
        by_stop = how.get("error_type") == "stopped" and task.uni_id not in self.steer.killing  # (a kill: _failed)
        if how["outcome"] == "abnormal_exit" and by_stop:
            # Ended on purpose (`stop --kill`, or a `kill` asked of an earlier coordinator): its
            # node's record says so. It runs again, not counted as a failure.
            self.stopped(task, node, now, by="kill or stop --kill")
        elif how["outcome"] == "normal_exit":
            self._release(task)
            task.state, task.error_type = TaskState.COMPLETED, None
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
        permanent = is_permanent(error_type) and not self.config.retry_permanent
        decision = self.config.retry.after_failure(task.retry_count, now, max_retries=task.spec.retries,
                                                   permanent=permanent)
        task.retry_count, task.error_type = decision.retry_count, error_type
        entry = {"uni_id": task.uni_id, "state": "abnormal_exit", "error_type": error_type, "queue": task.spec.queue,
                 "node": node, "gpu": task.gpu, "attempt": decision.retry_count,
                 "exit_status": (how or {}).get("exit_status"), "start": (how or {}).get("started_at"),
                 "end": (how or {}).get("ended_at") or iso(self.wall()), **vram.usage_fields(task)}
        if error_type == "oom":  # the next attempt asks for what this one was seen to use, and more
            entry["vram_gb_needed"] = vram.learn_from_oom(task, self.config.oom_growth, self.snapshots)
        if decision.action == "give_up":
            task.state = TaskState.FAILED
            entry["gave_up"] = True
        else:
            task.state, task.retry_at = TaskState.RETRY, decision.at
        say_failed(task.uni_id, error_type, decision, permanent, now, note, node=node)
        self._append(entry)

    def _release(self, task: Task) -> None:
        self.where.pop(task.uni_id, None)
        self.gone.discard(task.uni_id)

    def _append(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)

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
        log.info("task started", uni_id=task.uni_id, queue=task.spec.queue, gpu=task.gpu, attempt=attempt)

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
