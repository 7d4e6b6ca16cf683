"""A living queue end to end: the command file edited under a running daemon, and single
tasks steered with skip, retry, kill, pause; with real processes and a real daemon."""

from __future__ import annotations

import json
import signal

import pytest

from .helpers import wait_for
from .living_harness import Live, block


@pytest.fixture
def live(tmp_path):
    made = []

    def make(blocks, simulate="4x24"):
        made.append(Live(tmp_path, blocks, simulate))
        return made[-1]

    yield make
    for one in made:
        one.cleanup()


def test_added_removed_and_edited_blocks_apply_within_a_round(live):
    """A new queue starts at once, a removed pending task never runs, a running task whose block
    was edited runs to its end and its edited version runs after it."""
    run = live([block("A", "1", "hold"), block("B", "1"), block("C", "2", "hold")])
    run.start()
    run.wait_started("A")
    run.wait_started("C")
    run.write([block("A", "1", "hold"), block("D", "3"), block("C2", "2")])  # B removed, C edited into C2
    wait_for(lambda: run.ends("D") == 1, 15, "new queue 3 to run D at once")
    assert run.starts("C2") == 0  # C still runs: its queue waits for it
    run.release("C")
    wait_for(lambda: run.ends("C2") == 1, 15, "C2 after C ends")
    run.release("A")
    code, _, err = run.wait()
    assert code == 0, err
    assert run.starts("B") == 0
    assert run.order().index("C2") > run.order().index("C")
    assert '"command file reloaded"' in err


def test_a_task_inserted_before_a_running_one_runs_next_and_a_reorder_holds(live):
    """A block inserted before the running task runs right after it; reordered pending blocks run
    in their new order."""
    run = live([block("A", "1", "hold"), block("B"), block("C")])
    run.start()
    run.wait_started("A")
    run.write([block("X"), block("A", "1", "hold"), block("C"), block("B")])
    run.rounds_pass()
    assert run.starts("X") == 0  # never beside the running task of its queue
    run.release("A")
    code, _, err = run.wait()
    assert code == 0, err
    assert run.order() == ["A", "X", "C", "B"]


def test_a_broken_edit_keeps_the_last_good_file_until_fixed(live):
    """A bad edit is not applied, is logged once as FILE:LINE, shows in status, and the fixed file
    is applied; the running task is never disturbed."""
    run = live([block("A", "1", "hold"), block("B")])
    run.start()
    run.wait_started("A")
    run.write([block("A", "1", "hold"), "bash {work_dir}/task.sh N ok\n1,lots\n", block("B")], replace=False)
    wait_for(lambda: (run.status().get("steering") or {}).get("commands_error"), 15, "the error in status")
    error = run.status()["steering"]["commands_error"]
    assert error.startswith(f"{run.commands}:5: bad VRAM 'lots'")
    assert "NOT applied" in run.cli("status").stdout
    run.rounds_pass(5)
    run.write([block("A", "1", "hold"), block("N"), block("B")])
    wait_for(lambda: run.status()["steering"]["commands_error"] is None, 15, "the fixed file applied")
    run.release("A")
    code, _, err = run.wait()
    assert code == 0, err
    assert run.order() == ["A", "N", "B"]
    assert err.count("bad VRAM 'lots'") == 1


def test_add_appends_and_the_daemon_takes_it_up(live):
    """`add` prints the new uni_id, the block is in the file, and the running daemon runs it."""
    run = live([block("A", "1", "hold")])
    run.start()
    run.wait_started("A")
    out = run.cli("add", "--queue", "q2", "--vram", "1", "--", "bash", "{work_dir}/task.sh", "Z")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == run.uid("Z")
    wait_for(lambda: run.ends("Z") == 1, 15, "the added task to run")
    run.release("A")
    assert run.wait()[0] == 0


def test_skip_unskip_and_refusals_on_live_tasks(live):
    """A skipped task does not run and its queue goes on; refusals exit 1, bad input and no
    daemon exit 2; the skip is in the history."""
    run = live([block("A", "1", "hold"), block("B"), block("C")])
    run.start()
    run.wait_started("A")
    b, a = run.uid("B"), run.uid("A")
    assert run.cli("skip", b).returncode == 0
    refused = run.cli("skip", a)
    assert refused.returncode == 1 and "kill --skip" in refused.stderr
    assert run.cli("retry", b, "--json").returncode == 1
    unknown = run.cli("unskip", "q9-nothere", "--json")
    assert unknown.returncode == 1 and "unknown uni_id" in json.loads(unknown.stdout)["message"]
    assert run.cli("skip", "../etc").returncode == 2
    assert run.status()["totals"]["skipped"] == 1
    run.release("A")
    code, _, err = run.wait()
    assert code == 0, err
    assert run.order() == ["A", "C"]
    assert {"uni_id": b, "state": "skipped"}.items() <= run.history()[0].items() or any(
        h.get("uni_id") == b and h.get("state") == "skipped" for h in run.history())
    gone = run.cli("skip", b)
    assert gone.returncode == 2 and "no gpu-compete daemon is running" in gone.stderr


def test_kill_stops_a_running_task_which_runs_again_unless_skipped(live):
    """`kill` ends a running task (recorded stopped, run again); `kill --skip` ends it for good
    and its queue goes on."""
    run = live([block("K", "1", "hold"), block("L")])
    run.start()
    run.wait_started("K")
    k = run.uid("K")
    out = run.cli("kill", k)
    assert out.returncode == 0, out.stderr
    run.wait_started("K", 2)
    assert run.ends("K") == 0
    out = run.cli("kill", "--skip", k)
    assert out.returncode == 0, out.stderr
    code, _, err = run.wait()
    assert code == 0, err
    assert run.order() == ["K", "K", "L"]
    states = [h["state"] for h in run.history() if h["uni_id"] == k]
    assert states == ["stopped", "stopped", "skipped"]
    assert run.cli("kill", k).returncode == 2  # no daemon any more


def test_retry_reruns_a_task_that_failed_for_good_and_unblocks_its_queue(live):
    """With --max-retries 0 a failure blocks the queue; `retry` runs it again and its queue goes on."""
    run = live([block("F", "1", "fail-until-2"), block("G")])
    run.start("--max-retries", "0", "--follow")
    wait_for(lambda: run.queue("1")["status"] == "BLOCKED", 15, "the queue blocked")
    assert run.cli("retry", run.uid("F")).returncode == 0
    wait_for(lambda: run.ends("G") == 1, 15, "G after F succeeded")
    assert [h["state"] for h in run.history() if h["uni_id"] == run.uid("F")] == \
        ["abnormal_exit", "retried", "normal_exit"]
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait()[0] == 0


def test_pause_starts_nothing_new_and_resume_goes_on(live):
    """A paused queue starts nothing after its running task ends; other queues and `resume` go on."""
    run = live([block("A", "1", "hold"), block("B"), block("P", "2", "hold")])
    run.start()
    run.wait_started("A")
    assert run.cli("pause", "1").returncode == 0
    assert run.cli("pause", "nope").returncode == 1
    run.release("A")
    wait_for(lambda: run.queue("1")["status"] == "PAUSED", 15, "queue 1 shown paused")
    assert run.queue("1")["why"] == "paused: starts after `gpu-compete resume`"
    run.rounds_pass()
    assert run.starts("B") == 0
    assert run.cli("pause").returncode == 0
    assert run.cli("resume", "1").returncode == 0  # the daemon as a whole is still paused
    run.rounds_pass()
    assert run.starts("B") == 0
    assert run.cli("resume").returncode == 0
    wait_for(lambda: run.ends("B") == 1, 15, "B after resume")
    run.release("P")
    assert run.wait()[0] == 0


def test_a_restart_after_edits_reruns_nothing_completed_and_starts_nothing_twice(live):
    """After edits, a skip and a daemon killed with -9, a restart runs only what is left."""
    run = live([block("A"), block("B", "1", "hold"), block("S", "2", "hold"), block("T", "2")])
    run.start()
    run.wait_started("B")
    run.write([block("X"), block("A"), block("B", "1", "hold"), block("Y"),
               block("S", "2", "hold"), block("T", "2")])
    wait_for(lambda: run.status()["totals"]["pending"] == 3, 15, "the edit applied (X, Y, T pending)")
    assert run.cli("skip", run.uid("T")).returncode == 0
    run.proc.kill()
    run.proc.communicate()
    run.start()
    run.release("B")
    wait_for(lambda: run.ends("Y") == 1, 20, "Y after B")
    run.release("S")
    code, _, err = run.wait()
    assert code == 0, err
    assert sorted(run.order()) == sorted(["A", "B", "S", "X", "Y"])  # each once: none twice, T skipped


def test_follow_waits_for_the_file_to_grow(live):
    """With GPU_COMPETE_FOLLOW=1 (--follow) the daemon stays when all is done, and runs a block
    appended later."""
    run = live([block("A")])
    run.start(env={"GPU_COMPETE_FOLLOW": "1"})
    wait_for(lambda: run.ends("A") == 1, 15, "A")
    run.rounds_pass()
    assert run.proc.poll() is None
    with open(run.commands, "a") as fh:
        fh.write("\n" + block("B"))
    wait_for(lambda: run.ends("B") == 1, 15, "B appended later")
    run.proc.send_signal(signal.SIGHUP)  # a reload on request changes nothing and stops nothing
    run.rounds_pass()
    assert run.proc.poll() is None
    assert run.cli("reload").returncode == 0
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait()[0] == 0


def test_history_of_position_based_ids_is_resumed(live):
    """Tasks completed under the previous version's ids (`q1-2-abcd1234`) are not run again."""
    run = live([block("A"), block("B"), block("C")])
    from gpu_compete.commandfile import parse
    specs = parse(run.commands.read_text()).tasks
    run.state.mkdir()
    (run.state / "history.jsonl").write_text(
        "".join(json.dumps({"uni_id": s.legacy_uni_id, "state": "normal_exit"}) + "\n" for s in specs[:2]))
    run.start()
    code, _, err = run.wait()
    assert code == 0, err
    assert run.order() == ["C"]
    assert {h.get("migrated_from") for h in run.history() if h["uni_id"] in (specs[0].uni_id, specs[1].uni_id)} == \
        {specs[0].legacy_uni_id, specs[1].legacy_uni_id}
