"""The coordinator over several nodes, without Ray: real agents and real task processes, each
"node" a directory of its own on this machine (`LocalAgents`). Ray's part (membership,
actors, RPC) is tested in test_cluster.py; what the coordinator decides is tested here."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gpu_compete import procs
from gpu_compete.agent import Agent, node_dir
from gpu_compete.commandbook import CommandBook
from gpu_compete.commandfile import parse
from gpu_compete.coordinator import Coordinator
from gpu_compete.node_contact import contact_s
from gpu_compete.daemon import Config
from gpu_compete.local_agents import LocalAgents
from gpu_compete.policy import RetryPolicy
from gpu_compete.tasks import TaskState

from .daemon_harness import Attempt, assert_each_succeeded_once, read_attempts, assert_exclusive, assert_queue_order
from .helpers import wait_for

TASK_SH = r"""#!/bin/bash
# task.sh UNI_ID SECONDS
here=$(cd "$(dirname "$0")" && pwd)
echo "start $1 $GPU_COMPETE_NODE/$CUDA_VISIBLE_DEVICES $(date +%s.%N)" >> "$here/events"
sleep "$2"
echo "end $1 $GPU_COMPETE_NODE/$CUDA_VISIBLE_DEVICES $(date +%s.%N) 0" >> "$here/events"
"""


class Run:
    def __init__(self, tmp_path: Path, blocks: list[tuple[str, float]], nodes: list[str], simulate: str = "1x24"):
        self.dir = tmp_path
        (tmp_path / "task.sh").write_text(TASK_SH)
        text = "\n".join(f"bash {{work_dir}}/task.sh {{uni_id}} {secs}\n{queue},8\n" for queue, secs in blocks)
        self.specs = parse(text).tasks
        self.config = Config(work_dir=tmp_path, state_dir=tmp_path / "state", registry=tmp_path / "unused.json",
                             poll=0.5, settle=5, retry=RetryPolicy(3, 0.5, None), status_every=0, seed=1,
                             kill_grace=1)
        (tmp_path / "state").mkdir(exist_ok=True)
        self.simulate = simulate
        self.agents = self.new_agents(nodes)
        self.coordinator = self.new_coordinator()

    def new_agents(self, nodes: list[str], **fence) -> LocalAgents:
        return LocalAgents(lambda node: Agent(node, str(self.dir / "state"), str(self.dir), simulate=self.simulate,
                                              kill_grace=1, **fence), nodes)

    def new_coordinator(self) -> Coordinator:
        c = Coordinator(self.config, self.specs, self.agents, node_timeout=1, out=lambda _: None)
        c.resume()
        return c

    def rounds(self, until=None, timeout: float = 40) -> None:
        c = self.coordinator
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c.tick(0.2)
            if (until() if until else c.finished()):
                return
        raise AssertionError("timed out")

    def attempts(self) -> list[Attempt]:
        return read_attempts(self.dir / "events")

    def history(self) -> list[dict]:
        path = self.dir / "state" / "history.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def queues(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for s in self.specs:
            out.setdefault(s.queue, []).append(s.uni_id)
        return out

    def running_on(self, node: str) -> list[str]:
        return [u for u, n in self.coordinator.where.items() if n == node]


@pytest.fixture
def stop_all():
    runs: list[Run] = []
    yield runs.append
    for run in runs:
        for node, agent in list(run.agents._agents.items()):
            agent.kill(list(agent.children))
        run.agents.shutdown_all()


def test_queues_spread_over_two_nodes_in_order_and_each_task_runs_once(tmp_path, stop_all):
    run = Run(tmp_path, [("1", 0.4), ("1", 0.4), ("2", 0.4), ("2", 0.4), ("3", 0.4)], ["n1", "n2"], simulate="1x24")
    stop_all(run)
    running: list[dict] = []

    def seen_running() -> bool:  # what `status` shows of the nodes' registries while tasks run
        running[:] = [r for r in run.coordinator.view()["registry"] if r["state"] == "running"]
        return bool(running)

    run.rounds(until=seen_running)
    assert all(r["gpu"] == f"{r['node']}/0" and r["alive"] in ("alive", "dead") for r in running), running
    run.rounds()
    attempts = run.attempts()
    assert {a.gpu for a in attempts} == {"n1/0", "n2/0"}
    assert_exclusive(attempts)
    assert_queue_order(attempts, run.queues())
    assert_each_succeeded_once(attempts, [s.uni_id for s in run.specs])
    done = [h for h in run.history() if h["state"] == "normal_exit"]
    assert len(done) == 5 and {h["node"] for h in done} == {"n1", "n2"}
    assert all(h["gpu"].startswith(h["node"] + "/") for h in done)
    assert run.coordinator.exit_code() == 0
    # A success in the history takes its record out of its node's registry, as on one machine:
    # told with the node's next observe call, or at the end of the run.
    assert run.coordinator.view()["registry"] == []
    run.coordinator.tick(0)
    for node in ("n1", "n2"):
        wait_for(lambda: json.loads((node_dir(tmp_path / "state", node) / "uni_id.json").read_text()) == {}, 10,
                 f"the records of {node} to leave once their successes are in the history")
    assert run.new_coordinator().view()["registry"] == []


def test_a_node_that_leaves_has_its_tasks_run_elsewhere_and_a_copy_that_comes_back_is_ended(tmp_path, stop_all):
    run = Run(tmp_path, [("1", 6.0), ("2", 0.3)], ["n1", "n2"], simulate="1x24")
    stop_all(run)
    run.rounds(until=lambda: run.running_on("n1") and run.running_on("n2"))
    victim = run.running_on("n1")[0]
    if victim != run.specs[0].uni_id:  # make the long task the one that loses its node
        victim = run.running_on("n2")[0]
        gone, other = "n2", "n1"
    else:
        gone, other = "n1", "n2"
    run.agents.remove(gone)
    run.rounds(until=lambda: run.coordinator.where.get(victim) == other)
    assert [h["error_type"] for h in run.history() if h["uni_id"] == victim] == ["lost"]
    run.agents.add(gone)  # it comes back, the first copy still running there
    run.rounds()
    attempts = [a for a in run.attempts() if a.uni_id == victim]
    assert [a.gpu.split("/")[0] for a in attempts] == [gone, other]
    assert attempts[0].status is None  # the first copy was ended, not run to its end
    assert [a.status for a in attempts[1:]] == [0]
    assert sum(h["state"] == "normal_exit" for h in run.history() if h["uni_id"] == victim) == 1


def test_an_agent_that_dies_on_a_live_node_is_replaced_and_its_task_adopted(tmp_path, stop_all):
    run = Run(tmp_path, [("1", 1.5)], ["n1"], simulate="1x24")
    stop_all(run)
    run.rounds(until=lambda: run.running_on("n1"))
    run.agents.kill_agent("n1")
    run.rounds()
    assert len(run.attempts()) == 1 and run.attempts()[0].status == 0
    assert [h["state"] for h in run.history()] == ["normal_exit"]


def test_a_restarted_coordinator_adopts_what_runs_and_runs_nothing_twice(tmp_path, stop_all):
    run = Run(tmp_path, [("1", 0.2), ("1", 1.5), ("2", 1.5)], ["n1", "n2"], simulate="1x24")
    stop_all(run)
    run.rounds(until=lambda: len(run.attempts()) == 3)
    # The coordinator is gone (as after kill -9); the agents and their tasks live on.
    run.coordinator = run.new_coordinator()
    assert sum(t.state is TaskState.RUNNING for t in run.coordinator.tasks.values()) == 2
    run.rounds()
    attempts = run.attempts()
    assert_each_succeeded_once(attempts, [s.uni_id for s in run.specs])
    assert len(attempts) == 3


def test_a_node_that_joins_is_used_from_the_next_round(tmp_path, stop_all):
    run = Run(tmp_path, [("1", 1.0), ("2", 1.0), ("3", 1.0)], ["n1"], simulate="1x24")
    stop_all(run)
    run.rounds(until=lambda: run.running_on("n1"))
    run.agents.add("n2")
    run.rounds()
    assert "n2/0" in {a.gpu for a in run.attempts()}
    assert_exclusive(run.attempts())


def test_a_task_that_ended_while_no_coordinator_watched_is_taken_once_not_run_again(tmp_path, stop_all):
    run = Run(tmp_path, [("1", 1.0), ("2", 1.0)], ["n1", "n2"], simulate="1x24")
    stop_all(run)
    run.rounds(until=lambda: len(run.attempts()) == 2)
    # The coordinator is gone; both tasks end before a new one starts.
    wait_for(lambda: all(a.end is not None for a in run.attempts()), 20, "both tasks to end")
    run.coordinator = run.new_coordinator()
    run.rounds()
    assert len(run.attempts()) == 2
    assert sorted(h["uni_id"] for h in run.history() if h["state"] == "normal_exit") == sorted(
        s.uni_id for s in run.specs)
    # A third coordinator finds nothing left to do and adopts nothing.
    run.coordinator = run.new_coordinator()
    assert all(t.state is TaskState.COMPLETED for t in run.coordinator.tasks.values())


def test_a_node_cut_off_with_its_agent_alive_ends_its_task_before_it_runs_elsewhere(tmp_path, stop_all):
    """A partition: the node and its agent live on, but the coordinator hears nothing from it.
    The agent stops its heartbeat once no call has come for --poll + a slack; the task's
    supervisor ends it when the heartbeat is --node-timeout old; only after that does the
    coordinator run the task elsewhere. When the node is reachable again nothing of it runs there."""
    run = Run(tmp_path, [("1", 10.0), ("2", 0.3)], ["n1", "n2"], simulate="1x24")
    run.agents = run.new_agents(["n1", "n2"], fence_s=1, contact_s=contact_s(run.config.poll))
    run.coordinator = run.new_coordinator()
    stop_all(run)
    victim = run.specs[0].uni_id
    run.rounds(until=lambda: victim in run.coordinator.where)
    cut = run.coordinator.where[victim]
    other = "n2" if cut == "n1" else "n1"
    run.agents.cut(cut)
    run.rounds(until=lambda: run.coordinator.where.get(victim) == other, timeout=30)
    left = procs.processes_with_env(GPU_COMPETE_UNI_ID=victim, GPU_COMPETE_NAMESPACE=str(node_dir(tmp_path / "state", cut).resolve()))
    assert left == [], "the cut-off copy still runs while the task starts elsewhere"
    log = (node_dir(tmp_path / "state", cut) / "logs" / f"{victim}.log").read_text()
    assert "fence:" in log and "abnormal_exit (lost)" in log
    run.agents.heal(cut)
    run.rounds(until=lambda: cut in run.coordinator.node_snapshots and cut not in run.coordinator.unreachable)
    assert procs.processes_with_env(GPU_COMPETE_UNI_ID=victim, GPU_COMPETE_NAMESPACE=str(node_dir(
        tmp_path / "state", cut).resolve())) == []
    attempts = [a for a in run.attempts() if a.uni_id == victim]
    assert [a.gpu.split("/")[0] for a in attempts] == [cut, other]
    assert attempts[0].status is None  # ended by the fence, not run to its end
    assert [h["error_type"] for h in run.history() if h["uni_id"] == victim] == ["lost"]


def test_an_oom_on_a_node_raises_what_the_next_attempt_needs(tmp_path, stop_all):
    """The node's agent says what the task's processes hold on its GPU; the coordinator keeps
    the peak, and after an oom the next attempt asks for peak x 1.25 (the history says so)."""
    run = Run(tmp_path, [("1", 0.1)], ["n1"])
    text = ("GPU_COMPETE_VRAM_GB=10 bash -c 'while [ ! -e {work_dir}/go ]; do sleep 0.05; done'; "
            "if [ -e {work_dir}/tried ]; then exit 0; fi; touch {work_dir}/tried; "
            "echo 'torch.OutOfMemoryError: CUDA out of memory.' >&2; exit 1\n1,8\n")
    run.specs = parse(text).tasks
    run.coordinator = run.new_coordinator()
    stop_all(run)
    task = run.coordinator.tasks[run.specs[0].uni_id]
    run.rounds(until=lambda: task.peak_vram_bytes is not None)
    (tmp_path / "go").touch()
    run.rounds(until=lambda: run.history())
    assert run.new_coordinator().tasks[task.uni_id].vram_gb_needed == 12.5  # a restart keeps what was learned
    run.rounds()
    first, second = run.history()
    assert (first["error_type"], first["peak_vram_gb"], first["vram_gb_needed"]) == ("oom", 10.0, 12.5)
    assert second["state"] == "normal_exit" and second["gpu"] == "n1/0"
    assert task.vram_gb_needed == 12.5


def test_a_peak_seen_before_the_coordinator_restarts_reaches_the_history(tmp_path, stop_all):
    """The node's agent writes a running attempt's peak VRAM into its record as it grows (as the
    daemon does on one machine): a coordinator restarted while the task runs adopts it with
    its peak, and the success line still says what it used."""
    run = Run(tmp_path, [("1", 0.1)], ["n1"])
    run.specs = parse("GPU_COMPETE_VRAM_GB=5 bash -c 'while [ ! -e {work_dir}/go ]; do sleep 0.05; done'\n1,8\n").tasks
    run.coordinator = run.new_coordinator()
    stop_all(run)
    uid = run.specs[0].uni_id
    registry = node_dir(tmp_path / "state", "n1") / "uni_id.json"

    def recorded() -> float | None:
        return json.loads(registry.read_text()).get(uid, {}).get("peak_vram_gb") if registry.exists() else None

    run.rounds(until=lambda: recorded() == 5.0)
    run.coordinator = run.new_coordinator()  # as after kill -9: the agent and the task live on
    (tmp_path / "go").touch()
    run.rounds()
    (line,) = run.history()
    assert line["state"] == "normal_exit" and line["peak_vram_gb"] == 5.0


def test_a_node_whose_host_guard_holds_gets_nothing_and_status_says_why(tmp_path, stop_all):
    """--min-free-disk checked on each node by its agent: a node short of disk starts nothing
    (the other node runs every task), and status names the node and the guard."""
    run = Run(tmp_path, [("1", 0.2), ("2", 0.2), ("3", 0.2)], ["n1", "n2"])
    run.agents = LocalAgents(lambda node: Agent(node, str(tmp_path / "state"), str(tmp_path), simulate="1x24",
                                                kill_grace=1, min_free_disk=1e9 if node == "n1" else None),
                             ["n1", "n2"])
    run.coordinator = run.new_coordinator()
    stop_all(run)
    run.rounds()
    assert {a.gpu for a in run.attempts()} == {"n2/0"}
    held = run.coordinator.view()["cluster"]["host_guards"]
    assert list(held) == ["n1"] and "< --min-free-disk 1000000000 GB" in held["n1"]["why"]
    from gpu_compete import status

    assert "host guard holds node n1 since " in status.render(run.coordinator.view())


def test_the_command_file_is_followed_across_nodes_as_on_one_machine(tmp_path, stop_all):
    """Edits apply within a round: a block added runs, a pending block removed never runs, a
    running one removed runs to its end and is then dropped; with --follow the run then waits
    for more work instead of ending."""
    run = Run(tmp_path, [("1", 0.1)], ["n1", "n2"])

    def block(name: str, secs: float, queue: str) -> str:
        return f"# {name}\nbash {{work_dir}}/task.sh {{uni_id}}-{name} {secs}\n{queue},8\n\n"

    path = tmp_path / "command.txt"
    path.write_text(block("a", 2.0, "1") + block("b", 0.2, "1"))
    parsed = parse(path.read_text())
    run.specs = parsed.tasks
    run.coordinator = Coordinator(run.config, run.specs, run.agents, node_timeout=1, out=lambda _: None,
                                  book=CommandBook(path, parsed), follow=True)
    run.coordinator.resume()
    stop_all(run)
    a, b = (s.uni_id for s in run.specs)
    run.rounds(until=lambda: a in run.coordinator.where)
    path.write_text(block("c", 0.2, "2"))  # a (running) and b (pending) removed, c added
    c = parse(path.read_text()).tasks[0].uni_id
    run.rounds(until=lambda: run.coordinator.tasks.get(c) is not None
               and run.coordinator.tasks[c].state is TaskState.COMPLETED and a not in run.coordinator.tasks)
    view = run.coordinator.view()
    assert view["steering"]["last_reload"] == "1 added, 1 dropped, 1 running out, 0 unchanged"
    ran = {x.uni_id.rsplit("-", 1)[-1]: x for x in run.attempts()}
    assert set(ran) == {"a", "c"} and ran["a"].status == 0 and ran["c"].status == 0  # b never ran
    assert list(run.coordinator.tasks) == [c]
    assert not run.coordinator.finished()  # --follow: waits for more
    run.coordinator.draining = True
    assert run.coordinator.finished()


@pytest.mark.slow  # ten seconds of waiting on a silent node
def test_a_round_stuck_on_a_cut_off_node_does_not_fence_the_other_nodes_tasks(tmp_path, stop_all):
    """Six launches to a node that no longer answers take a second each; meanwhile the other
    node's agent keeps hearing from the coordinator, so its running task is not fenced (it
    would be past --poll + 2 s + --node-timeout of silence). The launches that got no answer
    count as running there until the node says it never had them; every task runs once."""
    run = Run(tmp_path, [("1", 0.1)], ["n2"])
    sims = {"n1": "6x24", "n2": "1x24"}
    run.agents = LocalAgents(lambda node: Agent(node, str(tmp_path / "state"), str(tmp_path), simulate=sims[node],
                                                kill_grace=1, fence_s=1, contact_s=contact_s(run.config.poll)),
                             ["n2"])

    def block(name: str, secs: float, queue: str) -> str:
        return f"# {name}\nbash {{work_dir}}/task.sh {{uni_id}}-{name} {secs}\n{queue},8\n\n"

    path = tmp_path / "command.txt"
    path.write_text(block("long", 10.0, "1"))
    parsed = parse(path.read_text())
    run.specs = parsed.tasks
    run.coordinator = Coordinator(run.config, run.specs, run.agents, node_timeout=1, out=lambda _: None,
                                  book=CommandBook(path, parsed))
    run.coordinator.resume()
    stop_all(run)
    long = run.specs[0].uni_id
    run.rounds(until=lambda: run.coordinator.where.get(long) == "n2")
    run.agents.add("n1")
    run.rounds(until=lambda: "n1" in run.coordinator.node_snapshots)
    run.agents.cut("n1")
    path.write_text(path.read_text() + "".join(block(f"s{i}", 0.2, str(i + 2)) for i in range(6)))
    run.rounds(until=lambda: sum(n == "n1" for n in run.coordinator.where.values()) == 6, timeout=30)
    run.agents.heal("n1")
    run.rounds(timeout=60)
    log = (node_dir(tmp_path / "state", "n2") / "logs" / f"{long}.log").read_text()
    assert "fence:" not in log, log
    attempts = run.attempts()
    assert sorted(a.uni_id.rsplit("-", 1)[-1] for a in attempts) == sorted(["long", *(f"s{i}" for i in range(6))])
    assert all(a.status == 0 for a in attempts)


def test_stop_kill_records_stopped_so_a_restart_runs_the_task_again_without_counting_a_failure(tmp_path, stop_all):
    """As on one machine: `stop --kill` ends the running task on its node and records it as
    stopped; the next coordinator finds it so, and runs it again as a first attempt, so a
    task allowed no retries is not failed for good."""
    run = Run(tmp_path, [("1", 3.0)], ["n1"])
    text = "bash {work_dir}/task.sh {uni_id} 3.0\n1,8,retries=0\n"
    run.specs = parse(text).tasks
    run.coordinator = run.new_coordinator()
    stop_all(run)
    uid = run.specs[0].uni_id
    run.rounds(until=lambda: uid in run.coordinator.where)
    wait_for(lambda: run.attempts(), 20, "the task to start")
    run.coordinator.kill_all()
    record = json.loads((node_dir(tmp_path / "state", "n1") / "uni_id.json").read_text())[uid]
    assert (record["state"], record["error_type"]) == ("abnormal_exit", "stopped")
    run.coordinator = run.new_coordinator()  # the same command again
    run.rounds()
    assert [h["state"] for h in run.history()] == ["stopped", "normal_exit"]
    assert run.history()[-1]["attempt"] == 1
    assert [a.status for a in run.attempts()] == [None, 0]
    assert run.coordinator.exit_code() == 0


def test_why_a_head_waits_when_every_node_is_held_by_its_host_guard(tmp_path, stop_all):
    run = Run(tmp_path, [("1", 0.2)], ["n1"])
    run.agents = LocalAgents(lambda node: Agent(node, str(tmp_path / "state"), str(tmp_path), simulate="1x24",
                                                kill_grace=1, min_free_disk=1e9), ["n1"])
    run.coordinator = run.new_coordinator()
    stop_all(run)
    c = run.coordinator
    run.rounds(until=lambda: c.waiting_why)
    (why,) = c.waiting_why.values()
    assert why.startswith("host guard holds every node (n1: free disk") and not run.attempts()


def test_kill_on_a_cluster_run_ends_the_task_on_its_node_and_runs_it_again_without_counting_a_failure(
        tmp_path, stop_all):
    """`gpu-compete kill`: the node's agent ends the task in the background, its record says
    stopped, and the coordinator runs it again as the same attempt; `--skip` skips it instead,
    and a restart keeps it skipped."""
    run = Run(tmp_path, [("1", 30.0), ("2", 30.0)], ["n1", "n2"])
    text = "bash {work_dir}/task.sh {uni_id} 30\n1,8,retries=0\n\nbash {work_dir}/task.sh {uni_id} 30\n2,8\n"
    run.specs = parse(text).tasks
    run.coordinator = c = run.new_coordinator()
    stop_all(run)
    again, skipped = (s.uni_id for s in run.specs)
    run.rounds(until=lambda: again in c.where and skipped in c.where)
    wait_for(lambda: len(run.attempts()) == 2, 20, "both tasks to start")
    first = c.where[again]
    assert c.steer.handle({"op": "kill", "uni_id": again})["ok"]
    assert c.steer.handle({"op": "kill", "uni_id": skipped, "skip": True})["ok"]
    assert not c.steer.handle({"op": "kill", "uni_id": "q9-nothing"})["ok"]
    run.rounds(until=lambda: c.tasks[skipped].state is TaskState.SKIPPED and c.tasks[again].launched_at
               and len(run.attempts()) == 3, timeout=30)
    assert c.tasks[again].retry_count == 0 and c.tasks[again].state is TaskState.RUNNING
    stopped = [h for h in run.history() if h["state"] == "stopped"]
    assert sorted((h["uni_id"], h["by"], h["attempt"]) for h in stopped) == sorted([(again, "kill", 1),
                                                                                   (skipped, "kill", 1)])

    def marked() -> bool:  # the node's record says so once the supervisor has written its own end
        record = json.loads((node_dir(tmp_path / "state", first) / "uni_id.json").read_text()).get(again)
        return record is None or record["state"] == "running" or record["error_type"] == "stopped"

    wait_for(marked, 10, "the node to record the kill as a stop")
    c.kill_all()
    run.coordinator = c = run.new_coordinator()  # a restart: the skip holds, the other runs again
    assert c.tasks[skipped].state is TaskState.SKIPPED


def test_retry_pause_and_skip_on_a_cluster_run_survive_a_restart(tmp_path, stop_all):
    """`retry` gives a task that failed for good a fresh budget (also after a restart: the
    node's old record is not taken as a new failure); `pause` keeps a queue's head from
    starting; `skip` is a history line a restart keeps."""
    run = Run(tmp_path, [("1", 0.1)], ["n1"])
    text = ("bash -c 'exit 3' # {uni_id}\n1,8,retries=0\n\n"
            "bash {work_dir}/task.sh {uni_id} 0.1\n2,8\n\nbash {work_dir}/task.sh {uni_id} 0.1\n3,8\n")
    run.specs = parse(text).tasks
    run.coordinator = c = run.new_coordinator()
    stop_all(run)
    bad, paused, skip = (s.uni_id for s in run.specs)
    assert c.steer.handle({"op": "pause", "queues": ["2"]})["ok"]
    assert c.steer.handle({"op": "skip", "uni_id": skip})["ok"]
    run.rounds(until=lambda: c.tasks[bad].state is TaskState.FAILED)
    assert c.tasks[paused].state is TaskState.PENDING and c.tasks[skip].state is TaskState.SKIPPED
    assert c.view()["steering"]["paused"] == ["2"]
    assert c.steer.handle({"op": "retry", "uni_id": bad})["ok"]
    assert c.tasks[bad].retry_count == 0 and c.tasks[bad].state is TaskState.RETRY
    wait_for(lambda: json.loads((node_dir(tmp_path / "state", "n1") / "uni_id.json").read_text())[bad]["attempt"]
             == 0, 10, "the node's record to forget the attempt")
    run.coordinator = c = run.new_coordinator()  # a restart before the retry ran
    assert c.tasks[bad].state is TaskState.PENDING and c.tasks[bad].retry_count == 0
    assert c.tasks[skip].state is TaskState.SKIPPED and bad not in c.where
    run.rounds(until=lambda: c.tasks[bad].state is TaskState.FAILED and c.tasks[paused].state is TaskState.COMPLETED)
    failures = [h for h in run.history() if h["uni_id"] == bad and h["state"] == "abnormal_exit"]
    assert [h["attempt"] for h in failures] == [1, 1]  # one failure before the retry, one after
    assert c.exit_code() == 1


def test_the_control_socket_answers_while_the_coordinator_waits_for_its_agents(tmp_path, stop_all):
    """A request is answered between the slices of the coordinator's wait for news (Ray's
    wait ends for neither requests nor signals), and the round it asks for runs at once."""
    import threading

    from gpu_compete import control
    from gpu_compete.wakeloop import WakeLoop

    run = Run(tmp_path, [("1", 30.0), ("1", 0.1)], ["n1"])
    run.config.poll = 30.0  # the agent's answer comes when its task ends, or in 30 s
    run.coordinator = c = run.new_coordinator()
    stop_all(run)
    first = run.specs[0].uni_id
    answers = []
    c.loop = WakeLoop(c.on_signal, c.clock)
    with c.loop:
        c.steer.open(c.loop)
        try:
            run.rounds(until=lambda: first in c.where)
            asker = threading.Thread(target=lambda: answers.append(
                control.request(tmp_path / "state", {"op": "kill", "uni_id": first}, None, timeout=10)))
            asker.start()
            start = time.monotonic()
            while asker.is_alive() and time.monotonic() - start < 10:
                c.tick(30.0)  # each would wait 30 s for news: the request is served meanwhile
            assert time.monotonic() - start < 5
            asker.join(10)
        finally:
            c.steer.close()
    assert answers and answers[0]["ok"], answers
    assert first in c.steer.killing


def test_a_node_not_heard_from_yet_is_asked_not_to_wait_so_the_first_tasks_start_at_once(tmp_path, stop_all):
    """An agent's observe waits up to --poll for news; the first one of a node must not, or
    a run (and a node that joins) would leave its GPUs idle for a whole --poll."""
    run = Run(tmp_path, [("1", 0.1)], ["n1"])
    run.config.poll = 30.0
    run.coordinator = c = run.new_coordinator()
    stop_all(run)
    start = time.monotonic()
    run.rounds(until=lambda: c.where, timeout=20)
    assert time.monotonic() - start < 10
    run.agents.add("n2")
    run.rounds(until=lambda: "n2" in c.node_snapshots, timeout=20)
    assert time.monotonic() - start < 20


def test_a_success_the_disk_refuses_is_written_to_the_history_once_it_works(tmp_path, stop_all, monkeypatch):
    """The coordinator's history is the record of completions: a success line that cannot be
    appended (ENOSPC) is kept and written by a later round, once, as on one machine."""
    import errno

    from gpu_compete import journal

    run = Run(tmp_path, [("1", 0.2)], ["n1"])
    stop_all(run)
    uid = run.specs[0].uni_id

    def enospc(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(journal, "append", enospc)
        run.rounds(until=lambda: run.coordinator.tasks[uid].state is TaskState.COMPLETED)
        assert run.history() == []
    run.coordinator.tick(0)
    assert [(h["uni_id"], h["state"]) for h in run.history()] == [(uid, "normal_exit")]
    run.coordinator.tick(0)
    assert len(run.history()) == 1
