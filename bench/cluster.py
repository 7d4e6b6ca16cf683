"""Cluster benchmark: `gpu-compete run --ray` on a local Ray cluster, beside one machine.

Default workload: 3 nodes x 4 simulated GPUs, 24 queues x 3 tasks of 1.5 s (0.3 s simulated
start-up), so the ideal makespan is 6 x 1.5 = 9 s. Prints:

- makespan / ideal across the cluster, and the same workload on one machine with 12 GPUs;
- the time from a GPU freeing on a node (its task's last line) to the next task's first line
  there: median and worst;
- the coordinator's round time with 10,000 tasks over 48 GPUs (12 nodes x 4), agents answering
  at once (in-process stand-ins), so that the figure is the coordinator's own work.

    python bench/cluster.py                  # all three
    python bench/cluster.py --skip-ray       # the round time and the one-machine figure only

Needs `pip install 'gpu-compete[ray]'`; the nodes are Ray nodes on 127.0.0.1 (ray.cluster_utils).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from makespan import gpu_compete  # noqa: E402

TASK = r"""#!/bin/bash
here=$(cd "$(dirname "$0")" && pwd)
echo "start $1 ${GPU_COMPETE_NODE:-local}/$CUDA_VISIBLE_DEVICES $(date +%s.%N)" >> "$here/events"
sleep "$2"
echo "end $1 ${GPU_COMPETE_NODE:-local}/$CUDA_VISIBLE_DEVICES $(date +%s.%N)" >> "$here/events"
"""


def run_workload(args: argparse.Namespace, gpus_per_node: int, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="gc-cluster-") as tmp:
        work = Path(tmp)
        (work / "task.sh").write_text(TASK)
        lines = []
        for q in range(args.queues):
            for _ in range(args.tasks):
                lines += [f"bash {{work_dir}}/task.sh {{uni_id}} {args.seconds}", f"{q},16", ""]
        (work / "command.txt").write_text("\n".join(lines))
        argv = [gpu_compete(), "run", "--commands", str(work / "command.txt"), "--work-dir", str(work),
                "--state-dir", str(work / "state"), "--simulate", f"{gpus_per_node}x24,delay={args.startup},linger=0.5",
                "--poll", "5", "--status-every", "0", "--seed", "1", "--log-format", "json", *extra]
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"gpu-compete failed ({done.returncode}):\n{done.stderr[-3000:]}")
        per_gpu: dict[str, list[tuple[float, float]]] = defaultdict(list)
        open_: dict[str, tuple[str, float]] = {}
        for line in (work / "events").read_text().splitlines():
            kind, uid, gpu, t = line.split()
            if kind == "start":
                open_[uid] = (gpu, float(t))
            else:
                g, s = open_.pop(uid)
                per_gpu[g].append((s, float(t)))
    runs = [r for rs in per_gpu.values() for r in rs]
    gaps = []
    for rs in per_gpu.values():
        rs.sort()
        gaps += [b[0] - a[1] for a, b in zip(rs, rs[1:])]
    total_gpus = args.nodes * args.gpus_per_node
    ideal = max(args.tasks, -(-args.queues * args.tasks // total_gpus)) * args.seconds
    makespan = max(e for _, e in runs) - min(s for s, _ in runs)
    return {"ratio": makespan / ideal, "makespan": makespan, "ideal": ideal, "gap": statistics.median(gaps),
            "worst": max(gaps), "gpus": len(per_gpu)}


def cluster_run(args: argparse.Namespace) -> dict[str, float]:
    from tests.ray_harness import LocalCluster

    os.environ.pop("RAY_ADDRESS", None)
    cluster = LocalCluster(args.nodes)
    try:
        return run_workload(args, args.gpus_per_node, ["--ray", cluster.address, "--node-timeout", "30"])
    finally:
        cluster.shutdown()


def round_time(tasks: int, nodes: int, gpus: int) -> tuple[float, float]:
    """Mean and worst coordinator round, every running task ending each round."""
    from gpu_compete.coordinator import Coordinator
    from gpu_compete.daemon import Config
    from gpu_compete.gpus.base import GpuSnapshot
    from gpu_compete.tasks import TaskSpec, make_uni_id

    class InstantAgents:
        """Answers at once: each node's GPUs are free, every task launched there has ended."""

        def __init__(self) -> None:
            self.nodes = [f"n{i}" for i in range(nodes)]
            self.launched: dict[str, list[str]] = defaultdict(list)

        def refresh(self) -> list[str]:
            return []

        def alive(self) -> set[str]:
            return set(self.nodes)

        def submit(self, node: str, method: str, *args):
            ended = {u: {"state": "ended", "outcome": "normal_exit", "exit_status": 0} for u in self.launched.pop(node, [])}
            snaps = [GpuSnapshot(index=i, uuid=f"{node}-{i}", name="sim", total_bytes=24 << 30, used_bytes=0,
                                 free_bytes=24 << 30, key=f"{node}/{i}") for i in range(gpus)]
            return {"node": node, "snapshots": snaps, "tasks": ended}

        def gather(self, inflight, wait_s):
            return [(node, result) for node, (result, _) in inflight.items()]

        def call(self, node, method, spec, *args, timeout):
            self.launched[node].append(spec.uni_id)

        def call_all(self, method, *args, timeout):
            return {n: {} for n in self.nodes}

    specs = []
    for q in range(tasks // 10):
        for i in range(10):
            commands = (f"train.py --q {q} --i {i}",)
            specs.append(TaskSpec(queue=str(q), position=i + 1, commands=commands, vram_gb=8, line=1,
                                  uni_id=make_uni_id(str(q), commands)))
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(work_dir=Path(tmp), state_dir=Path(tmp), registry=Path(tmp) / "r.json", status_every=0)
        c = Coordinator(config, specs, InstantAgents(), rng=random.Random(1), out=lambda _: None)
        c.resume()
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            c.tick(0)
            times.append(time.perf_counter() - t0)
    return statistics.mean(times[1:]), max(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--gpus-per-node", type=int, default=4)
    parser.add_argument("--queues", type=int, default=24)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--startup", type=float, default=0.3)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    mean, worst = round_time(10_000, 12, 4)
    print(f"coordinator round, 10,000 tasks over 48 GPUs (12 nodes x 4): mean {mean * 1000:.1f} ms, "
          f"worst {worst * 1000:.1f} ms")
    total = args.nodes * args.gpus_per_node
    print(f"{args.queues} queues x {args.tasks} tasks of {args.seconds} s, {args.startup} s start-up")
    print(f"{'where':28} {'makespan':>9} {'ideal':>6} {'ratio':>6} {'median gap':>11} {'worst gap':>10}")
    rows = [(f"one machine, {total} GPUs", lambda: run_workload(args, total, []))]
    if not args.skip_ray:
        rows.append((f"Ray, {args.nodes} nodes x {args.gpus_per_node} GPUs", lambda: cluster_run(args)))
    for name, fn in rows:
        r = fn()
        print(f"{name:28} {r['makespan']:>8.2f}s {r['ideal']:>5.1f}s {r['ratio']:>6.3f} {r['gap']:>10.3f}s "
              f"{r['worst']:>9.3f}s")


if __name__ == "__main__":
    main()
