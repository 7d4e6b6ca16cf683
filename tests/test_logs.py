"""`gpu-compete logs`: a task's log by attempt, and following it while the task runs."""

from __future__ import annotations

import signal
import subprocess

from gpu_compete import tasklog

from .daemon_harness import DaemonRun
from .helpers import clean_env, gpu_compete_cmd, run_gpu_compete, wait_for

LOG = (b"==== 2026-01-01T00:00:00.000 start q1-1-x (supervisor 10): attempt 1 on GPU 0: run\n"
       b"first try\n"
       b"==== 2026-01-01T00:00:01.000 end q1-1-x: status 1, abnormal_exit (runtime_error)\n"
       b"==== 2026-01-01T00:00:02.000 start q1-1-x (supervisor 11): attempt 2 on GPU 1: run\n"
       b"second try\n")


def test_sections_split_by_headers_and_see_end_lines():
    """Each `==== start` header opens an attempt numbered as it says; an end line marks it ended."""
    parts = tasklog.sections(LOG, "q1-1-x")
    assert [(p.number, p.ended) for p in parts] == [(1, True), (2, False)]
    assert tasklog.select(LOG, "q1-1-x", 2).endswith(b"second try\n")
    assert b"second" not in tasklog.select(LOG, "q1-1-x", 1)
    assert tasklog.select(LOG, "q1-1-x", 3) is None
    assert tasklog.select(LOG, "q1-1-x", None) == LOG


def test_attempt_numbers_come_from_the_headers():
    """A log whose first attempts were lost (or a --fresh rerun) is numbered as its headers say; a repeat means the last."""
    log = LOG.replace(b"attempt 1 on", b"attempt 4 on").replace(b"attempt 2 on", b"attempt 5 on")
    assert [p.number for p in tasklog.sections(log, "q1-1-x")] == [4, 5]
    rerun = LOG + LOG.replace(b"first try", b"again")
    assert b"again" in tasklog.select(rerun, "q1-1-x", 1)


def test_exec_logs_without_attempt_numbers_count_by_position():
    """A `gpu-compete exec --log` header names no attempt: attempts are numbered in order."""
    log = (b"==== T start e1 (supervisor 1): python a.py\nA\n==== T end e1: status 0, normal_exit\n"
           b"==== T start e1 (supervisor 2): python a.py\nB\n")
    assert [p.number for p in tasklog.sections(log, "e1")] == [1, 2]


def test_follow_yields_appended_bytes_until_done(tmp_path):
    """Following reads what is appended between polls and stops once the task is over and the file still."""
    path = tmp_path / "t.log"
    writes = [LOG[:50], LOG[50:200], LOG[200:], b"==== T end q1-1-x: status 0, normal_exit\n"]
    state = {"done": False}

    def sleep(_s):
        if writes:
            with open(path, "ab") as fh:
                fh.write(writes.pop(0))
        else:
            state["done"] = True

    got = b"".join(tasklog.follow(path, "q1-1-x", None, lambda: state["done"], sleep=sleep))
    assert got == LOG + b"==== T end q1-1-x: status 0, normal_exit\n"


def test_follow_one_attempt_stops_at_its_end_line(tmp_path):
    """With an attempt, following stops at that attempt's end line, even while the task goes on."""
    path = tmp_path / "t.log"
    path.write_bytes(LOG)
    got = b"".join(tasklog.follow(path, "q1-1-x", 1, lambda: False, sleep=lambda s: None))
    assert got.endswith(b"abnormal_exit (runtime_error)\n") and b"second" not in got


def test_logs_cli_prints_one_attempt_and_refuses_a_missing_one(tmp_path):
    """`logs ID --attempt N` prints that attempt; an attempt that isn't there exits 1 naming those that are."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "q1-1-x.log").write_bytes(LOG)
    out = run_gpu_compete("logs", "q1-1-x", "--state-dir", str(tmp_path), "--attempt", "2", env=clean_env())
    assert out.returncode == 0 and out.stdout.startswith("==== ") and "second try" in out.stdout
    assert "first try" not in out.stdout
    out = run_gpu_compete("logs", "q1-1-x", "--state-dir", str(tmp_path), "--attempt", "5", env=clean_env())
    assert out.returncode == 1 and "attempts in its log: 1, 2" in out.stderr
    out = run_gpu_compete("logs", "nope", "--state-dir", str(tmp_path), env=clean_env())
    assert out.returncode == 1 and "no log for nope" in out.stderr
    out = run_gpu_compete("logs", "../etc", "--state-dir", str(tmp_path), env=clean_env())
    assert out.returncode == 2


def test_logs_follow_a_real_task_until_it_ends(tmp_path):
    """`logs -f` started while a task runs prints its output as it comes and exits by itself once the task completed."""
    run = DaemonRun(tmp_path, [("1", 1, "slow", 1.5, "ok")], simulate="1x24")
    uid = run.names["slow"]
    daemon = subprocess.Popen(run.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
    try:
        log = run.state / "logs" / f"{uid}.log"
        wait_for(lambda: log.exists() and b" start " in log.read_bytes(), 15, "the task's log")
        follower = subprocess.run(gpu_compete_cmd("logs", uid, "-f", "--state-dir", str(run.state)),
                                  capture_output=True, text=True, timeout=30, env=clean_env())
        assert follower.returncode == 0
        assert f"start {uid}" in follower.stdout and f"end {uid}: status 0, normal_exit" in follower.stdout
        assert daemon.wait(timeout=15) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_follow_without_log_or_daemon_says_there_is_no_log(tmp_path):
    """`logs -f` of a task that has no log and nothing to start it fails at once instead of waiting forever."""
    out = run_gpu_compete("logs", "q1-1-x", "-f", "--state-dir", str(tmp_path), env=clean_env())
    assert out.returncode == 1 and "no log for q1-1-x" in out.stderr


def test_follow_stops_for_a_task_the_running_daemon_does_not_have(tmp_path):
    """`logs -f` of an old task's log, while a daemon runs other tasks, prints it and ends instead of waiting forever."""
    run = DaemonRun(tmp_path, [("1", 1, "slow", 20, "ok")], simulate="1x24")
    (run.state / "logs").mkdir(parents=True)
    (run.state / "logs" / "q1-1-x.log").write_bytes(LOG)
    daemon = subprocess.Popen(run.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
    try:
        wait_for(lambda: (run.state / "status.json").exists(), 15, "the daemon's status.json")
        out = subprocess.run(gpu_compete_cmd("logs", "q1-1-x", "-f", "--state-dir", str(run.state)),
                             capture_output=True, timeout=30, env=clean_env())
        assert out.returncode == 0 and out.stdout == LOG
        assert daemon.poll() is None  # it was followed while the daemon ran
        daemon.send_signal(signal.SIGUSR2)  # end its task too, as `stop --kill` does
        daemon.wait(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
