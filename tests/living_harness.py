"""A real daemon following a command file that the test edits while it runs.

Each task runs `task.sh NAME MODE`: it appends `start NAME` / `end NAME STATUS` lines to an
events file; mode `hold` waits until the test calls `release(NAME)`, `fail` exits 3,
`fail-until-N` fails until its N-th attempt.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from gpu_compete.commandfile import parse

from .helpers import clean_env, console_script, run_gpu_compete, stop_daemon, wait_for

TASK_SH = r"""#!/bin/bash
name=$1; mode=${2:-ok}
here=$(cd "$(dirname "$0")" && pwd)
echo "start $name $(date +%s.%N)" >> "$here/events"
if [ "$mode" = hold ]; then while [ ! -e "$here/release-$name" ]; do sleep 0.02; done; fi
status=0
case "$mode" in
  fail) status=3 ;;
  fail-until-*)
    count=$(( $(cat "$here/count-$name" 2>/dev/null || echo 0) + 1 )); echo "$count" > "$here/count-$name"
    if [ "$count" -lt "${mode#fail-until-}" ]; then status=1; fi ;;
esac
echo "end $name $status $(date +%s.%N)" >> "$here/events"
exit $status
"""


def block(name: str, queue: str = "1", mode: str = "ok", vram: float = 1) -> str:
    return f"bash {{work_dir}}/task.sh {name} {mode}\n{queue},{vram:g}\n"


class Live:
    def __init__(self, tmp_path: Path, blocks: list[str], simulate: str = "4x24"):
        self.dir = tmp_path
        self.state = tmp_path / "state"
        (tmp_path / "task.sh").write_text(TASK_SH)
        self.commands = tmp_path / "cmd.txt"
        self.simulate = simulate
        self.proc: subprocess.Popen | None = None
        self.write(blocks)

    # --- the command file ---------------------------------------------------------------------

    def write(self, blocks: list[str], *, replace: bool = True) -> None:
        """Write the file as an editor does: a new file renamed over the old (or in place)."""
        text = "\n".join(blocks)
        if replace:
            tmp = self.commands.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.commands)
        else:
            self.commands.write_text(text)

    def uid(self, name: str) -> str:
        for spec in parse(self.commands.read_text()).tasks:
            if spec.commands[0].split()[2] == name:
                return spec.uni_id
        raise KeyError(name)

    # --- the daemon -----------------------------------------------------------------------------

    def argv(self, *extra: str) -> list[str]:
        return [console_script(), "run", "--commands", str(self.commands), "--work-dir", str(self.dir),
                "--state-dir", str(self.state), "--simulate", self.simulate, "--poll", "0.2",
                "--status-every", "0", "--seed", "1", "--log-format", "json", *extra]

    def start(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        self.proc = subprocess.Popen(self.argv(*extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=clean_env(**(env or {})))
        wait_for(lambda: self._serving() or self.proc.poll() is not None, 15, "the daemon's first round")
        return self.proc

    def _serving(self) -> bool:
        """The daemon wrote its first status (its control socket opens before that)."""
        try:
            return json.loads((self.state / "status.json").read_text())["daemon"]["pid"] == self.proc.pid
        except (OSError, ValueError, KeyError):
            return False

    def wait(self, timeout: float = 30) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"daemon did not finish in {timeout}s\nstderr:\n{err}") from None
        return self.proc.returncode, out, err

    def cleanup(self) -> None:
        """End the daemon and release every held task (fixture teardown)."""
        for name in ("_all",):
            (self.dir / f"release-{name}").touch()
        for line in self.events():
            (self.dir / f"release-{line[1]}").touch()
        stop_daemon(self.proc)

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return run_gpu_compete(args[0], "--state-dir", str(self.state), *args[1:], timeout=timeout)

    def status(self) -> dict:
        out = self.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def queue(self, name: str) -> dict:
        return next(q for q in self.status()["queues"] if q["queue"] == name)

    # --- what the tasks did -----------------------------------------------------------------

    def events(self) -> list[list[str]]:
        try:
            return [line.split() for line in (self.dir / "events").read_text().splitlines()]
        except FileNotFoundError:
            return []

    def starts(self, name: str) -> int:
        return sum(1 for e in self.events() if e[0] == "start" and e[1] == name)

    def ends(self, name: str) -> int:
        return sum(1 for e in self.events() if e[0] == "end" and e[1] == name)

    def order(self) -> list[str]:
        """Names in the order they started (each attempt)."""
        return [e[1] for e in self.events() if e[0] == "start"]

    def wait_started(self, name: str, count: int = 1, timeout: float = 15) -> None:
        wait_for(lambda: self.starts(name) >= count, timeout, f"{name} to start {count} time(s)")

    def release(self, name: str) -> None:
        (self.dir / f"release-{name}").touch()

    def history(self) -> list[dict]:
        try:
            return [json.loads(x) for x in (self.state / "history.jsonl").read_text().splitlines() if x.strip()]
        except FileNotFoundError:
            return []

    def rounds_pass(self, count: int = 3) -> None:
        """Wait until the daemon has written status.json `count` more times (rounds ran)."""
        seen = []

        def advanced() -> bool:
            try:
                seen.append((self.state / "status.json").stat().st_mtime_ns)
            except FileNotFoundError:
                return False
            return len(set(seen)) > count

        wait_for(advanced, 15, f"{count} rounds of the daemon")
