"""Idle benchmark: what the daemon costs while nothing can start.

The real daemon (`gpu-compete run`) on 8 simulated GPUs of 24 GB, each one full with a
process of another user ("alice"), and 100 queued tasks (20 queues x 5, `sleep 1`, 10 GB
each) that therefore never start. After --warmup seconds it is measured with psutil over
--window seconds:

- CPU: user + system seconds of the daemon (and of its children, which should be none)
  over the window, as % of one core (target < 1 % at the default --poll 5);
- memory: resident set size, the largest of one sample a second (target < 80 MB).

Then it is stopped with SIGTERM, and must exit on its own (status 130: stopped before every
task completed) within a few seconds. Its status.json is read first to check that nothing
started (100 pending, 0 running).

    python bench/idle.py                    # the default: --poll 5, a 60 s window (~70 s in all)
    python bench/idle.py --poll 1           # the same at --poll 1
    python bench/idle.py --window 20        # a shorter, rougher measurement

Each round the simulated probe scans the machine's process table (psutil), so the CPU per
round grows with the number of processes on the machine; that number is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

CPU_TARGET_PCT = 1.0
RSS_TARGET_MB = 80.0
GPUS, QUEUES, PER_QUEUE, VRAM_GB = 8, 20, 5, 10


def gpu_compete() -> str:
    found = shutil.which("gpu-compete", path=os.path.dirname(sys.executable)) or shutil.which("gpu-compete")
    if not found:
        sys.exit("gpu-compete is not installed: pip install -e .")
    return found


def write_inputs(work: Path) -> tuple[Path, Path]:
    sim = work / "sim.json"
    sim.write_text(json.dumps({
        "startup_delay_s": 0,
        "gpus": [{"memory_gb": 24, "processes": [{"pid": 900000 + i, "memory_gb": 24, "user": "alice"}]}
                 for i in range(GPUS)],
    }, indent=1))
    commands = work / "command.txt"
    blocks = [f"sleep 1\nq{q},{VRAM_GB}\n" for q in range(QUEUES) for _ in range(PER_QUEUE)]
    commands.write_text("\n".join(blocks))
    return sim, commands


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def read_totals(state: Path) -> dict[str, int] | None:
    try:
        return json.loads((state / "status.json").read_text())["totals"]
    except (OSError, ValueError, KeyError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--poll", type=float, default=5.0, help="the daemon's --poll")
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds the daemon settles first")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="gc-bench-idle-") as tmp:
        work = Path(tmp)
        sim, commands = write_inputs(work)
        state = work / "state"
        argv = [gpu_compete(), "run", "--commands", str(commands), "--simulate", str(sim), "--state-dir", str(state),
                "--work-dir", str(work), "--status-every", "60", "--poll", str(args.poll), "--log-format", "json"]
        with open(work / "stdout", "w") as out, open(work / "stderr", "w") as err:
            daemon = subprocess.Popen(argv, stdout=out, stderr=err)
        try:
            proc = psutil.Process(daemon.pid)
            time.sleep(args.warmup)
            if daemon.poll() is not None:
                sys.exit(f"daemon exited early ({daemon.returncode}):\n{(work / 'stderr').read_text()[-2000:]}")
            rss_max = proc.memory_info().rss
            children = len(proc.children(recursive=True))
            cpu0, t0 = cpu_seconds(proc), time.monotonic()
            deadline = t0 + args.window
            while time.monotonic() < deadline:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                rss_max = max(rss_max, proc.memory_info().rss)
                children = max(children, len(proc.children(recursive=True)))
            cpu1, t1 = cpu_seconds(proc), time.monotonic()
            totals = read_totals(state)

            stop0 = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(timeout=15)
                stopped = f"exited {code} after {time.monotonic() - stop0:.2f} s"
            except subprocess.TimeoutExpired:
                code = None
                stopped = "DID NOT EXIT within 15 s of SIGTERM (killed)"
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
        errors = [line for line in (work / "stderr").read_text().splitlines() if '"level": "error"' in line]

    window = t1 - t0
    cpu_pct = (cpu1 - cpu0) / window * 100
    rounds = window / args.poll
    rss_mb = rss_max / 1e6
    print(f"daemon idle: {GPUS} simulated GPUs full with alice's processes, {QUEUES} queues x {PER_QUEUE} tasks of "
          f"{VRAM_GB} GB, --poll {args.poll:g}, {window:.1f} s window after {args.warmup:g} s warm-up "
          f"({len(psutil.pids())} processes on this machine)")
    if totals is not None:
        ok = totals.get("pending") == QUEUES * PER_QUEUE and totals.get("running") == 0
        print(f"  status.json: {totals.get('pending')} pending, {totals.get('running')} running"
              + ("" if ok else "  <- NOT THE IDLE CASE INTENDED"))
    print(f"  CPU: {cpu1 - cpu0:.3f} s in {window:.1f} s = {cpu_pct:.3f} % of one core "
          f"(target < {CPU_TARGET_PCT:g} %: {'meets' if cpu_pct < CPU_TARGET_PCT else 'MISSES'} it); "
          f"~{(cpu1 - cpu0) / rounds * 1e3:.1f} ms CPU per round over ~{rounds:.0f} rounds")
    print(f"  RSS: max {rss_mb:.1f} MB (target < {RSS_TARGET_MB:g} MB: "
          f"{'meets' if rss_mb < RSS_TARGET_MB else 'MISSES'} it); child processes seen: {children}")
    print(f"  SIGTERM: {stopped}" + (" (130: stopped before every task completed, as expected)" if code == 130 else ""))
    if errors:
        print(f"  {len(errors)} error lines in the daemon's log, first: {errors[0][:300]}")


if __name__ == "__main__":
    main()
