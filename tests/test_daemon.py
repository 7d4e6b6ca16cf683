"""The daemon end to end: real processes on simulated GPUs, checked from what the tasks did."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from .daemon_harness import (DaemonRun, assert_each_succeeded_once, assert_exclusive, assert_queue_order,
                             overlapping)
from .helpers import console_script, wait_for

CLASSIC = [("1", 8, "a", 0.6, "ok"), ("1", 8, "b", 0.6, "ok"),
           ("2", 8, "c", 0.6, "ok"), ("2", 8, "d", 0.6, "ok"), ("2", 8, "e", 0.6, "ok"),
           ("3", 8, "f", 0.6, "ok")]


def queues_of(run: DaemonRun, blocks) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for queue, _, name, _, _ in blocks:
        out.setdefault(queue, []).append(run.names[name])
    return out


def test_classic_scenario_keeps_order_runs_queues_in_parallel_and_never_doubles_a_gpu(tmp_path):
    """Queue 1: a→b, queue 2: c→d→e, queue 3: f on two GPUs: order holds, queues overlap, GPUs don't."""
    run = DaemonRun(tmp_path, CLASSIC, simulate="2x24")
    code, out, err = run.run()
    assert code == 0, err
    attempts = run.attempts()
    assert_each_succeeded_once(attempts, list(run.names.values()))
    assert_queue_order(attempts, queues_of(run, CLASSIC))
    assert_exclusive(attempts)
    assert {a.gpu for a in attempts} == {"0", "1"}
    assert any(overlapping(x, y) for x in attempts for y in attempts if x is not y), "queues never ran in parallel"
    assert {h["uni_id"] for h in run.history() if h["state"] == "normal_exit"} == set(run.names.values())
    assert run.registry() == {}  # completed records leave the registry
    assert "6 completed" in out
    log = (run.state / "logs" / f"{run.names['a']}.log").read_text()
    assert "start" in log and "normal_exit" in log


def test_failures_are_classified_retried_and_back_off(tmp_path):
    """A task failing twice (burst 2) is retried at once, then backs off, then succeeds; its queue waits."""
    blocks = [("1", 1, "flaky", 0.1, "fail-until-3"), ("1", 1, "next", 0.1, "ok")]
    run = DaemonRun(tmp_path, blocks, simulate="1x24")
    code, _, err = run.run("--retry-burst", "2", "--backoff", "1.5")
    assert code == 0, err
    flaky = [a for a in run.attempts() if a.uni_id == run.names["flaky"]]
    assert [a.status for a in flaky] == [1, 1, 0]
    assert flaky[1].start - flaky[0].end < 1.0  # first failure: retried at the next round
    assert flaky[2].start - flaky[1].end >= 1.5  # second failure completes a burst: backoff
    assert_queue_order(run.attempts(), queues_of(run, blocks))
    fails = [h for h in run.history() if h["uni_id"] == run.names["flaky"] and h["state"] == "abnormal_exit"]
    assert [(h["error_type"], h["attempt"]) for h in fails] == [("runtime_error", 1), ("runtime_error", 2)]


def test_giving_up_blocks_the_queue_and_exits_1(tmp_path):
    """After --max-retries a task fails for good: its queue is blocked, other queues finish, exit 1."""
    blocks = [("1", 1, "oom", 0.1, "oom"), ("1", 1, "never", 0.1, "ok"), ("2", 1, "other", 0.3, "ok")]
    run = DaemonRun(tmp_path, blocks, simulate="1x24")
    code, out, err = run.run("--max-retries", "1", "--shared")
    assert code == 1, err
    assert run.started("oom") == 2 and run.started("never") == 0 and run.started("other") == 1
    record = run.registry()[run.names["oom"]]
    assert record["state"] == "abnormal_exit" and record["error_type"] == "oom" and record["gave_up"] is True
    assert "BLOCKED" in out and "1 blocked" in out


def test_a_lease_keeps_a_gpu_until_the_task_shows_in_nvml(tmp_path):
    """Shared mode, 2 s start-up: a 14 GB task isn't joined by another 14 GB one on a 24 GB GPU
    while it is still invisible, and once visible its VRAM is not subtracted twice."""
    blocks = [("A", 14, "big1", 3.0, "ok"),
              ("B", 0, "short", 0.3, "ok"), ("B", 14, "big2", 0.3, "ok"),
              ("C", 0, "wait", 2.6, "ok"), ("C", 10, "fits", 0.3, "ok")]
    run = DaemonRun(tmp_path, blocks, simulate="1x24,delay=2")
    code, _, err = run.run("--shared", "--settle", "30")
    assert code == 0, err
    by = {a.uni_id: a for a in run.attempts()}
    big1, big2, fits = by[run.names["big1"]], by[run.names["big2"]], by[run.names["fits"]]
    assert big2.start >= big1.end, "two 14 GB tasks shared a 24 GB GPU"
    # `fits` (10 GB) becomes a candidate at ~2.6 s, when big1 is visible (14 GB used, 10 free).
    assert fits.start < big1.end, "a visible task's VRAM was subtracted a second time"


def test_exclusive_mode_skips_a_gpu_holding_a_process_of_the_user(tmp_path):
    """A GPU where the user already runs something gets no task in exclusive mode."""
    import os

    sim = tmp_path / "sim.json"
    sim.write_text(json.dumps({"gpus": [{"memory_gb": 24, "processes": [{"pid": os.getpid(), "memory_gb": 1}]},
                                        {"memory_gb": 24}]}))
    blocks = [("1", 1, "x", 0.2, "ok"), ("2", 1, "y", 0.2, "ok")]
    run = DaemonRun(tmp_path, blocks, simulate=str(sim))
    code, _, err = run.run()
    assert code == 0, err
    assert {a.gpu for a in run.attempts()} == {"1"}


def test_kill_9_of_the_daemon_then_resume_runs_nothing_twice(tmp_path):
    """A daemon killed with SIGKILL leaves its tasks running; the restart adopts them and skips completed ones."""
    blocks = [("1", 1, "a1", 0.3, "ok"), ("1", 1, "a2", 2.0, "ok"), ("1", 1, "a3", 0.3, "ok"),
              ("2", 1, "b1", 2.0, "ok"), ("2", 1, "b2", 0.3, "ok")]
    run = DaemonRun(tmp_path, blocks, simulate="2x24")
    run.start()
    run.wait_started("a2")
    run.kill_hard()
    assert run.started("a3") == 0
    code, out, err = run.run()
    assert code == 0, err
    attempts = run.attempts()
    assert_each_succeeded_once(attempts, list(run.names.values()))
    assert len(attempts) == len(blocks), "a task ran twice"
    assert_queue_order(attempts, queues_of(run, blocks))
    assert "adopted running task" in err


def test_drain_lets_running_tasks_finish_and_starts_nothing_new(tmp_path):
    """SIGTERM drains: the running task ends normally, the next one waits; a restart runs the rest."""
    blocks = [("1", 1, "first", 1.5, "ok"), ("1", 1, "second", 0.2, "ok")]
    run = DaemonRun(tmp_path, blocks, simulate="1x24")
    run.start()
    run.wait_started("first")
    run.signal(signal.SIGTERM)
    code, _, err = run.wait()
    assert code == 130
    assert "resume" in err
    assert run.started("second") == 0
    assert [a.status for a in run.attempts()] == [0]
    code, _, err = run.run()
    assert code == 0, err
    assert run.started("first") == 1 and run.started("second") == 1


def test_stop_kill_ends_the_tasks_and_a_restart_runs_them_again(tmp_path):
    """`gpu-compete stop --kill` ends the task's process group; the restart runs it again, not counted as failure."""
    blocks = [("1", 1, "long", 60, "ok"), ("2", 1, "other", 60, "ok")]
    run = DaemonRun(tmp_path, blocks, simulate="2x24")
    run.start()
    run.wait_started("long")
    run.wait_started("other")
    stop = subprocess.run([console_script(), "stop", "--state-dir", str(run.state), "--kill"],
                          capture_output=True, text=True)
    assert stop.returncode == 0, stop.stderr
    code, _, err = run.wait(timeout=30)
    assert code == 130, err
    records = run.registry()
    for name in ("long", "other"):
        assert records[run.names[name]]["error_type"] == "stopped"
        assert records[run.names[name]]["retry_count"] == 0
    assert not [a for a in run.attempts() if a.end is not None]  # killed, not finished
    # the restart runs them again: patch the file so they are quick this time
    run.commands.write_text(run.commands.read_text())
    run.start("--backoff", "0")
    run.wait_started("long", 2)
    run.signal(signal.SIGUSR2)  # stop --kill again, so the test ends
    run.wait(timeout=30)


def test_a_second_daemon_on_the_same_state_dir_is_refused(tmp_path):
    """While one daemon runs, another on its state directory exits 2 and says who holds it."""
    run = DaemonRun(tmp_path, [("1", 1, "long", 60, "ok")], simulate="1x24")
    run.start()
    run.wait_started("long")
    second = subprocess.run(run.argv(), capture_output=True, text=True, timeout=30)
    assert second.returncode == 2
    assert "another gpu-compete daemon" in second.stderr
    status = subprocess.run([console_script(), "status", "--state-dir", str(run.state)],
                            capture_output=True, text=True, timeout=30)
    assert "BUSY" in status.stdout and run.names["long"] in status.stdout
    run.signal(signal.SIGUSR2)
    run.wait(timeout=30)


def test_sigusr1_prints_status_and_status_json_is_written(tmp_path):
    """SIGUSR1 prints the status table on stdout; status.json holds queues and GPUs."""
    run = DaemonRun(tmp_path, [("1", 1, "long", 60, "ok")], simulate="1x24")
    run.start()
    run.wait_started("long")
    view = wait_for(lambda: _status_json(run), timeout=10, what="status.json")
    assert view["queues"][0]["status"] == "BUSY" and view["gpus"][0]["running"] == [run.names["long"]]
    run.signal(signal.SIGUSR1)
    run.signal(signal.SIGUSR2)
    _, out, _ = run.wait(timeout=30)
    assert out.count("QUEUE") >= 2  # the SIGUSR1 print and the final one


def _status_json(run: DaemonRun):
    try:
        view = json.loads((run.state / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return view if view["totals"]["running"] else None


def test_a_killed_supervisor_is_lost_and_retried(tmp_path):
    """SIGKILL of a task's supervisor: the task is recorded as lost, its leftovers ended, and it runs again."""
    blocks = [("1", 1, "victim", 1.0, "ok")]
    run = DaemonRun(tmp_path, blocks, simulate="1x24")
    run.start()
    run.wait_started("victim")
    record = wait_for(lambda: run.registry().get(run.names["victim"], {}).get("supervisor_pid"), timeout=10,
                      what="the supervisor's pid")
    import os

    os.kill(record, signal.SIGKILL)
    code, _, err = run.wait()
    assert code == 0, err
    lost = [h for h in run.history() if h.get("error_type") == "lost"]
    assert len(lost) == 1
    assert [a.status for a in run.attempts()] == [None, 0]  # the first never finished


def test_dry_run_launches_nothing(tmp_path):
    """--dry-run shows queues, expanded commands and eligible GPUs, and starts no task."""
    run = DaemonRun(tmp_path, CLASSIC, simulate="2x24")
    code, out, err = run.run("--dry-run")
    assert code == 0, err
    assert "would start on GPU" in out and "task.sh" in out and "GPU 0" in out
    assert run.attempts() == [] and not (run.state / "daemon.pid").exists()


@pytest.mark.parametrize("option,value", [("--poll", "-1"), ("--poll", "abc"), ("--settle", "nan"),
                                          ("--backoff", "-5"), ("--retry-burst", "0"), ("--poll", "0")])
def test_bad_option_values_exit_2(tmp_path, option, value):
    """Negative, non-numeric or non-finite seconds and a zero burst are refused with exit 2."""
    run = DaemonRun(tmp_path, [("1", 1, "x", 0.1, "ok")], simulate="1x24")
    result = subprocess.run(run.argv(option, value), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert option in result.stderr or "poll" in result.stderr


def test_options_can_come_from_the_environment(tmp_path):
    """GPU_COMPETE_<NAME> sets an option: the whole run configured without flags."""
    import os

    run = DaemonRun(tmp_path, [("1", 1, "x", 0.1, "ok")], simulate="1x24")
    env = dict(os.environ, GPU_COMPETE_COMMANDS=str(run.commands), GPU_COMPETE_SIMULATE="3x24",
               GPU_COMPETE_STATE_DIR=str(run.state), GPU_COMPETE_WORK_DIR=str(tmp_path),
               GPU_COMPETE_DRY_RUN="1", GPU_COMPETE_GPUS="2")
    done = subprocess.run([console_script()], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "would start on GPU 2" in done.stdout
    env["GPU_COMPETE_POLL"] = "soon"
    bad = subprocess.run([console_script(), "run"], env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "poll" in bad.stderr


def test_status_is_printed_every_status_every_seconds(tmp_path):
    """--status-every S prints the status table periodically on stdout while tasks run."""
    run = DaemonRun(tmp_path, [("1", 1, "x", 1.5, "ok")], simulate="1x24")
    argv = run.argv()
    argv[argv.index("--status-every") + 1] = "0.4"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("QUEUE  STATUS") >= 3  # at least two while running, and the final one
    assert "BUSY" in done.stdout and "DONE" in done.stdout


def test_a_gpu_goes_to_another_queue_once_its_task_is_gone_before_the_outcome_is_written(tmp_path):
    """The supervisor says its task's processes are all gone before it writes the outcome. With
    the registry's lock held, so that no outcome can be written, another queue's task still
    starts on the GPU the first one left; its own queue would wait for the outcome."""
    import fcntl
    import os

    blocks = [("1", 10, "a", 1.5, "ok"), ("1", 10, "a2", 0.2, "ok"), ("2", 10, "b", 0.2, "ok")]
    run = DaemonRun(tmp_path, blocks, simulate="1x24")  # queue 1 is longer: it goes first
    run.start()
    run.wait_started("a")
    a = run.names["a"]
    # Both of a's writers (supervisor and daemon) and its peak VRAM are in: nothing more is
    # written for it until it ends.
    wait_for(lambda: {"exec_pid", "supervisor_pid", "peak_vram_gb"} <= set(run.registry().get(a, {})), 10,
             "a's record to be complete")
    fd = os.open(run.state / "uni_id.json.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        run.wait_started("b", timeout=15)
        assert run.registry()[a]["state"] == "running"  # a's outcome still waits for the lock
    finally:
        os.close(fd)
    code, _, err = run.wait()
    assert code == 0, err
    attempts = run.attempts()
    assert [x.uni_id for x in attempts] == [a, run.names["b"], run.names["a2"]]
    assert_exclusive(attempts)
    assert_queue_order(attempts, queues_of(run, blocks))
    assert_each_succeeded_once(attempts, list(run.names.values()))


def test_a_task_s_late_child_still_listed_after_the_end_does_not_hold_the_gpu(tmp_path):
    """A task starts a GPU process of its own after its launch was confirmed, and ends; NVML
    (here the simulation, linger=6) lists that exited child for seconds more. The next task
    starts at once, not when the listing goes away."""
    blocks = [("1", 16, "a", 1.0, "late-child"), ("1", 16, "a2", 0.2, "ok"), ("2", 16, "b", 0.2, "ok")]
    run = DaemonRun(tmp_path, blocks, simulate="1x24,linger=6")  # queue 1 is longer: it goes first
    code, _, err = run.run(timeout=60)
    assert code == 0, err
    first, second, _ = sorted(run.attempts(), key=lambda x: x.start)
    assert first.uni_id == run.names["a"]
    assert second.start - first.end < 3.0, f"the next task waited {second.start - first.end:.2f} s"
