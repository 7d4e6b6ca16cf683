"""`--on-event` hooks: real shell commands, not waited for, killed past their timeout, failures logged once."""

from __future__ import annotations

import os
import subprocess

import psutil
from structlog.testing import capture_logs

from gpu_compete.hooks import Hooks

from .daemon_harness import DaemonRun
from .helpers import clean_env, wait_for


def reap_until_idle(hooks: Hooks, timeout: float = 10) -> None:
    def idle():
        hooks.reap()
        return not hooks.running and not hooks.queued
    wait_for(idle, timeout, "hooks to end")


def test_hook_gets_the_event_in_its_environment(tmp_path):
    """The hook runs through the shell with every GPU_COMPETE_* event variable set (empty when not applicable)."""
    out = tmp_path / "env"
    hooks = Hooks(f'env | grep ^GPU_COMPETE_ | sort > {out}')
    hooks.fire("task_failed", uni_id="q1-1-a", queue="1", gpu="3:1", state="abnormal_exit", error_type="oom")
    reap_until_idle(hooks)
    lines = out.read_text().splitlines()
    assert lines == ["GPU_COMPETE_ERROR_TYPE=oom", "GPU_COMPETE_EVENT=task_failed", "GPU_COMPETE_EXIT_STATUS=",
                     "GPU_COMPETE_GPU=3:1", "GPU_COMPETE_QUEUE=1", "GPU_COMPETE_STATE=abnormal_exit",
                     "GPU_COMPETE_UNI_ID=q1-1-a"]


def test_fire_does_not_wait_for_the_hook(tmp_path):
    """fire() returns while the hook still runs; the hook finishes later and is reaped."""
    go, done = tmp_path / "go", tmp_path / "done"
    hooks = Hooks(f"while [ ! -e {go} ]; do sleep 0.02; done; touch {done}")
    hooks.fire("task_start", uni_id="x")
    assert hooks.running and not done.exists()
    go.touch()
    reap_until_idle(hooks)
    assert done.exists()


def test_a_hanging_hook_is_killed_after_the_timeout_with_its_children(tmp_path):
    """A hook past --hook-timeout has its whole process group killed, and the kill is logged once."""
    clock = [0.0]
    pidfile = tmp_path / "pid"
    hooks = Hooks(f"sleep 60 & echo $! > {pidfile}; wait", timeout=30, clock=lambda: clock[0])
    hooks.fire("task_end", uni_id="x")
    wait_for(pidfile.exists, 10, "the hook's child")
    grandchild = int(wait_for(lambda: pidfile.read_text().strip(), 10, "its pid"))
    hooks.reap()
    assert hooks.running  # 0 s of 30: left alone
    clock[0] = 31.0
    with capture_logs() as logs:
        hooks.reap()
    assert not hooks.running
    wait_for(lambda: not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == "zombie", 10,
             "the hook's child to die")
    assert [e["problem"] for e in logs if e["log_level"] == "warning"] == ["killed after 30 s (--hook-timeout)"]


def test_failing_hook_is_logged_once_until_it_works_again(tmp_path):
    """Three failing runs log one warning; a success after them logs that it works again."""
    flag = tmp_path / "ok"
    hooks = Hooks(f"[ -e {flag} ] || exit 3", log_path=tmp_path / "hooks.log")
    with capture_logs() as logs:
        for _ in range(3):
            hooks.fire("task_end", uni_id="x")
        reap_until_idle(hooks)
        flag.touch()
        hooks.fire("task_end", uni_id="x")
        reap_until_idle(hooks)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["problem"] == "exit status 3"
    assert [e["event"] for e in logs if e["log_level"] == "info"] == ["--on-event hook works again"]
    assert hooks.failures == 3


def test_daemon_fires_events_for_a_real_run(tmp_path):
    """A run with one task that succeeds and one that fails for good fires start, end, failed, gave_up and all_done."""
    run = DaemonRun(tmp_path, [("1", 1, "good", 0.2, "ok"), ("2", 1, "bad", 0.2, "fail")], simulate="2x24")
    events = tmp_path / "events.txt"
    hook = f'echo "$GPU_COMPETE_EVENT ${{GPU_COMPETE_UNI_ID:--}} ${{GPU_COMPETE_STATE:--}}" >> {events}'
    proc = subprocess.run(run.argv("--max-retries", "0", "--on-event", hook), capture_output=True, text=True,
                          timeout=60, env=clean_env())
    assert proc.returncode == 1, proc.stderr
    lines = events.read_text().splitlines()
    good, bad = run.names["good"], run.names["bad"]
    assert f"task_start {good} running" in lines and f"task_end {good} normal_exit" in lines
    assert f"task_start {bad} running" in lines and f"task_failed {bad} abnormal_exit" in lines
    assert f"gave_up {bad} abnormal_exit" in lines
    assert lines[-1] == "all_done - failed"
    assert lines.index(f"task_start {good} running") < lines.index(f"task_end {good} normal_exit")
    assert os.path.exists(run.state / "hooks.log")


def test_hanging_hooks_neither_hold_tasks_nor_outlive_the_daemon(tmp_path):
    """With a hook that hangs on every event, tasks still run one after another and the daemon ends the hooks when it exits."""
    run = DaemonRun(tmp_path, [("1", 1, "a", 0.1, "ok"), ("1", 1, "b", 0.1, "ok"), ("1", 1, "c", 0.1, "ok")],
                    simulate="1x24")
    token = f"hang-{os.getpid()}-{tmp_path.name}"
    proc = subprocess.run(run.argv("--on-event", f"sleep 120; echo {token}", "--hook-timeout", "1"),
                          capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    assert len([a for a in run.attempts() if a.status == 0]) == 3
    assert "killed after 1 s (--hook-timeout)" in proc.stderr
    assert proc.stderr.count("--on-event hook failed") == 1  # logged once, not at every event

    def hooks_gone():
        return not [p for p in psutil.process_iter(["cmdline"]) if token in " ".join(p.info["cmdline"] or [])]
    wait_for(hooks_gone, 10, "no hook left running")
