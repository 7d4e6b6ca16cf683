"""`gpu-compete run --ray` end to end: a real local Ray cluster (every node on 127.0.0.1), the
real CLI as the coordinator, real agents on their nodes, simulated GPUs per node and real task
processes. Each test checks from what the tasks themselves wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from .daemon_harness import Attempt, assert_each_succeeded_once, read_attempts, assert_exclusive, assert_queue_order
from .helpers import console_script, wait_for

# One local Ray cluster at a time: with pytest-xdist these tests all run on one worker.
pytestmark = pytest.mark.xdist_group("ray")

pytest.importorskip("ray")

TASK_SH = r"""#!/bin/bash
here=$(cd "$(dirname "$0")" && pwd)
echo "start $1 $GPU_COMPETE_NODE/$CUDA_VISIBLE_DEVICES $(date +%s.%N)" >> "$here/events"
sleep "$2"
echo "end $1 $GPU_COMPETE_NODE/$CUDA_VISIBLE_DEVICES $(date +%s.%N) 0" >> "$here/events"
"""


@pytest.fixture(scope="module")
def cluster():
    from .ray_harness import LocalCluster, _apply

    saved = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "CUDA_VISIBLE_DEVICES",
                                            "RAY_ADDRESS")}
    _apply({"CUDA_VISIBLE_DEVICES": None, "RAY_ADDRESS": None})
    local = LocalCluster(2)
    try:
        yield local
    finally:
        local.shutdown()
        _apply(saved)


class ClusterRun:
    def __init__(self, tmp_path: Path, address: str, blocks: list[tuple[str, float]]):
        self.dir, self.address = tmp_path, address
        (tmp_path / "task.sh").write_text(TASK_SH)
        text = "\n".join(f"# {i}\nbash {{work_dir}}/task.sh {{uni_id}} {secs}\n{queue},8\n"
                         for i, (queue, secs) in enumerate(blocks))
        self.commands = tmp_path / "command.txt"
        self.commands.write_text(text)
        self.state = tmp_path / "state"
        self.proc: subprocess.Popen | None = None
        out = subprocess.run([console_script(), "check", "--commands", str(self.commands), "--json"],
                             capture_output=True, text=True, check=True)
        self.queues: dict[str, list[str]] = defaultdict(list)
        for q in json.loads(out.stdout)["queues"]:
            for t in q["tasks"]:
                self.queues[q["queue"]].append(t["uni_id"])

    @property
    def uids(self) -> list[str]:
        return [u for us in self.queues.values() for u in us]

    def argv(self, *extra: str) -> list[str]:
        return [console_script(), "run", "--commands", str(self.commands), "--work-dir", str(self.dir),
                "--state-dir", str(self.state), "--simulate", "1x24,delay=0.2", "--ray", self.address,
                "--poll", "2", "--node-timeout", "10", "--status-every", "0", "--seed", "1",
                "--log-format", "json", *extra]

    def start(self, *extra: str) -> subprocess.Popen:
        self.proc = subprocess.Popen(self.argv(*extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self.proc

    def agents_named(self) -> list[str]:
        """The agent actors of this run alive in the cluster (asked from a driver of its own:
        a Ray driver inside the test process would leak its settings into later clusters)."""
        code = (f"import ray, sys; from gpu_compete import cluster, cluster_run; from pathlib import Path; "
                f"ray.init(address={self.address!r}, logging_level='ERROR'); "
                f"p = cluster.actor_name(cluster_run.run_tag(Path({str(self.state.resolve())!r})), ''); "
                f"print([a['name'] for a in ray.util.list_named_actors(all_namespaces=True) if a['name'].startswith(p)])")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own print of a list of str

    def wait(self, timeout: float = 90) -> tuple[int, str]:
        assert self.proc is not None
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"coordinator did not finish in {timeout}s:\n{err[-4000:]}") from None
        return self.proc.returncode, err

    def attempts(self) -> list[Attempt]:
        return read_attempts(self.dir / "events")

    def history(self) -> list[dict]:
        path = self.state / "history.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []

    def running(self) -> dict[str, str]:
        """uni_id -> node of what status.json says runs."""
        try:
            view = json.loads((self.state / "status.json").read_text())
        except (OSError, ValueError):
            return {}
        return {q["current"]: q["gpu"].split("/")[0] for q in view["queues"]
                if q["current_state"] == "running" and q.get("gpu")}


def test_a_command_file_spreads_over_the_nodes_and_every_task_runs_once(tmp_path, cluster):
    run = ClusterRun(tmp_path, cluster.address, [("1", 0.3), ("1", 0.3), ("2", 0.3), ("2", 0.3), ("3", 0.3)])
    run.start()
    code, err = run.wait()
    assert code == 0, err[-3000:]
    attempts = run.attempts()
    assert {a.gpu for a in attempts} == {"n0/0", "n1/0"}
    assert_exclusive(attempts)
    assert_queue_order(attempts, run.queues)
    assert_each_succeeded_once(attempts, run.uids)
    history = [h for h in run.history() if h["state"] == "normal_exit"]
    assert sorted(h["uni_id"] for h in history) == sorted(run.uids)
    assert {h["node"] for h in history} == {"n0", "n1"}
    # Each node keeps its registry and logs in its own directory; `logs` finds them. A completed
    # task's record has left its node's registry, as on one machine (the last ones at the end).
    for node in ("n0", "n1"):
        assert json.loads((run.state / "nodes" / node / "uni_id.json").read_text()) == {}
    uid = history[0]["uni_id"]
    shown = subprocess.run([console_script(), "logs", uid, "--state-dir", str(run.state)], capture_output=True,
                           text=True)
    assert shown.returncode == 0 and f"start {uid}" in shown.stdout
    # ... and through the agents when the node's disk is not this one. The agents ended with the
    # run, so there is none to ask: said in one line.
    fetched = subprocess.run([console_script(), "logs", "q9-nothing", "--state-dir", str(run.state), "--ray",
                              cluster.address], capture_output=True, text=True)
    assert fetched.returncode == 1 and "no node of the run" in fetched.stderr


def test_kill_9_of_the_coordinator_then_the_same_command_adopts_and_runs_nothing_twice(tmp_path, cluster):
    run = ClusterRun(tmp_path, cluster.address, [("1", 6.0), ("2", 6.0), ("1", 0.3), ("2", 0.3)])
    proc = run.start()
    wait_for(lambda: len(run.attempts()) >= 2 and len(run.running()) == 2, 30, "two tasks to start")
    wait_for(lambda: len(json.loads((run.state / "status.json").read_text())["registry"]) == 2, 30,
             "the nodes to report the tasks' records")
    shown = subprocess.run([console_script(), "status", "--state-dir", str(run.state)], capture_output=True, text=True)
    assert shown.returncode == 0 and "n0/0" in shown.stdout and "n1/0" in shown.stdout, shown.stdout
    # Each node's registry records, as the nodes said, whether each pid is alive there.
    assert "registry (2 records)" in shown.stdout and shown.stdout.count(" alive ") == 2, shown.stdout
    # The run is steered through its control socket, as on one machine.
    for op in ("pause", "resume"):
        said = subprocess.run([console_script(), op, "--state-dir", str(run.state)], capture_output=True, text=True)
        assert said.returncode == 0 and op[:5] in said.stdout, (said.stdout, said.stderr)
    unknown = subprocess.run([console_script(), "skip", "q9-nothing", "--state-dir", str(run.state)],
                             capture_output=True, text=True)
    assert unknown.returncode == 1 and "unknown uni_id" in unknown.stderr
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    run.start()
    code, err = run.wait()
    assert code == 0, err[-3000:]
    assert "adopted running task" in err
    attempts = run.attempts()
    assert len(attempts) == 4
    assert_each_succeeded_once(attempts, run.uids)
    assert_queue_order(attempts, run.queues)


@pytest.mark.slow  # the coordinator's side is tested quickly without Ray (test_coordinator.py)
def test_an_agent_killed_mid_run_is_replaced_and_its_task_adopted(tmp_path, cluster):
    run = ClusterRun(tmp_path, cluster.address, [("1", 3.0), ("2", 3.0)])
    run.start()
    wait_for(lambda: len(run.running()) == 2, 30, "both tasks to run")
    # From a process of its own: a driver in the test process would leave Ray's variables
    # (PYTHONBREAKPOINT) in the environment of every cluster started after it.
    kill = (
        "import sys, ray\n"
        "from gpu_compete import cluster as glue\n"
        "from gpu_compete.cluster_run import run_tag\n"
        "from pathlib import Path\n"
        "glue.connect(sys.argv[1])\n"
        "name = glue.actor_name(run_tag(Path(sys.argv[2])), 'n1')\n"
        "ray.kill(ray.get_actor(name, namespace=glue.NAMESPACE), no_restart=True)\n"
    )
    subprocess.run([sys.executable, "-c", kill, cluster.address, str(run.state.resolve())], check=True,
                   timeout=60)
    code, err = run.wait()
    assert code == 0, err[-3000:]
    assert "node not answering" in err
    assert len(run.attempts()) == 2
    assert [h["state"] for h in run.history()] == ["normal_exit", "normal_exit"]


@pytest.mark.slow  # the coordinator's side of a join is tested quickly without Ray (test_coordinator.py)
def test_a_node_that_joins_mid_run_is_used(tmp_path, cluster):
    # Four waves of 4 s on the two nodes there are: time for a node to join on a busy machine.
    run = ClusterRun(tmp_path, cluster.address, [(str(q), 4.0) for q in range(8)])
    run.start()
    wait_for(lambda: run.running(), 30, "a task to run")
    cluster.add("n2")
    try:
        code, err = run.wait()
    finally:
        cluster.remove("n2")
    assert code == 0, err[-3000:]
    assert "n2/0" in {a.gpu for a in run.attempts()}, err[-3000:]
    assert_exclusive(run.attempts())


@pytest.mark.slow  # its decisions are tested quickly without Ray (test_coordinator.py)
def test_a_node_that_leaves_has_its_task_ended_there_then_run_elsewhere_never_two_at_once(tmp_path, cluster):
    """The node's Ray processes die (the machine lives on, as here): its supervisors end their
    task once the node's agent has been silent for --node-timeout (the fence), and only after
    that does the coordinator count it lost and run it elsewhere."""
    cluster.add("n3")
    try:
        run = ClusterRun(tmp_path, cluster.address, [("1", 6.0), ("2", 6.0), ("3", 6.0)])
        run.start("--node-timeout", "3")
        wait_for(lambda: "n3" in run.running().values() and len(run.running()) == 3, 30, "a task on every node")
        victim = next(u for u, n in run.running().items() if n == "n3")
    finally:
        cluster.remove("n3")
    code, err = run.wait(timeout=120)
    assert code == 0, err[-3000:]
    lost = [h for h in run.history() if h["uni_id"] == victim and h["state"] == "abnormal_exit"]
    assert [h["error_type"] for h in lost] == ["lost"] and lost[0]["node"] == "n3"
    done = [h for h in run.history() if h["uni_id"] == victim and h["state"] == "normal_exit"]
    assert len(done) == 1 and done[0]["node"] != "n3"
    log = (run.state / "nodes" / "n3" / "logs" / f"{victim}.log").read_text()
    assert "fence:" in log and "abnormal_exit (lost)" in log
    first, second = [a for a in run.attempts() if a.uni_id == victim]
    fenced_at = _log_time(log.splitlines()[-1])
    assert first.end is None and fenced_at < second.start  # never two copies at once


def _log_time(line: str) -> float:
    """The time of a supervisor's `==== 2026-12-05T21:07:31.123 ...` line."""
    from datetime import datetime

    return datetime.fromisoformat(line.split()[1]).timestamp()


def test_an_unreachable_cluster_is_one_line_and_exit_2(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "c.txt").write_text("echo hi\n1,1\n")
    started = time.monotonic()
    done = subprocess.run([console_script(), "run", "--commands", str(tmp_path / "c.txt"), "--state-dir",
                           str(tmp_path / "s"), "--ray", f"127.0.0.1:{port}"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "cannot reach the Ray cluster" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 30


def test_registry_with_ray_is_refused_in_one_line_before_connecting(tmp_path):
    (tmp_path / "c.txt").write_text("echo hi\n1,1\n")
    done = subprocess.run([console_script(), "run", "--commands", str(tmp_path / "c.txt"), "--state-dir",
                           str(tmp_path / "s"), "--ray", "127.0.0.1:1", "--registry", "r.json"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--registry cannot be used with --ray" in lines[0], done.stderr


def test_ray_missing_is_one_line_with_the_install_command(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "ray.py").write_text("raise ImportError('No module named ray')\n")
    (tmp_path / "c.txt").write_text("echo hi\n1,1\n")
    env = {**os.environ, "PYTHONPATH": str(shim)}
    done = subprocess.run([console_script(), "run", "--commands", str(tmp_path / "c.txt"), "--state-dir",
                           str(tmp_path / "s"), "--ray", "auto"], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert "pip install 'gpu-compete[ray]'" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_node_that_comes_back_within_the_timeout_keeps_its_task_nothing_lost(tmp_path, cluster):
    """The node's Ray processes die and a node of the same name is back before --node-timeout:
    its new agent keeps the fence fresh, the task runs on to its end where it was, and
    nothing is counted lost or run again."""
    cluster.add("n3")
    run = ClusterRun(tmp_path, cluster.address, [("1", 9.0), ("2", 9.0), ("3", 9.0)])
    run.start("--node-timeout", "10")
    wait_for(lambda: "n3" in run.running().values() and len(run.running()) == 3, 30, "a task on every node")
    victim = next(u for u, n in run.running().items() if n == "n3")
    cluster.remove("n3")
    cluster.add("n3")
    try:
        code, err = run.wait(timeout=120)
    finally:
        cluster.remove("n3")
    assert code == 0, err[-3000:]
    starts = [a for a in run.attempts() if a.uni_id == victim]
    assert len(starts) == 1 and starts[0].status == 0  # one copy, run to its end
    assert [(h["state"], h["node"]) for h in run.history() if h["uni_id"] == victim] == [("normal_exit", "n3")]


@pytest.mark.slow  # waits out the fence; the heartbeat's rule is tested quickly in test_agent.py
def test_a_dead_coordinator_leaves_its_tasks_running_past_the_fence_and_the_next_adopts_them(tmp_path, cluster):
    """After kill -9 of the coordinator its agents stop hearing from it, but Ray reports its lease
    actor dead: proof that nobody runs their tasks elsewhere, so the heartbeat goes on and the
    tasks run past --node-timeout; a coordinator started much later adopts them."""
    run = ClusterRun(tmp_path, cluster.address, [("1", 10.0), ("2", 10.0)])
    proc = run.start("--poll", "0.5", "--node-timeout", "1")
    wait_for(lambda: len(run.running()) == 2, 30, "two tasks to start")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    silent = time.monotonic()
    # Past the agents' contact window (poll + 2 s), the fence (1 s) and its check (1 s).
    time.sleep(max(0.0, 5.5 - (time.monotonic() - silent)))
    logs = "".join(p.read_text() for p in run.state.glob("nodes/*/logs/*.log"))
    assert "fence:" not in logs, logs[-2000:]
    run.start("--poll", "0.5", "--node-timeout", "1")
    code, err = run.wait()
    assert code == 0, err[-3000:]
    assert err.count("adopted running task") == 2
    attempts = run.attempts()
    assert len(attempts) == 2 and all(a.status == 0 for a in attempts)


def test_on_event_hooks_and_metrics_work_across_the_nodes(tmp_path, cluster):
    """--on-event fires with the node/index GPU names, and --metrics-port serves the whole
    cluster's GPUs and tasks (a real HTTP scrape while tasks run)."""
    import re
    import urllib.request

    run = ClusterRun(tmp_path, cluster.address, [("1", 3.0), ("2", 3.0)])
    events = tmp_path / "hook-events"
    hook = f'echo "$GPU_COMPETE_EVENT ${{GPU_COMPETE_UNI_ID:--}} ${{GPU_COMPETE_GPU:--}}" >> {events}'
    run.start("--on-event", hook, "--metrics-port", "0", "--min-free-ram", "0.001")  # (a guard that never holds)
    assert run.proc is not None and run.proc.stderr is not None
    url = None
    for line in run.proc.stderr:  # the first lines: the metrics server's address comes before any task
        found = re.search(r'"url": "([^"]+)"', line)
        if found:
            url = found.group(1)
            break
    assert url, "the coordinator did not say where it serves metrics"
    wait_for(lambda: len(run.running()) == 2, 30, "two tasks to start")
    assert len(run.agents_named()) == 2  # (what the dry-run test counts is really there)

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    def both_busy() -> str | None:
        text = scrape()
        return text if 'gpu_compete_gpu_tasks{gpu="n1/0"} 1.0' in text else None

    text = wait_for(both_busy, 15, "metrics that show both nodes' GPUs busy")
    assert 'gpu_compete_gpu_tasks{gpu="n0/0"} 1.0' in text
    assert 'gpu_compete_tasks{state="running"} 2.0' in text
    code, err = run.wait()
    assert code == 0, err[-3000:]
    lines = events.read_text().splitlines()
    for uid in run.uids:
        start = next(x for x in lines if x.startswith(f"task_start {uid} "))
        assert re.fullmatch(rf"task_start {uid} n[01]/0", start)
        assert any(x.startswith(f"task_end {uid} n") for x in lines)
    assert lines[-1] == "all_done - -"


def test_dry_run_shows_every_node_and_leaves_nothing_behind(tmp_path, cluster):
    """--dry-run --ray: each node's GPUs and where each head would start, {available_gpu} as the
    node's local index; nothing starts, nothing is written, no agent is left."""
    run = ClusterRun(tmp_path, cluster.address, [("1", 1.0), ("2", 1.0)])
    run.commands.write_text(run.commands.read_text().replace("{uni_id} ", "{uni_id}-on-{available_gpu} "))
    done = subprocess.run(run.argv("--dry-run"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "GPU n0/0: free 24.0 GB, eligible now" in out and "GPU n1/0: free 24.0 GB, eligible now" in out
    assert out.count("would start on GPU n") == 2 and "-on-0 " in out and "-on-n" not in out
    assert not (run.dir / "events").exists() and not (run.state / "history.jsonl").exists()
    assert not (run.state / "daemon.pid").exists()
    assert run.agents_named() == []


@pytest.mark.slow  # following the file is tested quickly without Ray (test_coordinator.py)
def test_a_block_added_to_the_command_file_mid_run_runs(tmp_path, cluster):
    """The command file is followed with --ray too: a block appended while the run goes on runs."""
    run = ClusterRun(tmp_path, cluster.address, [("1", 3.0)])
    run.start()
    wait_for(lambda: len(run.running()) == 1, 30, "the first task to start")
    with run.commands.open("a") as fh:
        fh.write("\n# added\nbash {work_dir}/task.sh {uni_id} 0.3\n2,8\n")
    code, err = run.wait()
    assert code == 0, err[-3000:]
    assert "command file reloaded" in err
    attempts = run.attempts()
    assert len(attempts) == 2 and all(a.status == 0 for a in attempts)
