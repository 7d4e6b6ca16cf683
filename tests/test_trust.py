"""Trust beside the old wrapper scripts: real daemons, the real unlocked bash registry writer
(tests/legacy/update_uni_id_status.sh, kept verbatim), real kills and restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psutil

from .daemon_harness import DaemonRun, assert_each_succeeded_once
from .helpers import clean_env, console_script, run_gpu_compete, wait_for

LEGACY = Path(__file__).parent / "legacy" / "update_uni_id_status.sh"


def legacy_write(registry: Path, uni_id: str, pid: int, state: str) -> None:
    """One write by the old wrapper function (`state` "bare" writes the oldest form)."""
    subprocess.run(["bash", "-c", f'source "{LEGACY}"; update_uni_id_status "$@"', "legacy",
                    str(registry), uni_id, str(pid), state], check=True, timeout=30)


def custom_run(tmp_path: Path, tasks: dict[str, tuple[str, str]], simulate: str = "2x24") -> DaemonRun:
    """A DaemonRun over tasks given as name -> (command, queue line); `names` maps them to uni_ids."""
    run = DaemonRun(tmp_path, [("1", 1, "placeholder", 0, "ok")], simulate=simulate)
    lines = []
    for name, (command, queue_line) in tasks.items():
        lines += [f"# task {name}", command, queue_line, ""]
    run.commands.write_text("\n".join(lines))
    run.names = run._names()
    return run


WRAPPER = r"""#!/bin/bash
# wrapper.sh UNI_ID SECONDS FORM [fail]: registers itself the old way, works, maybe fails.
source "%s"
uid=$1; seconds=$2; form=$3; outcome=${4:-ok}
here=$(cd "$(dirname "$0")" && pwd)
update_uni_id_status "$GPU_COMPETE_REGISTRY" "$uid" $$ "$form"
echo "start $uid ${CUDA_VISIBLE_DEVICES:-none} $(date +%%s.%%N)" >> "$here/events"
sleep "$seconds"
if [ "$outcome" = fail ]; then
  python3 -c 'raise RuntimeError("the loss went to nan")'
  status=$?
else
  status=0
fi
echo "end $uid ${CUDA_VISIBLE_DEVICES:-none} $(date +%%s.%%N) $status" >> "$here/events"
exit $status
""" % LEGACY


def write_wrapper(run: DaemonRun) -> None:
    (run.dir / "wrapper.sh").write_text(WRAPPER)
    (run.dir / "wrapper.sh").chmod(0o755)


def test_a_legacy_writer_loop_beside_the_daemon_loses_no_record(tmp_path):
    """The old unlocked writer adds 120 records one by one while the daemon writes the registry
    every few hundred ms: every one of the 120 is in the registry at the end."""
    blocks = [(q, 1, f"{q}{i}", 0.15, "ok") for q in "abc" for i in range(6)]
    run = DaemonRun(tmp_path, blocks, simulate="3x24")
    run.start()
    wait_for(lambda: (run.state / "uni_id.json").exists(), 20, "the registry")
    legacy = subprocess.run(["bash", str(LEGACY), str(run.state / "uni_id.json"), "120", "legacy"],
                            capture_output=True, text=True, timeout=120)
    assert legacy.returncode == 0, legacy.stderr
    code, _, err = run.wait(timeout=90)
    assert code == 0, err
    assert_each_succeeded_once(run.attempts(), list(run.names.values()))
    records = run.registry()
    lost = [f"legacy-{i}" for i in range(120) if f"legacy-{i}" not in records]
    assert lost == [], f"{len(lost)} legacy records lost"


def test_a_bare_pid_record_of_a_live_task_is_adopted_after_kill_9_not_killed_or_rerun(tmp_path):
    """A task whose wrapper rewrote its record as a bare pid survives a daemon SIGKILL and restart:
    adopted, never signalled, never started twice."""
    run = custom_run(tmp_path, {"w": ("bash {work_dir}/wrapper.sh {uni_id} 3 bare", "1,1")}, simulate="1x24")
    write_wrapper(run)
    uid = run.names["w"]
    run.start()
    wait_for(lambda: isinstance(run.registry().get(uid), int), 20, "the wrapper's bare-pid record")
    run.kill_hard()
    code, _, err = run.run(timeout=60)
    assert code == 0, err
    assert "adopted running task" in err
    attempts = run.attempts()
    assert [(a.uni_id, a.status) for a in attempts] == [(uid, 0)], "killed or run twice"


def test_an_adopted_failure_keeps_its_error_type_when_the_registry_was_clobbered(tmp_path):
    """A task fails with a RuntimeError while no daemon runs and an old script then rewrites its
    record as a bare pid: the restart records runtime_error (from the supervisor's end line), not lost."""
    run = custom_run(tmp_path, {"w": ("bash {work_dir}/wrapper.sh {uni_id} 1 running fail", "1,1")},
                     simulate="1x24")
    write_wrapper(run)
    uid = run.names["w"]
    run.start("--max-retries", "0")
    run.wait_started("w")
    run.kill_hard()
    log = run.state / "logs" / f"{uid}.log"
    wait_for(lambda: " end " in log.read_text(), 20, "the supervisor's end line")
    legacy_write(run.state / "uni_id.json", uid, 999_999, "bare")  # a dead pid, no state
    code, _, err = run.run("--max-retries", "0", timeout=60)
    assert code == 1, err
    fails = [h for h in run.history() if h["uni_id"] == uid and h["state"] == "abnormal_exit"]
    assert [h["error_type"] for h in fails] == ["runtime_error"]
    assert len(run.attempts()) == 1


def test_failed_for_good_survives_a_script_removing_its_record(tmp_path):
    """A task that gave up stays failed across a restart even after its registry record is gone:
    the history says so. --fresh then gives it a fresh retry budget (attempts 1, 2 again)."""
    blocks = [("1", 1, "bad", 0.05, "fail")]
    run = DaemonRun(tmp_path, blocks, simulate="1x24")
    code, _, err = run.run("--max-retries", "1")
    assert code == 1, err
    uid = run.names["bad"]
    assert [h.get("gave_up") for h in run.history() if h["uni_id"] == uid] == [None, True]
    (run.state / "uni_id.json").write_text("{}")  # an old script dropped the record
    code, _, err = run.run("--max-retries", "1")
    assert code == 1, err
    assert run.started("bad") == 2, "a task that failed for good ran again"
    dry = subprocess.run(run.argv("--max-retries", "1", "--dry-run"), capture_output=True, text=True, timeout=30)
    assert dry.returncode == 0 and "would start" not in dry.stdout, dry.stdout
    code, _, err = run.run("--max-retries", "1", "--fresh")
    assert code == 1, err
    attempts = [h["attempt"] for h in run.history() if h["uni_id"] == uid]
    assert attempts == [1, 2, 1, 2]


def test_stop_kill_status_says_stopped_and_runs_on_restart(tmp_path):
    """After `stop --kill`, the final status says the task was stopped and runs on restart,
    not a negative retry countdown."""
    run = DaemonRun(tmp_path, [("1", 1, "long", 60, "ok")], simulate="1x24")
    run.start()
    run.wait_started("long")
    assert subprocess.run([console_script(), "stop", "--state-dir", str(run.state), "--kill"],
                          capture_output=True, timeout=30).returncode == 0
    code, out, err = run.wait(timeout=30)
    assert code == 130, err
    assert "stopped; runs on restart" in out
    assert "(-" not in out and "in -" not in out


def test_json_log_format_makes_every_stderr_line_json(tmp_path):
    """--log-format json: warnings (a corrupt registry, a misspelled placeholder), failures and
    the closing advice are all JSON objects, one per line."""
    run = custom_run(tmp_path, {"typo": ("echo {uniid}", "1,1"), "bad": ("exit 3", "2,1")}, simulate="2x24")
    run.state.mkdir()
    (run.state / "uni_id.json").write_text("{not json")
    code, _, err = run.run("--max-retries", "0")
    assert code == 1
    lines = err.splitlines()
    assert len(lines) >= 4
    events = [json.loads(line)["event"] for line in lines]
    assert any("not a placeholder" in e for e in events)
    assert any("not valid JSON" in e for e in events)
    bad = subprocess.run(run.argv("--poll", "x"), capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--poll" in json.loads(bad.stderr.strip())["event"]


def test_a_task_larger_than_every_gpu_is_said_once_and_shown_in_status(tmp_path):
    """A 30 GB task on 24 GB GPUs: one log line saying so (not one per round), and status names
    what it needs and what the largest GPU has; the other queue runs."""
    run = DaemonRun(tmp_path, [("1", 30, "huge", 0.1, "ok"), ("2", 1, "small", 0.1, "ok")], simulate="2x24")
    run.start()
    run.wait_started("small")
    wait_for(lambda: "needs 30 GB; the largest GPU has 24 GB" in run_gpu_compete(
        "status", "--state-dir", str(run.state)).stdout, 20, "status to explain the wait")
    run.signal(signal.SIGTERM)
    code, _, err = run.wait(timeout=30)
    assert code == 130
    told = [line for line in err.splitlines() if "fits no GPU" in line]
    assert len(told) == 1, told


def test_status_lists_this_daemons_tasks_and_says_when_nothing_ran(tmp_path):
    """`status` on an empty state dir says nothing has run; other records are hidden unless
    --all-records."""
    empty = run_gpu_compete("status", "--state-dir", str(tmp_path / "none"))
    assert empty.returncode == 0 and "nothing has run" in empty.stdout
    run = DaemonRun(tmp_path, [("1", 1, "long", 30, "ok")], simulate="1x24")
    run.start()
    try:
        run.wait_started("long")
        legacy_write(run.state / "uni_id.json", "someone-elses", os.getpid(), "running")
        wait_for(lambda: (run.state / "status.json").exists(), 10, "status.json")
        mine = run_gpu_compete("status", "--state-dir", str(run.state))
        assert run.names["long"] in mine.stdout and "someone-elses" not in mine.stdout
        assert "1 other records" in mine.stdout
        everything = run_gpu_compete("status", "--state-dir", str(run.state), "--all-records")
        assert "someone-elses" in everything.stdout
    finally:
        run.signal(signal.SIGUSR2)
        run.wait(timeout=30)


def test_supervisors_are_named_in_ps_and_tasks_find_gpu_compete_on_path(tmp_path):
    """A supervisor shows as `gpu-compete: supervisor <uni_id>`; a task started with a PATH that
    lacks the venv still finds `gpu-compete exec` (the README's wrapped-script example)."""
    run = custom_run(tmp_path, {"wrapped": ("gpu-compete exec --uni-id {uni_id}-inner -- sleep 2", "1,1")},
                     simulate="1x24")
    env = clean_env(PATH="/usr/bin:/bin")
    run.proc = subprocess.Popen(run.argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    uid = run.names["wrapped"]

    def supervisor_titles():
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if cmd.startswith("gpu-compete: supervisor"):
                out.append(cmd.strip())
        return out

    titles = wait_for(lambda: [t for t in supervisor_titles() if uid in t], 20, "the supervisor's title")
    assert titles == [f"gpu-compete: supervisor {uid}"]
    code, _, err = run.wait(timeout=60)
    assert code == 0, err
    assert "normal_exit" in (run.state / "logs" / f"{uid}.log").read_text()
    assert json.loads((run.state / "history.jsonl").read_text().splitlines()[-1])["uni_id"] == uid
