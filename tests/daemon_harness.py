"""Runs the real daemon on simulated GPUs and reads back what its tasks did.

Every task runs `task.sh UNI_ID SECONDS [MODE]`, which appends `start`/`end` lines with the
GPU and a timestamp to an events file; the invariants below are checked from those lines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .helpers import console_script, wait_for

TASK_SH = r"""#!/bin/bash
# task.sh UNI_ID SECONDS [ok|fail|oom|fail-until-N|late-child]
uid=$1; seconds=$2; mode=${3:-ok}
here=$(cd "$(dirname "$0")" && pwd)
echo "start $uid ${CUDA_VISIBLE_DEVICES:-none} $(date +%s.%N)" >> "$here/events"
sleep "$seconds"
status=0
case "$mode" in
  fail) status=3 ;;
  late-child) GPU_COMPETE_VRAM_GB=20 sleep 0.5 ;;  # a child of its own on the GPU, after launch
  oom) echo "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" >&2; status=1 ;;
  fail-until-*)
    count_file="$here/count-$uid"
    count=$(( $(cat "$count_file" 2>/dev/null || echo 0) + 1 ))
    echo "$count" > "$count_file"
    if [ "$count" -lt "${mode#fail-until-}" ]; then echo "RuntimeError: attempt $count" >&2; status=1; fi ;;
esac
echo "end $uid ${CUDA_VISIBLE_DEVICES:-none} $(date +%s.%N) $status" >> "$here/events"
exit $status
"""


@dataclass
class Attempt:
    uni_id: str
    gpu: str
    start: float
    end: float | None = None
    status: int | None = None


class DaemonRun:
    def __init__(self, tmp_path: Path, blocks: list[tuple[str, float, str, float, str]], simulate: str = "2x24"):
        """`blocks`: (queue, vram_gb, name, seconds, mode). The task's uni_id is in its command."""
        self.dir = tmp_path
        self.state = tmp_path / "state"
        (tmp_path / "task.sh").write_text(TASK_SH)
        (tmp_path / "task.sh").chmod(0o755)
        lines = []
        for queue, vram, name, seconds, mode in blocks:
            lines += [f"# task {name}", f"bash {{work_dir}}/task.sh {{uni_id}} {seconds} {mode}", f"{queue},{vram}", ""]
        self.commands = tmp_path / "command.txt"
        self.commands.write_text("\n".join(lines))
        self.simulate = simulate
        self.proc: subprocess.Popen | None = None
        self.names = self._names()

    def _names(self) -> dict[str, str]:
        """task name -> uni_id, from `check --json`."""
        out = subprocess.run([console_script(), "check", "--commands", str(self.commands), "--json"],
                             capture_output=True, text=True, check=True)
        data = json.loads(out.stdout)
        text = self.commands.read_text().splitlines()
        names = {}
        for q in data["queues"]:
            for t in q["tasks"]:
                names[text[t["line"] - 2].removeprefix("# task ")] = t["uni_id"]
        return names

    def argv(self, *extra: str) -> list[str]:
        return [console_script(), "run", "--commands", str(self.commands), "--work-dir", str(self.dir),
                "--state-dir", str(self.state), "--simulate", self.simulate, "--poll", "0.2",
                "--status-every", "0", "--seed", "1", "--log-format", "json", *extra]

    def start(self, *extra: str) -> subprocess.Popen:
        self.proc = subprocess.Popen(self.argv(*extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self.proc

    def wait(self, timeout: float = 60) -> tuple[int, str, str]:
        assert self.proc is not None
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"daemon did not finish in {timeout}s\nstdout:\n{out}\nstderr:\n{err}") from None
        return self.proc.returncode, out, err

    def run(self, *extra: str, timeout: float = 60) -> tuple[int, str, str]:
        self.start(*extra)
        return self.wait(timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill_hard(self) -> None:
        """SIGKILL the daemon alone (its tasks live in their own sessions and carry on)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()

    # --- reading back ------------------------------------------------------------------------

    def attempts(self) -> list[Attempt]:
        return read_attempts(self.dir / "events")

    def started(self, name: str) -> int:
        return sum(1 for a in self.attempts() if a.uni_id == self.names[name])

    def wait_started(self, name: str, count: int = 1, timeout: float = 20) -> None:
        wait_for(lambda: self.started(name) >= count, timeout, f"{name} to start {count} time(s)")

    def registry(self) -> dict:
        """The registry as a reader sees it; read again while it is caught half written (an old
        wrapper script writes it in place, without a lock)."""
        deadline = time.monotonic() + 2.0
        while True:
            try:
                return json.loads((self.state / "uni_id.json").read_text())
            except FileNotFoundError:
                return {}
            except ValueError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def history(self) -> list[dict]:
        try:
            return [json.loads(l) for l in (self.state / "history.jsonl").read_text().splitlines() if l.strip()]
        except FileNotFoundError:
            return []


def read_attempts(events: Path) -> list[Attempt]:
    """Attempts from `start UID GPU TIME` / `end UID GPU TIME STATUS` lines, by start time; an
    attempt without its end line (killed) has end None."""
    try:
        lines = events.read_text().splitlines()
    except FileNotFoundError:
        return []
    open_: dict[str, Attempt] = {}
    done: list[Attempt] = []
    for line in lines:
        parts = line.split()
        if parts[0] == "start":
            if parts[1] in open_:  # the previous attempt was killed before its end line
                done.append(open_.pop(parts[1]))
            open_[parts[1]] = Attempt(parts[1], parts[2], float(parts[3]))
        elif parts[0] == "end" and parts[1] in open_:
            attempt = open_.pop(parts[1])
            attempt.end, attempt.status = float(parts[3]), int(parts[4])
            done.append(attempt)
    return sorted(done + list(open_.values()), key=lambda a: a.start)


# --- invariants ------------------------------------------------------------------------------

def assert_queue_order(attempts: list[Attempt], queues: dict[str, list[str]]) -> None:
    """Within a queue, no two attempts overlap, and successes come in file order."""
    where = {uid: q for q, uids in queues.items() for uid in uids}
    per_queue: dict[str, list[Attempt]] = defaultdict(list)
    for a in attempts:
        per_queue[where[a.uni_id]].append(a)
    for q, runs in per_queue.items():
        runs.sort(key=lambda a: a.start)
        for before, after in zip(runs, runs[1:]):
            assert before.end is not None and before.end <= after.start, f"queue {q}: {before} overlaps {after}"
        successes = [a.uni_id for a in runs if a.status == 0]
        assert successes == [u for u in queues[q] if u in successes], f"queue {q} ran out of order: {successes}"


def assert_exclusive(attempts: list[Attempt]) -> None:
    """No GPU ever ran two attempts at once."""
    per_gpu: dict[str, list[Attempt]] = defaultdict(list)
    for a in attempts:
        per_gpu[a.gpu].append(a)
    for gpu, runs in per_gpu.items():
        runs.sort(key=lambda a: a.start)
        for before, after in zip(runs, runs[1:]):
            assert before.end is not None and before.end <= after.start, f"GPU {gpu}: {before} overlaps {after}"


def assert_each_succeeded_once(attempts: list[Attempt], uni_ids: list[str]) -> None:
    successes = defaultdict(int)
    for a in attempts:
        if a.status == 0:
            successes[a.uni_id] += 1
    assert {u: successes[u] for u in uni_ids} == {u: 1 for u in uni_ids}


def overlapping(a: Attempt, b: Attempt) -> bool:
    return a.start < (b.end or float("inf")) and b.start < (a.end or float("inf"))
