"""`gpu-compete watch`: a full-screen view of a running daemon, redrawn about once a second.

It reads `STATE_DIR/status.json` (the view the daemon writes every round) and asks the daemon
nothing. `renderable()` is a pure function of (view, whether a daemon runs, now, width);
`render_text()` gives the same as plain text, which the tests compare against snapshots.
"""

from __future__ import annotations

import io
import json
import os
import select
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .report import duration_text

GIB = 1024**3
RECENT = 5


def _gb(value: Any) -> str:
    return "?" if not isinstance(value, (int, float)) else f"{value / GIB:.1f}"


def _dur(seconds: Any) -> str:
    return "-" if not isinstance(seconds, (int, float)) else duration_text(seconds)


def progress_bar(done: int, total: int, width: int) -> Text:
    filled = 0 if total <= 0 else round(width * done / total)
    return Text.assemble(("█" * filled, "green"), ("░" * (width - filled), "grey50"), f" {done}/{total}")


def memory_bar(gpu: dict[str, Any], width: int) -> Text:
    """Yours █, other users' ▓, free ░; what the driver doesn't attribute counts as others'."""
    total, free = gpu.get("total_bytes"), gpu.get("free_bytes")
    if not isinstance(total, (int, float)) or total <= 0 or not isinstance(free, (int, float)):
        return Text("?" * width, "grey50")
    ours = min(gpu.get("ours_bytes") or 0, total)
    cells_free = round(width * max(0, free) / total)
    cells_ours = min(round(width * ours / total), width - cells_free)
    cells_others = width - cells_free - cells_ours
    return Text.assemble(("█" * cells_ours, "cyan"), ("▓" * cells_others, "magenta"), ("░" * cells_free, "grey50"))


def _header(view: dict[str, Any] | None, running: bool, now: float, state_dir: str) -> Text:
    if not running:
        text = Text(f"no daemon running on {state_dir}; waiting for one (q quits)", "bold yellow")
        if view:
            text.append(f"\nlast status written at {view.get('updated_at', '?')}", "grey50")
        return text
    view = view or {}
    daemon = view.get("daemon", {})
    age = now - view["updated_epoch"] if isinstance(view.get("updated_epoch"), (int, float)) else None
    t = view.get("totals", {})
    head = Text.assemble(("gpu-compete ", "bold"), f"pid {daemon.get('pid', '?')}, {daemon.get('mode', '?')} mode",
                         (", draining" if daemon.get("draining") else "", "bold yellow"),
                         f", updated {view.get('updated_at', '?')[11:]}",
                         f" ({age:.0f}s ago)" if age is not None and age >= 2 else "", "  (q quits)")
    counts = [f"{t.get(k, 0)} {label}" for k, label in (
        ("running", "running"), ("pending", "pending"), ("completed", "done"), ("retrying", "retrying"),
        ("backing_off", "backing off"), ("failed", "failed"), ("blocked", "blocked")) if t.get(k) or k == "running"]
    head.append("\ntasks: " + ", ".join(counts))
    idle = view.get("idle_while_waiting_gpu_seconds")
    if isinstance(idle, (int, float)):
        head.append(f"; GPUs idle while work waited: {_dur(idle)}")
    return head


def _later(seconds: Any, age: float, sign: int) -> Any:
    """A duration from the view, moved on by the view's age (the daemon writes it once a round,
    the screen is redrawn every second): elapsed times grow, countdowns shrink."""
    return max(0.0, seconds + sign * age) if isinstance(seconds, (int, float)) else seconds


def _queues(view: dict[str, Any], width: int, age: float = 0.0) -> Table:
    bar = 10 if width < 100 else 16
    table = Table(title="queues", title_justify="left", expand=False, box=None, pad_edge=False, show_edge=False)
    table.add_column("QUEUE", no_wrap=True)
    table.add_column("PROGRESS", no_wrap=True)
    table.add_column("TASK", overflow="fold")
    table.add_column("STATE", overflow="fold", ratio=1)
    table.add_column("ELAPSED", justify="right", no_wrap=True)
    table.add_column("ETA", justify="right", no_wrap=True)
    for q in view.get("queues", ()):
        state = q.get("current_state") or "done"
        if state == "running":
            label = Text(f"running on GPU {q.get('gpu')}" + (f" (attempt {q['attempt']})" if (q.get("attempt") or 1) > 1
                                                              else ""), "green")
        elif q.get("retry_in_s") and q["retry_in_s"] > 0:
            label = Text(f"backing off, {_dur(_later(q['retry_in_s'], age, -1))} left", "yellow")
        elif q.get("why"):
            label = Text(q["why"], "red" if q.get("status") == "BLOCKED" else "yellow")
        else:
            label = Text(state, "grey50" if state == "done" else "")
        table.add_row(str(q["queue"]), progress_bar(q.get("done", 0), q.get("total", 0), bar),
                      q.get("current") or "-", label, _dur(_later(q.get("elapsed_s"), age, 1)),
                      _dur(_later(q.get("eta_s"), age if state == "running" else 0.0, -1)))
    return table


def _gpus(view: dict[str, Any], width: int) -> Table:
    bar = 12 if width < 100 else 24
    table = Table(title="GPUs  (█ yours  ▓ others'  ░ free)", title_justify="left", box=None, pad_edge=False,
                  show_edge=False)
    table.add_column("GPU", no_wrap=True)
    table.add_column("MEMORY", no_wrap=True)
    table.add_column("FREE/TOTAL GB", no_wrap=True)
    table.add_column("TASKS", overflow="fold", ratio=1)
    table.add_column("OTHER USERS", overflow="fold", ratio=1)
    for g in view.get("gpus", ()):
        key = str(g.get("key", g.get("index")))
        if not g.get("available", True):
            table.add_row(key, Text("?" * bar, "grey50"), "?", Text(f"unavailable: {g.get('error')}", "red"), "")
            continue
        tasks = Text()
        for uid in g.get("running", ()):
            if tasks:
                tasks.append(", ")
            tasks.append(uid + (" (lease)" if uid in g.get("leased", ()) else ""))
        others = ", ".join(f"{p.get('user')}:{p.get('pid')} {_gb(p.get('used_bytes'))}G" for p in g.get("others", ()))
        table.add_row(key, memory_bar(g, bar), f"{_gb(g.get('free_bytes'))}/{_gb(g.get('total_bytes'))}",
                      tasks or Text("idle", "grey50"), others or "-")
    return table


def _lists(view: dict[str, Any], age: float = 0.0) -> list[Text]:
    out = []
    backing = view.get("backing_off") or []
    if backing:
        out.append(Text("backing off", "bold"))
        for b in backing:
            out.append(Text(f"  {b['uni_id']} (queue {b['queue']}): retry in {_dur(_later(b.get('retry_in_s'), age, -1))} after "
                            f"{b.get('retry_count')} failures ({b.get('error_type')})", "yellow"))
    failures = (view.get("recent_failures") or [])[:RECENT]
    if failures:
        out.append(Text("recent failures", "bold"))
        for f in failures:
            when = str(f.get("end") or "?")[11:19]
            out.append(Text(f"  {when} {f.get('uni_id')} attempt {f.get('attempt')} on GPU {f.get('gpu')}: "
                            f"{f.get('error_type')}" + (" (gave up)" if f.get("gave_up") else ""), "red"))
    return out


def renderable(view: dict[str, Any] | None, running: bool, now: float, state_dir: str, width: int = 80) -> Group:
    parts: list[Any] = [_header(view, running, now, state_dir)]
    if view and "queues" in view:
        epoch = view.get("updated_epoch")
        age = max(0.0, now - epoch) if running and isinstance(epoch, (int, float)) else 0.0
        parts += [Text(""), _queues(view, width, age), Text(""), _gpus(view, width)]
        extra = _lists(view, age)
        if extra:
            parts += [Text(""), *extra]
    return Group(*parts)


def render_text(view: dict[str, Any] | None, running: bool, now: float, state_dir: str = "script_process",
                width: int = 80) -> str:
    """The screen as plain text, `width` columns wide."""
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False, record=True,
                      legacy_windows=False)
    console.print(renderable(view, running, now, state_dir, width))
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def read_view(state_dir: Path) -> dict[str, Any] | None:
    try:
        view = json.loads((state_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return view if isinstance(view, dict) else None


class _Keys:
    """Single key presses from a terminal's stdin (cbreak: no Enter needed, Ctrl-C still a signal)."""

    def __enter__(self) -> "_Keys":
        self.saved = None
        if sys.stdin.isatty():
            import termios
            import tty

            self.saved = termios.tcgetattr(sys.stdin.fileno())
            tty.setcbreak(sys.stdin.fileno())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self.saved)

    def quit_within(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; True if `q` was pressed (or stdin closed)."""
        if not sys.stdin.isatty():
            time.sleep(timeout)
            return False
        ready, _, _ = select.select([sys.stdin], [], [], timeout)
        if not ready:
            return False
        data = os.read(sys.stdin.fileno(), 64)
        return not data or b"q" in data.lower()


def run(state_dir: Path, interval: float = 1.0) -> int:
    from rich.live import Live

    from .pidfile import running_daemon

    console = Console()
    try:
        with _Keys() as keys, Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                view = read_view(state_dir)
                running = running_daemon(state_dir) is not None
                live.update(renderable(view, running, time.time(), str(state_dir), console.width), refresh=True)
                if keys.quit_within(interval):
                    return 0
    except KeyboardInterrupt:
        return 0
