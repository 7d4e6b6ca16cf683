"""Hook benchmark: what `--on-event` costs the daemon's loop.

`Hooks.fire()` runs in the daemon's round: it starts the hook (a shell) and returns. Measured
here in-process: the time of one fire() (spawning `/bin/sh -c true`), and of one reap() with
8 hooks to collect. Median and p95 over --reps.

    python bench/hooks.py
"""

from __future__ import annotations

import argparse
import statistics
import time

from gpu_compete.hooks import MAX_RUNNING, Hooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    hooks = Hooks("true")
    fires, reaps = [], []
    for _ in range(args.reps // MAX_RUNNING):
        for _ in range(MAX_RUNNING):
            t = time.perf_counter()
            hooks.fire("task_end", uni_id="q1-1-abc", queue="1", gpu="0", state="normal_exit", exit_status=0)
            fires.append(time.perf_counter() - t)
        for proc, _, _ in hooks.running:
            proc.wait()
        t = time.perf_counter()
        hooks.reap()
        reaps.append(time.perf_counter() - t)

    def show(name: str, values: list[float]) -> None:
        values = sorted(values)
        p95 = values[int(0.95 * (len(values) - 1))]
        print(f"{name:<40} median {statistics.median(values) * 1e3:7.3f} ms  p95 {p95 * 1e3:7.3f} ms")

    show("fire() (start one hook, not waited for)", fires)
    show(f"reap() of {MAX_RUNNING} ended hooks", reaps)


if __name__ == "__main__":
    main()
