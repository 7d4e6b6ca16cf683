"""A stand-in for the node agent in the Ray tests: says where it runs and what it sees."""

from __future__ import annotations

import os
import time
from typing import Any


class EchoAgent:
    def __init__(self, node: str, **kwargs: Any):
        self.node, self.kwargs, self.born = node, kwargs, time.time()

    def whoami(self) -> dict[str, Any]:
        import ray

        return {"node": self.node, "pid": os.getpid(), "born": self.born, "kwargs": self.kwargs,
                "node_id": ray.get_runtime_context().get_node_id(),
                "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
                                                        "PYTHONBREAKPOINT", "HIP_VISIBLE_DEVICES")}}

    def slow_on(self, node: str, seconds: float) -> str:
        if node == self.node:
            time.sleep(seconds)
        return self.node

    def fail(self) -> None:
        raise ValueError(f"no luck on {self.node}")

    def exit(self) -> None:
        os._exit(3)
