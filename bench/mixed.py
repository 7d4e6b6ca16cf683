"""Mixed-workload benchmark: the real daemon on 8 simulated GPUs of 24, 48 and 80 GB.

Workload (per seed): 16 queues x 3 tasks; each task declares 4-40 GB, about one in five
asks for gpus=2, a quarter of the queues have priority=1; tasks run 0.5-2 s; 0.3 s simulated
start-up. Exclusive mode. Prints, for `--pick longest` and `--pick random`:

- makespan / lower bound, the makespan taken from the first task's start to the last task's
  end as the tasks saw it, and the lower bound the largest of: total GPU-seconds / 8; the
  longest queue's serial time; GPU-seconds of tasks over 24 GB / the 5 GPUs that can hold
  them; GPU-seconds of tasks over 48 GB / the 2 GPUs of 80 GB. (A bound, not the optimum:
  the ratio also holds what no scheduler could avoid.)
- mean GPU utilization: busy GPU-seconds / (8 x makespan), a gpus=2 task busy on both.
- when priority=1 queue heads started, mean seconds after the first start, beside the others.

    python bench/mixed.py                  # 3 seeds for each pick
    python bench/mixed.py --seeds 1 --verbose
"""

from __future__ import annotations

import argparse
import json
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

SIZES_GB = (4, 8, 12, 16, 20, 24, 32, 40)
GPUS_GB = (24, 24, 24, 48, 48, 48, 80, 80)

TASK = r"""#!/bin/bash
# task.sh UNI_ID SECONDS
here=$(cd "$(dirname "$0")" && pwd)
echo "start $1 $CUDA_VISIBLE_DEVICES $(date +%s.%N)" >> "$here/events"
sleep "$2"
echo "end $1 $CUDA_VISIBLE_DEVICES $(date +%s.%N)" >> "$here/events"
"""


def gpu_compete() -> str:
    found = shutil.which("gpu-compete", path=os.path.dirname(sys.executable)) or shutil.which("gpu-compete")
    if not found:
        sys.exit("gpu-compete is not installed: pip install -e .")
    return found


def workload(rng: random.Random, queues: int, tasks: int) -> list[dict]:
    """[{queue, priority, tasks: [(gb, gpus, seconds)]}]"""
    out = []
    for q in range(queues):
        priority = 1 if rng.random() < 0.25 else 0
        row = []
        for _ in range(tasks):
            gpus = 2 if rng.random() < 0.2 else 1
            row.append((rng.choice(SIZES_GB), gpus, round(rng.uniform(0.5, 2.0), 2)))
        out.append({"queue": str(q), "priority": priority, "tasks": row})
    return out


def lower_bound(plan: list[dict]) -> float:
    tasks = [t for q in plan for t in q["tasks"]]
    work = sum(gpus * s for _, gpus, s in tasks)
    over_24 = sum(gpus * s for gb, gpus, s in tasks if gb > 24)
    over_48 = sum(gpus * s for gb, gpus, s in tasks if gb > 48)
    serial = max(sum(s for _, _, s in q["tasks"]) for q in plan)
    big = sum(1 for g in GPUS_GB if g > 24)
    huge = sum(1 for g in GPUS_GB if g > 48)
    return max(work / len(GPUS_GB), serial, over_24 / big, over_48 / huge)


def run_once(pick: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    plan = workload(random.Random(seed), args.queues, args.tasks)
    with tempfile.TemporaryDirectory(prefix="gc-mixed-") as tmp:
        work = Path(tmp)
        (work / "task.sh").write_text(TASK)
        (work / "sim.json").write_text(json.dumps({"startup_delay_s": args.startup,
                                                   "gpus": [{"memory_gb": g} for g in GPUS_GB]}))
        lines, prio_of = [], {}
        for q in plan:
            opts = f",priority={q['priority']}" if q["priority"] else ""
            for gb, gpus, seconds in q["tasks"]:
                g = f",gpus={gpus}" if gpus > 1 else ""
                lines += [f"bash {{work_dir}}/task.sh {{uni_id}} {seconds}", f"{q['queue']},{gb}{g}{opts}", ""]
        (work / "command.txt").write_text("\n".join(lines))
        argv = [gpu_compete(), "run", "--commands", str(work / "command.txt"), "--work-dir", str(work),
                "--state-dir", str(work / "state"), "--simulate", str(work / "sim.json"),
                "--pick", pick, "--seed", str(seed), "--poll", str(args.poll), "--status-every", "0",
                "--log-format", "json"]
        check = subprocess.run([gpu_compete(), "check", "--commands", str(work / "command.txt"), "--json"],
                               capture_output=True, text=True, check=True)
        for q in json.loads(check.stdout)["queues"]:
            for t in q["tasks"]:
                prio_of[t["uni_id"]] = (t["options"].get("priority", 0), t["position"])
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"daemon failed ({done.returncode}):\n{done.stderr[-2000:]}")
        open_: dict[str, tuple[str, float]] = {}
        runs = []
        for line in (work / "events").read_text().splitlines():
            kind, uid, gpus, t = line.split()
            if kind == "start":
                open_[uid] = (gpus, float(t))
            else:
                g, s = open_.pop(uid)
                runs.append((uid, g.split(","), s, float(t)))
    t0 = min(s for _, _, s, _ in runs)
    makespan = max(e for _, _, _, e in runs) - t0
    busy = sum((e - s) * len(g) for _, g, s, e in runs)
    first = defaultdict(list)
    for uid, _, s, _ in runs:
        prio, position = prio_of[uid]
        if position == 1:
            first[prio].append(s - t0)
    if args.verbose:
        per_gpu = defaultdict(list)
        for uid, g, s, e in runs:
            for k in g:
                per_gpu[k].append(f"[{s - t0:.1f}-{e - t0:.1f}]")
        for k in sorted(per_gpu, key=int):
            print(f"   GPU {k} ({GPUS_GB[int(k)]} GB): {' '.join(per_gpu[k])}")
    bound = lower_bound(plan)
    return {"ratio": makespan / bound, "makespan": makespan, "bound": bound,
            "util": busy / (len(GPUS_GB) * makespan),
            "prio_start": statistics.mean(first[1]) if first[1] else float("nan"),
            "other_start": statistics.mean(first[0]) if first[0] else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queues", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=3, help="tasks per queue")
    parser.add_argument("--startup", type=float, default=0.3, help="simulated CUDA start-up delay")
    parser.add_argument("--poll", type=float, default=5.0, help="the daemon's --poll (exits wake it anyway)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--picks", default="longest,random")
    parser.add_argument("--verbose", action="store_true", help="print every GPU's timeline")
    args = parser.parse_args()
    print(f"8 GPUs ({'/'.join(map(str, GPUS_GB))} GB), {args.queues} queues x {args.tasks} tasks of 4-40 GB, "
          f"~20% gpus=2, ~25% of queues priority=1, 0.5-2 s each, {args.startup} s start-up, exclusive")
    print(f"{'pick':8} {'seed':>4} {'makespan':>9} {'bound':>6} {'ratio':>6} {'util':>5} "
          f"{'prio=1 heads start':>19} {'others':>7}")
    for pick in args.picks.split(","):
        results = []
        for seed in range(1, args.seeds + 1):
            r = run_once(pick, seed, args)
            results.append(r)
            print(f"{pick:8} {seed:>4} {r['makespan']:>8.2f}s {r['bound']:>5.1f}s {r['ratio']:>6.3f} "
                  f"{r['util']:>5.0%} {r['prio_start']:>18.2f}s {r['other_start']:>6.2f}s")
        print(f"{pick:8} mean ratio {statistics.mean(r['ratio'] for r in results):.3f}, "
              f"mean utilization {statistics.mean(r['util'] for r in results):.0%}")


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"({time.time() - started:.0f} s)")
