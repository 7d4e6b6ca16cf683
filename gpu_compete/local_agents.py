"""Agents in this process, one per named "node": the coordinator's transport without Ray.

The same face as `cluster.Agents` (`refresh`, `nodes`, `submit`, `gather`, `call`,
`call_all`, `forget`, `alive`, `shutdown_all`), with a thread per node standing in for the
node's actor. Used to test the coordinator's decisions (nodes joining, leaving, agents
dying, a partition) quickly and without a cluster; a node is "removed" with `remove(node)`,
cut off with `cut(node)`.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any, Callable


class LocalAgents:
    def __init__(self, factory: Callable[[str], Any], nodes: list[str]):
        self.factory = factory
        self._wanted = list(nodes)  # the "cluster": nodes alive
        self._agents: dict[str, Any] = {}
        self._pools: dict[str, cf.ThreadPoolExecutor] = {}
        self.dead_agents: set[str] = set()  # nodes whose agent "died" (calls fail) while the node lives
        self.cut_off: set[str] = set()  # nodes alive with their agent whose calls never answer (a partition)

    # --- the cluster, as a test changes it ----------------------------------------------------

    def add(self, node: str) -> None:
        self._wanted.append(node)

    def remove(self, node: str) -> None:
        self._wanted.remove(node)

    def kill_agent(self, node: str) -> None:
        self.dead_agents.add(node)

    def cut(self, node: str) -> None:
        """A partition: the node and its agent live on, but no call reaches it (none answers)."""
        self.cut_off.add(node)

    def heal(self, node: str) -> None:
        self.cut_off.discard(node)

    # --- the transport ------------------------------------------------------------------------

    @property
    def nodes(self) -> list[str]:
        return [n for n in self._agents if n in self._wanted]

    def alive(self) -> set[str]:
        return set(self._wanted)

    def refresh(self) -> list[str]:
        joined = []
        for node in self._wanted:
            if node not in self._agents:
                self.dead_agents.discard(node)
                self._agents[node] = self.factory(node)
                self._pools[node] = cf.ThreadPoolExecutor(2, thread_name_prefix=f"agent-{node}")
                joined.append(node)
        for node in list(self._agents):
            if node not in self._wanted:
                self.forget(node)
        return joined

    def forget(self, node: str) -> None:
        self._agents.pop(node, None)
        pool = self._pools.pop(node, None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, node: str, method: str, *args: Any, **kwargs: Any) -> cf.Future:
        agent, pool = self._agents[node], self._pools[node]
        if node in self.cut_off:
            return cf.Future()  # never reaches the agent, never answers

        def call() -> Any:
            if node in self.dead_agents or node not in self._wanted:
                raise NodeCallError(f"the agent on {node} is gone")
            return getattr(agent, method)(*args, **kwargs)

        return pool.submit(call)

    def gather(self, inflight: dict[str, tuple[Any, float]], wait_s: float) -> list[tuple[str, Any]]:
        futures = {fut: node for node, (fut, _) in inflight.items()}
        if not futures:
            return []
        done, _ = cf.wait(futures, timeout=wait_s, return_when=cf.FIRST_COMPLETED)
        out = []
        for fut in done:
            exc = fut.exception()
            out.append((futures[fut], exc if exc is not None else fut.result()))
        return out

    def call(self, node: str, method: str, *args: Any, timeout: float, **kwargs: Any) -> Any:
        return self.submit(node, method, *args, **kwargs).result(timeout=timeout)

    def call_all(self, method: str, *args: Any, timeout: float, **kwargs: Any) -> dict[str, Any]:
        futures = {node: self.submit(node, method, *args, **kwargs) for node in self.nodes}
        out = {}
        for node, fut in futures.items():
            try:
                out[node] = fut.result(timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - one bad node never stops the others
                out[node] = exc
        return out

    def shutdown_all(self) -> None:
        for node in list(self._agents):
            self.forget(node)


class NodeCallError(Exception):
    pass
