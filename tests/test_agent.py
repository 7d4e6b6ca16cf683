"""The node agent in-process: real supervisors and tasks on simulated GPUs, no Ray."""

from __future__ import annotations

import errno
import json
import os
import signal
import time

import pytest

from gpu_compete.agent import Agent
from gpu_compete.registry import Registry
from gpu_compete.tasks import TaskSpec, make_uni_id

from .helpers import wait_for


def spec(command: str, queue: str = "1", vram: float = 4) -> TaskSpec:
    commands = (command,)
    return TaskSpec(queue=queue, position=1, commands=commands, vram_gb=vram, line=1,
                    uni_id=make_uni_id(queue, commands))


def until_ended(agent: Agent, uid: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        how = agent.observe([uid], wait_s=1.0)["tasks"][uid]
        if how["state"] == "ended":
            return how
    raise AssertionError(f"{uid} did not end in {timeout}s")


@pytest.fixture
def agent(tmp_path):
    return Agent("n1", str(tmp_path / "state"), str(tmp_path), simulate="2x24,delay=0.1", kill_grace=1)


def test_gpus_are_named_after_the_node_and_files_live_in_its_directory(agent, tmp_path):
    assert [s.key for s in agent.snapshot()] == ["n1/0", "n1/1"]
    task = spec("echo on $CUDA_VISIBLE_DEVICES at $GPU_COMPETE_NODE")
    agent.launch(task, ["1"], ["1"], attempt=1, retry_count=0)
    how = until_ended(agent, task.uni_id)
    assert how["outcome"] == "normal_exit" and how["exit_status"] == 0
    assert "on 1 at n1" in agent.log(task.uni_id)
    node = tmp_path / "state" / "nodes" / "n1"
    assert (node / "logs" / f"{task.uni_id}.log").exists()
    record = json.loads((node / "uni_id.json").read_text())[task.uni_id]
    assert record["node"] == "n1" and record["gpu"] == 1  # a whole GPU as its index, as wrapped scripts write it


def test_a_running_task_is_confirmed_on_its_gpu_and_its_end_wakes_the_wait(agent):
    task = spec("sleep 1.5")
    agent.launch(task, ["0"], ["0"], attempt=1, retry_count=0)
    wait_for(lambda: agent.observe([task.uni_id], wait_s=0.2)["tasks"][task.uni_id].get("confirmed"), 10,
             "the task to show on its GPU")
    started = time.monotonic()
    how = agent.observe([task.uni_id], wait_s=30)["tasks"][task.uni_id]
    assert time.monotonic() - started < 5  # woken by the task's end, not the 30 s wait
    assert how["state"] == "ended" or how["gone"]


def test_a_failure_is_classified_from_the_log(agent):
    task = spec("echo 'ModuleNotFoundError: No module named torchx' >&2; exit 1")
    agent.launch(task, ["0"], ["0"], attempt=1, retry_count=0)
    how = until_ended(agent, task.uni_id)
    assert how["outcome"] == "abnormal_exit" and how["error_type"] == "import_error"


def test_a_new_agent_adopts_a_task_of_the_one_before_and_sees_it_end(tmp_path, agent):
    task = spec("sleep 1")
    agent.launch(task, ["0"], ["0"], attempt=1, retry_count=0)
    again = Agent("n1", str(tmp_path / "state"), str(tmp_path), simulate="2x24,delay=0.1")
    assert task.uni_id in again.find([task.uni_id, "q9-nothing"])
    assert again.observe([task.uni_id])["tasks"][task.uni_id]["state"] == "running"
    how = until_ended(again, task.uni_id)
    assert how["outcome"] == "normal_exit"
    assert again.observe(["q9-nothing"])["tasks"]["q9-nothing"] == {"state": "unknown"}


def test_a_killed_supervisor_is_lost_and_its_task_ended(agent):
    task = spec("sleep 30")
    info = agent.launch(task, ["0"], ["0"], attempt=1, retry_count=0)
    record = wait_for(lambda: _record(agent, task.uni_id).get("exec_pid") and _record(agent, task.uni_id), 10,
                      "the supervisor's record")
    os.kill(info["pid"], signal.SIGKILL)
    how = until_ended(agent, task.uni_id)
    assert how["outcome"] == "lost"
    wait_for(lambda: not _alive(record["pid"]), 10, "the task's process to be ended")


def test_kill_ends_a_task_and_it_ends_abnormally(agent):
    task = spec("sleep 30")
    agent.launch(task, ["0"], ["0"], attempt=1, retry_count=0)
    wait_for(lambda: _record(agent, task.uni_id).get("exec_pid"), 10, "the supervisor's record")
    agent.kill([task.uni_id])
    how = until_ended(agent, task.uni_id)
    assert how["outcome"] in ("abnormal_exit", "lost")


def test_two_nodes_on_one_machine_never_see_each_others_tasks(tmp_path, agent):
    other = Agent("n2", str(tmp_path / "state"), str(tmp_path), simulate="2x24,delay=0.1")
    task = spec("sleep 2", vram=7)
    agent.launch(task, ["0"], ["0"], attempt=1, retry_count=0)
    wait_for(lambda: agent.observe([task.uni_id])["tasks"][task.uni_id].get("confirmed"), 10, "the task on n1")
    assert [p for s in other.snapshot() for p in s.processes] == []
    assert other.find([task.uni_id]) == {}
    until_ended(agent, task.uni_id)


def _record(agent: Agent, uid: str) -> dict:
    return agent.registry.read().get(uid) or {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def test_the_heartbeat_goes_on_while_the_coordinator_calls_or_is_known_gone(tmp_path):
    """The agent touches its node's heartbeat (which its supervisors' fence reads) only while a
    coordinator calls, or once the coordinator is proven gone; silence without proof (the node
    cut off from a coordinator that may be alive) lets the fence run out."""
    now = [100.0]
    a = Agent("n1", str(tmp_path / "state"), str(tmp_path), simulate="1x24", contact_s=7, clock=lambda: now[0])
    assert a.should_beat()
    now[0] += 7.5
    assert not a.should_beat()  # silent, no proof: cut off
    a.observe([], wait_s=0)
    assert a.should_beat()  # a call
    now[0] += 7.5
    a.owner_gone = lambda: True  # (the lease's actor reported dead by Ray)
    assert a.should_beat()
    a.owner_gone = lambda: False
    assert not a.should_beat()

    def cannot_tell() -> bool:
        raise TimeoutError("no answer")

    a.owner_gone = cannot_tell
    assert not a.should_beat()
    a.attach_owner(lambda: False)  # a new coordinator takes the agent over: a call too
    assert a.should_beat()


def test_end_says_the_task_runs_until_its_kill_is_done(agent):
    """`end` (`gpu-compete kill` on a --ray run) kills in the background; until every process
    of the task is gone and its record says stopped, `observe` says it runs (not gone): its next
    attempt must not start while the kill's last sweep, which finds the task's processes by
    their environment, could still reach it. Then the waiting observe returns at once."""
    from gpu_compete import evidence, procs

    task = spec("trap '' TERM; sleep 30")  # ignores SIGTERM: ended by SIGKILL after the 1 s grace
    uid = task.uni_id
    agent.launch(task, ["0"], ["0"], attempt=1, retry_count=0)
    wait_for(lambda: agent.observe([uid], wait_s=0.1)["tasks"][uid].get("confirmed"), 10, "the task on its GPU")
    agent.end([uid])
    started = time.monotonic()
    seen = []
    while time.monotonic() - started < 20:
        how = agent.observe([uid], wait_s=10)["tasks"][uid]
        seen.append((time.monotonic() - started, how))
        if how["state"] == "ended":
            break
    assert how["state"] == "ended" and how["error_type"] == "stopped", seen
    assert 1.0 <= seen[-1][0] < 9  # after the grace, and woken when the kill was done, not at 10 s
    assert all(h["state"] == "running" and not h["gone"] for _, h in seen[:-1]), seen
    assert not procs.processes_with_env(**{evidence.UNI_ID_ENV: uid, evidence.NAMESPACE_ENV: agent.namespace})


def test_a_record_the_disk_refuses_is_written_once_it_works(agent, monkeypatch):
    """The node's registry writes survive a full disk as the daemon's do: `kill --stopped`
    cannot write that the task was stopped (ENOSPC), the change is kept, and the next observe
    after the disk works writes it, so a restarted coordinator runs the task again without
    counting a failure."""
    task = spec("sleep 30")
    uid = task.uni_id
    agent.launch(task, ["0"], ["0"], attempt=1, retry_count=0)
    wait_for(lambda: _record(agent, uid).get("exec_pid"), 10, "the supervisor's record")

    def enospc(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Registry, "_write", enospc)  # this process's writes only: the supervisor's are its own
        agent.kill([uid], stopped=True)
        assert agent.observe([uid])["tasks"][uid]["state"] == "ended"
    assert _record(agent, uid).get("error_type") != "stopped"  # the supervisor's own last word, so far
    agent.observe([uid])
    assert _record(agent, uid)["error_type"] == "stopped"
