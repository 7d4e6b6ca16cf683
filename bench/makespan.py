"""Makespan benchmark: the real daemon on simulated GPUs, against the ideal schedule.

Default workload: 8 GPUs, 16 queues x 3 tasks of 1.5 s, 0.3 s simulated start-up, so the
ideal makespan is 6 x 1.5 = 9 s. Prints, for `--pick longest` and `--pick random`:

- makespan / ideal, with makespan from the first task's start to the last task's end as the
  tasks themselves saw it (the daemon's own start-up is reported separately);
- the median idle gap of a GPU between two of its tasks.

    python bench/makespan.py                       # the default workload, 3 seeds each
    python bench/makespan.py --fail-rate 0.1 --startup 2   # 10 % failing attempts, 2 s start-up

`BENCH_KEEP=DIR` keeps each run's work directory and the daemon's JSON log under DIR (how an
outlier is looked into).

Failing attempts (exit 1 after running their full time) are retried by the daemon; the ideal
then counts their time too: ideal = max(longest queue's work, total work / GPUs).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

TASK = r"""#!/bin/bash
# task.sh UNI_ID SECONDS FAIL_FIRST_N
here=$(cd "$(dirname "$0")" && pwd)
echo "start $1 $CUDA_VISIBLE_DEVICES $(date +%s.%N)" >> "$here/events"
sleep "$2"
count_file="$here/count-$1"
n=$(( $(cat "$count_file" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$count_file"
echo "end $1 $CUDA_VISIBLE_DEVICES $(date +%s.%N)" >> "$here/events"
[ "$n" -gt "$3" ]
"""


def gpu_compete() -> str:
    found = shutil.which("gpu-compete", path=os.path.dirname(sys.executable)) or shutil.which("gpu-compete")
    if not found:
        sys.exit("gpu-compete is not installed: pip install -e .")
    return found


def workload(rng: random.Random, queues: int, tasks: int, fail_rate: float) -> list[list[int]]:
    """For each queue, each task's number of failing attempts before it succeeds."""
    plan = []
    for _ in range(queues):
        row = []
        for _ in range(tasks):
            fails = 0
            while rng.random() < fail_rate:
                fails += 1
            row.append(fails)
        plan.append(row)
    return plan


def ideal(plan: list[list[int]], seconds: float, gpus: int) -> float:
    attempts = [sum(f + 1 for f in row) for row in plan]
    return max(max(attempts) * seconds, math.ceil(sum(attempts) / gpus) * seconds)


def run_once(pick: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(seed)
    plan = workload(rng, args.queues, args.tasks, args.fail_rate)
    with tempfile.TemporaryDirectory(prefix="gc-bench-") as tmp:
        work = Path(tmp)
        (work / "task.sh").write_text(TASK)
        lines = []
        for q, row in enumerate(plan):
            for fails in row:
                lines += [f"bash {{work_dir}}/task.sh {{uni_id}} {args.seconds} {fails}", f"{q},{args.vram:g}", ""]
        (work / "command.txt").write_text("\n".join(lines))
        argv = [gpu_compete(), "run", "--commands", str(work / "command.txt"), "--work-dir", str(work),
                "--state-dir", str(work / "state"), "--simulate", f"{args.gpus}x24,delay={args.startup},linger={args.linger}",
                "--shared" if args.shared else "--exclusive",
                "--pick", pick, "--seed", str(seed), "--poll", str(args.poll), "--status-every", "0",
                "--retry-burst", "1000", "--log-format", "json"]
        began = time.time()
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"daemon failed ({done.returncode}):\n{done.stderr[-2000:]}")
        if os.environ.get("BENCH_KEEP"):
            keep = Path(os.environ["BENCH_KEEP"]) / f"{pick}-{seed}"
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(work, keep, ignore=shutil.ignore_patterns("*.sock"))
            (keep / "daemon.log").write_text(done.stderr)
        starts, ends, per_gpu = [], [], defaultdict(list)
        open_: dict[str, tuple[str, float]] = {}
        for line in (work / "events").read_text().splitlines():
            kind, uid, gpu, t = line.split()
            if kind == "start":
                open_[uid] = (gpu, float(t))
                starts.append(float(t))
            else:
                g, s = open_.pop(uid)
                per_gpu[g].append((s, float(t)))
                ends.append(float(t))
    gaps = []
    for gpu, runs in sorted(per_gpu.items()):
        runs.sort()
        gaps += [b[0] - a[1] for a, b in zip(runs, runs[1:])]
        if args.verbose:
            t0 = min(starts)
            print(f"   GPU {gpu}: " + " ".join(f"[{s - t0:.2f}-{e - t0:.2f}]" for s, e in runs))
    best = ideal(plan, args.seconds, args.gpus)
    makespan = max(ends) - min(starts)
    return {"ratio": makespan / best, "makespan": makespan, "ideal": best, "gap": statistics.median(gaps),
            "worst_gap": max(gaps),
            "startup": min(starts) - began, "attempts": len(starts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--queues", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=3, help="tasks per queue")
    parser.add_argument("--seconds", type=float, default=1.5, help="length of one task")
    parser.add_argument("--startup", type=float, default=0.3, help="simulated CUDA start-up delay")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="chance that an attempt fails")
    parser.add_argument("--poll", type=float, default=5.0, help="the daemon's --poll (exits wake it anyway)")
    parser.add_argument("--linger", type=float, default=0.5,
                        help="seconds an exited process is still listed by the (simulated) NVML")
    parser.add_argument("--shared", action="store_true", help="run the daemon with --shared")
    parser.add_argument("--vram", type=float, default=16,
                        help="GB each task declares (24 GB GPUs: 16 lets one task at a time fit, in both modes)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--picks", default="longest,random")
    parser.add_argument("--verbose", action="store_true", help="print every GPU's timeline")
    args = parser.parse_args()
    print(f"{args.gpus} GPUs, {args.queues} queues x {args.tasks} tasks of {args.seconds} s, "
          f"{args.startup} s start-up, exited processes listed {args.linger} s more, "
          f"{args.fail_rate:.0%} failing attempts, --poll {args.poll}, {'shared' if args.shared else 'exclusive'}")
    print(f"{'pick':8} {'seed':>4} {'makespan':>9} {'ideal':>6} {'ratio':>6} {'median gap':>11} {'worst gap':>10} "
          f"{'daemon start':>13}")
    for pick in args.picks.split(","):
        results = []
        for seed in range(1, args.seeds + 1):
            r = run_once(pick, seed, args)
            results.append(r)
            print(f"{pick:8} {seed:>4} {r['makespan']:>8.2f}s {r['ideal']:>5.1f}s {r['ratio']:>6.3f} "
                  f"{r['gap']:>10.3f}s {r['worst_gap']:>9.3f}s {r['startup']:>12.2f}s")
        print(f"{pick:8} mean ratio {statistics.mean(r['ratio'] for r in results):.3f}, "
              f"median gap {statistics.median(r['gap'] for r in results):.3f} s, "
              f"worst gap {max(r['worst_gap'] for r in results):.3f} s")


if __name__ == "__main__":
    main()
