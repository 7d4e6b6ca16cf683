"""A real Ray cluster on this machine: every node a `ray.cluster_utils.Cluster` node on
127.0.0.1, named by its `gpu-compete-node` label (n0 is the head, then n1, n2, ...).

Each node's processes inherit the environment of the moment it is added, so `add(env=...)`
gives one node a variable the others lack (how a test sees that agents keep the node's
environment). Measured on 2 cores (Ray 2.60): 2 nodes come up in 2.8 s, 3 in 3.9-4.0 s (the
head about 1.7 s, each further node 1.1 s); either tears down in 1.1 s.

Tests that need it take the `ray_cluster` fixture (module-scoped: one cluster per test module,
3 nodes, the driver connected with `cluster.connect`); they are skipped without Ray.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

MB = 1024 * 1024
NODE_ARGS = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 80 * MB}


class LocalCluster:
    def __init__(self, n_nodes: int = 3, envs: dict[str, dict[str, str | None]] | None = None):
        # Loopback only: without this Ray swaps 127.0.0.1 for the machine's own address. Ray
        # reads the variable when imported (and its processes read it): set both.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        from ray._private import ray_constants
        from ray.cluster_utils import Cluster

        ray_constants.ENABLE_RAY_CLUSTER = False

        self.envs = envs or {}
        self.nodes: dict[str, Any] = {}  # label -> ray._private.node.Node
        with _environ(self.envs.get("n0", {})):
            self.cluster = Cluster(initialize_head=True, head_node_args={
                **NODE_ARGS, "labels": {"gpu-compete-node": "n0"}, "include_dashboard": False})
        self.nodes["n0"] = self.cluster.head_node
        for i in range(1, n_nodes):
            self.add(f"n{i}")

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, name: str, env: dict[str, str | None] | None = None, label: str | None = None) -> Any:
        """Start a node labelled `label` (default: `name`), known here as `name`; `env` (None:
        unset) is what its processes see on top of ours."""
        with _environ(env if env is not None else self.envs.get(name, {})):
            node = self.cluster.add_node(**NODE_ARGS, labels={"gpu-compete-node": label or name})
        self.nodes[name] = node
        return node

    def remove(self, name: str) -> None:
        self.cluster.remove_node(self.nodes.pop(name))

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


class _environ:
    """Set (value) or unset (None) variables for the duration of a `with`."""

    def __init__(self, changes: dict[str, str | None]):
        self.changes, self.saved = changes, {k: os.environ.get(k) for k in changes}

    def __enter__(self) -> None:
        _apply(self.changes)

    def __exit__(self, *exc: object) -> None:
        _apply(self.saved)


def _apply(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def ray_cluster():
    """Three nodes n0 (head), n1, n2. n2's processes see CUDA_VISIBLE_DEVICES=3, the others none;
    n1 runs with RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1: what Ray did by default before
    ray-project/ray#62492 (a zero-GPU actor gets CUDA_VISIBLE_DEVICES="")."""
    pytest.importorskip("ray")
    from gpu_compete import cluster as glue

    saved = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "CUDA_VISIBLE_DEVICES",
                                            "OMP_NUM_THREADS", "RAY_ADDRESS")}
    _apply({"CUDA_VISIBLE_DEVICES": None, "OMP_NUM_THREADS": None, "RAY_ADDRESS": None})
    local = LocalCluster(3, envs={"n1": {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"},
                                   "n2": {"CUDA_VISIBLE_DEVICES": "3"}})
    try:
        glue.connect(local.address)
        yield local
    finally:
        local.shutdown()
        _apply(saved)
