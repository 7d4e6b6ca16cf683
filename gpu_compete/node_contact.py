"""How the coordinator hears from its nodes: one `observe` call in flight per node, answers
waited for in slices (the control socket and signals are seen in between), and what a node's
silence means: unreachable, then gone, its running tasks lost and run elsewhere; a node that
comes back has a task still running there adopted again, or ended when it runs elsewhere now.

A mixin of `Coordinator` (its state lives there); split out so each piece stays small.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from . import vram
from .tasks import TaskState

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


class NodeContact:
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
                forget = self.forgettable.pop(node, None)
                self.inflight[node] = (self.agents.submit(node, "observe", expected, wait, forget), self.clock())

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
