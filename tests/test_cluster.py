"""`gpu_compete.cluster` against a real Ray cluster of three nodes on this machine
(`tests/ray_harness.py`), with `tests/cluster_fixture_agent.EchoAgent` standing in for the agent;
plus what needs no Ray at all (names, the messages when Ray is missing or unreachable)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from gpu_compete import cluster as glue
from gpu_compete.cluster import Agents, ClusterError, NodeGone, NodeTimeout, name_nodes

from .helpers import wait_for
from .ray_harness import ray_cluster  # noqa: F401 - a fixture

# One local Ray cluster at a time: with pytest-xdist these tests all run on one worker.
pytestmark = pytest.mark.xdist_group("ray")

ECHO = "tests.cluster_fixture_agent:EchoAgent"


@pytest.fixture
def agents(ray_cluster):  # noqa: F811
    made: list[Agents] = []

    def make(tag: str | None = None, **kwargs) -> Agents:
        made.append(Agents(ECHO, {"flavour": "test"}, tag or uuid.uuid4().hex[:8], **kwargs))
        return made[-1]

    yield make
    for a in made:
        a.shutdown_all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- without Ray ------------------------------------------------------------------------------


def test_importing_the_module_does_not_import_ray():
    """The CLI imports cluster.py; Ray is loaded only when --ray is used."""
    code = "import sys, gpu_compete.cluster; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_ray_is_one_line_with_the_install_command(monkeypatch):
    """Without Ray every entry point says how to install it."""
    monkeypatch.setitem(sys.modules, "ray", None)
    for attempt in (glue.import_ray, lambda: glue.connect("auto"), lambda: Agents(ECHO, {}, "t")):
        with pytest.raises(ClusterError, match=r"^--ray needs Ray: pip install 'gpu-compete\[ray\]'$"):
            attempt()


def test_node_names_come_from_label_or_hostname_and_collisions_get_the_id():
    """Names are safe path components; two nodes never share one, and neither keeps the bare name."""
    a, b, c, d = "aaaaaa11", "bbbbbb22", "cccccc33", "dddddd44"
    assert name_nodes([(a, "gpu1"), (b, "gpu2")]) == {"gpu1": a, "gpu2": b}
    assert name_nodes([(a, "box"), (b, "box"), (c, "other")]) == {"box-aaaaaa": a, "box-bbbbbb": b, "other": c}
    assert name_nodes([(a, "my host/1:x"), (b, ".."), (c, "")]) == {"my-host-1-x": a, "node-bbbbbb": b,
                                                                   "node-cccccc": c}
    same6 = name_nodes([("abcdef01", "x"), ("abcdef02", "x"), (d, "y")])
    assert same6 == {"x-abcdef01": "abcdef01", "x-abcdef02": "abcdef02", "y": d}


def test_restore_start_environ_puts_back_what_the_process_started_with(tmp_path, monkeypatch):
    """What Ray wrote into os.environ before __init__ is undone; RAY_* variables stay."""
    start = tmp_path / "environ"
    start.write_bytes(b"KEEP=1\0CUDA_VISIBLE_DEVICES=0,1\0RAY_RAYLET_PID=7\0")
    monkeypatch.setattr(os, "environ", {"KEEP": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                                        "RAY_RAYLET_PID": "7", "RAY_JOB_ID": "01000000"})
    glue.restore_start_environ(str(start))
    assert os.environ == {"KEEP": "1", "CUDA_VISIBLE_DEVICES": "0,1", "RAY_RAYLET_PID": "7", "RAY_JOB_ID": "01000000"}


def test_unreachable_cluster_fails_fast_with_one_line():
    """No GCS at the address: a ClusterError naming it within seconds, not Ray's minutes of retries."""
    pytest.importorskip("ray")
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ClusterError) as caught:
        glue.connect(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 30
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert "connection refused" in message and "ray start --head" in message


def test_a_port_that_is_not_a_gcs_is_refused():
    """Something answers, but not gRPC (the dashboard, say): said so at once."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        host, port = server.getsockname()

        def answer():
            conn, _ = server.accept()
            conn.recv(100)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(ClusterError, match="answers, but not as a Ray cluster"):
            glue._check_gcs(host, port, f"{host}:{port}")


def test_auto_takes_ray_address_and_checks_it(monkeypatch):
    """`auto` follows RAY_ADDRESS, and a dead one is an error, never a new local cluster."""
    pytest.importorskip("ray")
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ClusterError, match=rf"^cannot reach the Ray cluster at auto \(.*:{port}\): connection refused"):
        glue.connect("auto")
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")
    with pytest.raises(ClusterError, match="Ray Client addresses are not supported"):
        glue.connect(f"ray://127.0.0.1:{port}")


def test_a_loopback_address_that_ray_rewrites_says_how_to_keep_it(monkeypatch):
    """Ray dials the machine's own address for 127.0.0.1 unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0:
    a cluster bound to loopback is then refused, and the line says what to set."""
    pytest.importorskip("ray")
    from ray._private import services

    port = free_port()
    monkeypatch.setattr(services, "canonicalize_bootstrap_address", lambda address, *a, **k: f"127.0.0.2:{port}")
    with pytest.raises(ClusterError, match=rf"127.0.0.1:{port} \(127.0.0.2:{port}\): connection refused .*"
                                           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"):
        glue.connect(f"127.0.0.1:{port}")


# --- on a cluster -----------------------------------------------------------------------------


def test_a_machine_without_a_ray_node_is_told_so_at_once(ray_cluster, monkeypatch):  # noqa: F811
    """ray.init would wait 60 s for a local node; we look first and say where to run."""
    from ray._private import services

    monkeypatch.setattr(services, "find_node_ids", lambda: set())
    started = time.monotonic()
    with pytest.raises(ClusterError, match="^no Ray node runs on this machine: run gpu-compete on a node"):
        glue.connect(ray_cluster.address)
    assert time.monotonic() - started < 5


def test_one_agent_per_node_each_on_its_own_node(agents):
    """The first refresh starts an agent on every node, named by label, running on that node."""
    a = agents()
    assert a.refresh() == ["n0", "n1", "n2"]
    assert a.nodes == ["n0", "n1", "n2"]
    ids = glue.alive_nodes()
    assert sorted(ids) == ["n0", "n1", "n2"]
    answers = a.call_all("whoami", timeout=60)
    for node in ("n0", "n1", "n2"):
        assert answers[node]["node"] == node and answers[node]["kwargs"] == {"flavour": "test"}
        assert answers[node]["node_id"] == ids[node] == a.node_id(node)
    assert len({answers[n]["pid"] for n in answers}) == 3
    assert a.refresh() == []


def test_agents_see_the_node_environment_as_it_is(agents):
    """Ray changes nothing an agent's tasks would inherit: no CUDA_VISIBLE_DEVICES where the node
    has none (n1 runs with Ray's older habit of blanking it), the node's value where it has one
    (n2), and no OMP_NUM_THREADS=1 nor Ray's PYTHONBREAKPOINT."""
    a = agents()
    a.refresh()
    env = {node: answer["env"] for node, answer in a.call_all("whoami", timeout=60).items()}
    nothing = {"CUDA_VISIBLE_DEVICES": None, "OMP_NUM_THREADS": None, "PYTHONBREAKPOINT": None,
               "HIP_VISIBLE_DEVICES": None}
    assert env == {"n0": nothing, "n1": nothing, "n2": {**nothing, "CUDA_VISIBLE_DEVICES": "3"}}


def test_a_restarted_coordinator_finds_the_same_agents(agents, ray_cluster):  # noqa: F811
    """After the driver disconnects and a new one connects, the same tag finds the same actors."""
    tag = uuid.uuid4().hex[:8]
    first = agents(tag)
    first.refresh()
    before = first.call_all("whoami", timeout=60)
    import ray

    ray.shutdown()
    glue.connect(ray_cluster.address)
    second = agents(tag)
    assert second.refresh() == ["n0", "n1", "n2"]
    after = second.call_all("whoami", timeout=60)
    assert {n: (v["pid"], v["born"]) for n, v in after.items()} == {n: (v["pid"], v["born"]) for n, v in before.items()}
    names = [n for n in ray.util.list_named_actors() if n.startswith(f"gpu-compete-agent:{tag}:")]
    assert sorted(names) == [f"gpu-compete-agent:{tag}:n{i}" for i in range(3)]


def test_a_slow_agent_times_out_without_holding_up_the_others(agents):
    """call_all waits `timeout` in all: the slow node is a NodeTimeout, the others answer, and the
    slow one stays (its next call runs after the slow one, one call at a time)."""
    a = agents()
    a.refresh()
    a.call_all("whoami", timeout=60)  # the actors are up
    started = time.monotonic()
    answers = a.call_all("slow_on", "n1", 3.0, timeout=1.0)
    assert time.monotonic() - started < 2.5
    assert answers["n0"] == "n0" and answers["n2"] == "n2"
    assert isinstance(answers["n1"], NodeTimeout) and "n1" in str(answers["n1"])
    assert a.nodes == ["n0", "n1", "n2"]
    with pytest.raises(NodeTimeout):
        a.call("n2", "slow_on", "n2", 3.0, timeout=0.5)
    assert a.call("n1", "whoami", timeout=30)["node"] == "n1"


def test_two_calls_at_once_with_max_concurrency_2(agents):
    """An agent served on two threads answers while a long call (observe) is in flight."""
    a = agents(max_concurrency=2)
    a.refresh()
    a.call_all("whoami", timeout=60)
    a.submit("n0", "slow_on", "n0", 3.0)
    started = time.monotonic()
    assert a.call("n0", "whoami", timeout=2.0)["node"] == "n0"
    assert time.monotonic() - started < 2.0


def test_what_an_agent_raises_comes_back_as_its_exception(agents):
    """An agent's own error is not a dead node: call_all maps it, call raises it."""
    a = agents()
    a.refresh()
    answers = a.call_all("fail", timeout=60)
    assert all(isinstance(answers[n], ValueError) and f"no luck on {n}" in str(answers[n]) for n in a.nodes)
    with pytest.raises(ValueError, match="no luck on n2"):
        a.call("n2", "fail", timeout=30)
    assert a.nodes == ["n0", "n1", "n2"]


def test_an_agent_that_dies_is_gone_then_started_again(agents):
    """A dead agent on a live node: NodeGone, forgotten, and the next refresh starts a new one."""
    a = agents()
    a.refresh()
    pid = a.call("n1", "whoami", timeout=60)["pid"]
    answers = a.call_all("exit", timeout=30)
    assert isinstance(answers["n1"], NodeGone) and "n1" in str(answers["n1"])
    assert a.nodes == []
    with pytest.raises(NodeGone):
        a.call("n1", "whoami", timeout=5)
    assert a.refresh() == ["n0", "n1", "n2"]
    assert a.call("n1", "whoami", timeout=60)["pid"] != pid


def test_a_node_that_joins_and_leaves(agents, ray_cluster):  # noqa: F811
    """A node added mid-run is in the next refresh's joined list; once removed its agent is
    NodeGone and refresh drops it."""
    a = agents()
    a.refresh()
    ray_cluster.add("n3")
    try:
        assert a.refresh() == ["n3"]
        assert a.call("n3", "whoami", timeout=60)["node_id"] == glue.alive_nodes()["n3"]
    finally:
        ray_cluster.remove("n3")
    gone = wait_for(lambda: isinstance(a.call_all("whoami", timeout=5).get("n3"), NodeGone), 30)
    assert gone
    assert wait_for(lambda: "n3" not in glue.alive_nodes(), 30)
    assert a.refresh() == []
    assert a.nodes == ["n0", "n1", "n2"]


def test_a_node_that_joins_with_a_taken_name_leaves_the_old_one_its_name(agents, ray_cluster):  # noqa: F811
    """Two nodes labelled n1: alive_nodes suffixes both, but the running n1 keeps its name here
    (its GPUs are n1/...); the newcomer gets n1-<id>."""
    a = agents()
    a.refresh()
    ray_cluster.add("dup", label="n1")
    try:
        fresh = glue.alive_nodes()
        assert "n1" not in fresh and len([n for n in fresh if n.startswith("n1-")]) == 2
        joined = a.refresh()
        assert len(joined) == 1 and joined[0].startswith("n1-") and joined[0] in fresh
        assert a.node_id("n1") == fresh[next(n for n in fresh if n.startswith("n1-") and n != joined[0])]
        assert a.alive() == {"n0", "n1", "n2", joined[0]}
        assert a.call(joined[0], "whoami", timeout=60)["node"] == joined[0]
    finally:
        ray_cluster.remove("dup")
    assert wait_for(lambda: len(glue.alive_nodes()) == 3, 30)
    assert a.refresh() == [] and a.nodes == ["n0", "n1", "n2"]


def test_submit_and_gather_return_what_has_ended(agents):
    """gather waits for the first call to end and returns every call ended by then; a slow one
    is left in flight, to be gathered later."""
    a = agents(max_concurrency=2)
    a.refresh()
    a.call_all("whoami", timeout=60)
    assert a.gather({}, 5.0) == []
    inflight = {"n1": (a.submit("n1", "slow_on", "n1", 2.0), 0.0), "n2": (a.submit("n2", "fail"), 0.0)}
    started = time.monotonic()
    first = dict(a.gather(inflight, 10.0))
    assert time.monotonic() - started < 1.5
    assert list(first) == ["n2"] and isinstance(first["n2"], ValueError)
    del inflight["n2"]
    assert a.gather(inflight, 10.0) == [("n1", "n1")]


def test_forget_then_refresh_finds_the_same_agent(agents):
    """Forgetting drops our handle only: the node is still alive, and refresh finds the actor again."""
    a = agents()
    a.refresh()
    pid = a.call("n1", "whoami", timeout=60)["pid"]
    a.forget("n1")
    assert a.nodes == ["n0", "n2"] and a.alive() == {"n0", "n1", "n2"}
    with pytest.raises(NodeGone):
        a.submit("n1", "whoami")
    assert a.refresh() == ["n1"]
    assert a.call("n1", "whoami", timeout=60)["pid"] == pid


def test_kill_and_shutdown_all(agents):
    """kill ends one agent; shutdown_all ends every agent of the tag, known to this object or not."""
    import ray

    tag = uuid.uuid4().hex[:8]
    a = agents(tag)
    a.refresh()
    a.call_all("whoami", timeout=60)
    a.kill("n0")
    assert a.nodes == ["n1", "n2"]
    prefix = f"gpu-compete-agent:{tag}:"
    assert wait_for(lambda: sorted(n for n in ray.util.list_named_actors() if n.startswith(prefix))
                    == [prefix + "n1", prefix + "n2"], 30)
    Agents(ECHO, {}, tag).shutdown_all()  # another object of the same tag
    assert wait_for(lambda: not [n for n in ray.util.list_named_actors() if n.startswith(prefix)], 30)


@pytest.mark.slow
def test_a_node_that_dies_without_notice(agents, ray_cluster):  # noqa: F811
    """A node killed hard: its agent is a NodeTimeout (unavailable) until the GCS declares the
    node dead (about 15 s), then NodeGone, and refresh drops it; never an exception."""
    a = agents()
    ray_cluster.add("n4")
    assert "n4" in a.refresh()
    a.call("n4", "whoami", timeout=60)
    ray_cluster.cluster.remove_node(ray_cluster.nodes.pop("n4"), allow_graceful=False)
    seen = set()

    def gone():
        answer = a.call_all("whoami", timeout=2).get("n4")
        seen.add(type(answer).__name__)
        return isinstance(answer, NodeGone)

    assert wait_for(gone, timeout=90)
    assert seen <= {"dict", "NodeTimeout", "NodeGone"}
    assert wait_for(lambda: "n4" not in glue.alive_nodes(), timeout=60)
    assert a.refresh() == [] and a.nodes == ["n0", "n1", "n2"]
