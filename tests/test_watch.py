"""`gpu-compete watch`: the screen as text for fixed views, and a real run in a pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import signal
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from gpu_compete import watch

from .daemon_harness import DaemonRun
from .helpers import clean_env, gpu_compete_cmd

SNAPSHOTS = Path(__file__).parent / "snapshots"
GB = 1024**3
NOW = 1_800_000_000.0

VIEW = {
    "updated_at": "2027-01-15T08:00:00", "updated_epoch": NOW - 5,
    "daemon": {"pid": 4242, "draining": False, "mode": "exclusive"},
    "totals": {"pending": 4, "running": 2, "retrying": 0, "backing_off": 1, "completed": 5, "failed": 1, "blocked": 2},
    "queues": [
        {"queue": "1", "status": "BUSY", "done": 3, "total": 5, "current": "q1-4-0a1b2c3d", "current_state": "running",
         "gpu": "0", "attempt": 1, "elapsed_s": 754.0, "eta_s": 1290.0, "retry_in_s": None, "why": None},
        {"queue": "vision", "status": "BUSY", "done": 1, "total": 2, "current": "qvision-2-77aa88bb",
         "current_state": "running", "gpu": "1", "attempt": 3, "elapsed_s": 30.5, "eta_s": None,
         "retry_in_s": None, "why": None},
        {"queue": "2", "status": "IDLE", "done": 0, "total": 3, "current": "q2-1-99887766", "current_state": "pending",
         "gpu": None, "attempt": 1, "elapsed_s": None, "eta_s": None, "retry_in_s": None,
         "why": "needs 30 GB (most free: 12.5 GB)"},
        {"queue": "3", "status": "BUSY", "done": 1, "total": 2, "current": "q3-2-12121212", "current_state": "retry",
         "gpu": None, "attempt": 4, "elapsed_s": None, "eta_s": None, "retry_in_s": 412.0,
         "why": "backing off after oom"},
        {"queue": "4", "status": "BLOCKED", "done": 0, "total": 3, "current": "q4-1-34343434", "current_state": "failed",
         "gpu": None, "attempt": 3, "elapsed_s": None, "eta_s": None, "retry_in_s": None,
         "why": "failed for good (runtime_error); its queue is blocked"},
    ],
    "gpus": [
        {"index": 0, "key": "0", "name": "NVIDIA A100-SXM4-80GB", "available": True, "total_bytes": 80 * GB,
         "free_bytes": 12.5 * GB, "ours_bytes": 40 * GB, "others_bytes": 27.5 * GB,
         "others": [{"pid": 31337, "user": "alice", "used_bytes": 27.5 * GB}],
         "running": ["q1-4-0a1b2c3d"], "leased": []},
        {"index": 1, "key": "1", "name": "NVIDIA A100-SXM4-80GB", "available": True, "total_bytes": 80 * GB,
         "free_bytes": 80 * GB, "ours_bytes": 0, "others_bytes": 0, "others": [],
         "running": ["qvision-2-77aa88bb"], "leased": ["qvision-2-77aa88bb"]},
        {"index": 2, "key": "2", "name": "?", "available": False, "error": "GPU is lost", "total_bytes": None,
         "free_bytes": None},
    ],
    "backing_off": [{"uni_id": "q3-2-12121212", "queue": "3", "retry_in_s": 412.0, "retry_count": 3,
                     "error_type": "oom"}],
    "recent_failures": [
        {"uni_id": "q3-2-12121212", "queue": "3", "gpu": 1, "attempt": 3, "error_type": "oom",
         "end": "2027-01-15T07:53:08", "gave_up": False},
        {"uni_id": "q4-1-34343434", "queue": "4", "gpu": 0, "attempt": 3, "error_type": "runtime_error",
         "end": "2027-01-15T07:40:00", "gave_up": True}],
    "idle_while_waiting_gpu_seconds": 93.2,
}


def check_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("UPDATE_SNAPSHOTS"):
        path.write_text(text)
    assert text == path.read_text(), f"screen differs from {path} (UPDATE_SNAPSHOTS=1 rewrites it)"


@pytest.mark.parametrize("width", [80, 120])
def test_screen_snapshot(width):
    """A fixed view renders to the stored screen at 80 and 120 columns, no line wider than the terminal."""
    text = watch.render_text(VIEW, True, NOW, width=width)
    assert max(len(line) for line in text.splitlines()) <= width
    check_snapshot(f"watch_{width}.txt", text)


def test_screen_says_what_the_researcher_needs():
    """Progress, estimate, memory split, leases, other users, backoff countdown, failures and reasons are on screen,
    times moved on by the view's age (5 s here)."""
    text = watch.render_text(VIEW, True, NOW, width=120)
    for needle in ("3/5", "12m39s", "21m25s", "12.5/80.0", "alice:31337 27.5G", "(lease)", "retry in 6m47s",
                   "needs 30 GB (most free: 12.5 GB)", "failed for good (runtime_error); its queue is blocked", "attempt 3 on GPU 1: oom",
                   "(gave up)", "unavailable: GPU is lost", "5s ago", "1m33s"):
        assert needle in text, needle


def test_memory_bar_splits_ours_others_free():
    """The memory bar gives each share its cells: 40 of 80 GB ours, 20 others', 20 free on 16 cells."""
    gpu = dict(VIEW["gpus"][0], free_bytes=20 * GB)
    bar = watch.memory_bar(gpu, 16).plain
    assert (bar.count("█"), bar.count("▓"), bar.count("░")) == (8, 4, 4)
    assert watch.memory_bar(VIEW["gpus"][2], 16).plain == "?" * 16


def test_no_daemon_screen():
    """Without a daemon the screen says so, and shows when the last status was written."""
    text = watch.render_text(VIEW, False, NOW, state_dir="/tmp/s", width=80)
    assert "no daemon running on /tmp/s; waiting for one" in text and "2027-01-15T08:00:00" in text
    check_snapshot("watch_nodaemon_80.txt", watch.render_text(None, False, NOW, width=80))


ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]")


class Screen:
    """A pseudo-terminal running a command; `text` is what it has drawn so far, escapes removed."""

    def __init__(self, argv, env, cols=80, rows=40):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        def controlling_tty():  # a session of its own with the pty as its terminal: Ctrl-C is SIGINT
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            # As a terminal's shell starts a foreground command: SIGINT not ignored, even when
            # these tests run in a background job (`cmd &` in a script ignores it, and the
            # ignoring is inherited: watch then never sees Ctrl-C).
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     preexec_fn=controlling_tty)
        os.close(slave)
        self.raw = b""

    def read(self):
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.raw += chunk
        return ANSI.sub(b"", self.raw).decode("utf-8", "replace")

    def wait_exit(self, timeout=10):
        """Its exit status, reading what it draws meanwhile: a terminal nobody reads fills up,
        and a program drawing into it blocks and never ends."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read()
            if self.proc.poll() is not None:
                self.read()
                return self.proc.returncode
            time.sleep(0.05)
        pytest.fail(f"still running after {timeout} s; it showed:\n{self.read()[-2000:]}")

    def wait_for(self, needle, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.read():
                return
            time.sleep(0.05)
        pytest.fail(f"screen never showed {needle!r}; it showed:\n{self.read()[-2000:]}")


def test_watch_in_a_terminal_waits_for_a_daemon_then_quits_on_q(tmp_path):
    """In a real pty, watch says no daemon runs, shows the daemon's queues once one starts, and `q` ends it with status 0."""
    run = DaemonRun(tmp_path, [("1", 1, "a", 4, "ok")], simulate="1x24")
    env = clean_env(TERM="xterm-256color", COLUMNS="80", LINES="40")
    screen = Screen(gpu_compete_cmd("watch", "--state-dir", str(run.state), "--interval", "0.2"), env)
    daemon = None
    try:
        screen.wait_for("no daemon running")
        daemon = subprocess.Popen(run.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
        screen.wait_for(run.names["a"])
        screen.wait_for("running on GPU 0")
        os.write(screen.master, b"q")
        assert screen.wait_exit() == 0
        assert daemon.wait(timeout=30) == 0  # its task ends by itself; nothing is left behind
    finally:
        for proc in (screen.proc, daemon):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        os.close(screen.master)


def test_watch_quits_on_ctrl_c_and_restores_the_terminal(tmp_path):
    """Ctrl-C typed in the terminal ends watch with status 0 and leaves the alternate screen."""
    screen = Screen(gpu_compete_cmd("watch", "--state-dir", str(tmp_path), "--interval", "0.2"),
                    clean_env(TERM="xterm-256color"))
    try:
        screen.wait_for("no daemon running")
        os.write(screen.master, b"\x03")
        assert screen.wait_exit() == 0
        screen.read()
        assert b"\x1b[?1049l" in screen.raw  # rich left the alternate screen
    finally:
        if screen.proc.poll() is None:
            screen.proc.kill()
            screen.proc.wait()
        os.close(screen.master)
