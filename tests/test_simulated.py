"""The simulated GPU backend, with real child processes standing in for CUDA programs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from gpu_compete.gpus import ScopeError, current_user, open_probe
from gpu_compete.gpus.simulated import SimulatedProbe, SimulationSpecError, parse_spec
from gpu_compete.tasks import GIB

from .helpers import wait_for


# The processes these tests start carry a namespace of their own, and their probes look only
# at it: tests that run meanwhile (pytest-xdist) neither see them nor are seen.
NS = f"test-simulated-{os.getpid()}"


def spawn(gpu: int, vram: str = "5", script: str = "import time; time.sleep(60)") -> subprocess.Popen:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), GPU_COMPETE_VRAM_GB=vram, GPU_COMPETE_NAMESPACE=NS)
    return subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)


@pytest.fixture
def children():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        try:
            os.killpg(p.pid, 9)  # the whole group: a shell's children too
        except ProcessLookupError:
            pass
        p.wait()


def pids_on(probe: SimulatedProbe, index: int) -> set[int]:
    return {p.pid for p in next(s for s in probe.snapshot() if s.index == index).processes}


def test_short_spec_gives_that_many_empty_gpus():
    """`4x24` is four idle GPUs of 24 GB each; `,delay=S` sets the start-up delay."""
    probe = open_probe(simulate="4x24")
    snaps = probe.snapshot()
    assert [s.index for s in snaps] == [0, 1, 2, 3]
    assert all(s.total_bytes == 24 * GIB and s.available for s in snaps)
    assert parse_spec("2x80,delay=1.5").startup_delay_s == 1.5


@pytest.mark.parametrize("bad", ["4", "0x24", "4x0", "x24", "4x24,delay=-1", "/no/such/file.json"])
def test_bad_specs_are_refused_with_a_message(bad):
    """A spec that is neither NxGB nor an existing JSON file is a clear error."""
    with pytest.raises(SimulationSpecError):
        parse_spec(bad)


def test_a_task_process_shows_up_after_the_startup_delay_and_goes_away_when_it_ends(children):
    """A process carrying the GPU variables appears only once it has lived the delay, then leaves."""
    probe = SimulatedProbe(parse_spec("2x24,delay=1"), namespace=NS)
    child = spawn(1, "5")
    children.append(child)
    assert child.pid not in pids_on(probe, 1)  # younger than the delay: a CUDA context isn't up yet
    wait_for(lambda: child.pid in pids_on(probe, 1), timeout=10, what="the task on GPU 1")
    snap = probe.snapshot()[1]
    assert snap.free_bytes == 19 * GIB and snap.user_processes(current_user())
    assert child.pid not in pids_on(probe, 0)
    os.killpg(child.pid, 9)
    child.wait()
    wait_for(lambda: child.pid not in pids_on(probe, 1), timeout=10, what="the task to leave GPU 1")
    assert probe.snapshot()[1].free_bytes == 24 * GIB


def test_a_shell_and_its_child_count_once(children):
    """Only the topmost process of a tree with the variables counts, so memory is not doubled."""
    # A namespace of its own, so tasks of daemons that other tests run meanwhile don't count.
    namespace = f"test-shell-and-child-{os.getpid()}"
    probe = SimulatedProbe(parse_spec("1x24"), namespace=namespace)
    shell = subprocess.Popen(["bash", "-c", "sleep 60 & wait"],
                             env=dict(os.environ, CUDA_VISIBLE_DEVICES="0", GPU_COMPETE_VRAM_GB="6",
                                      GPU_COMPETE_NAMESPACE=namespace),
                             start_new_session=True)
    children.append(shell)
    wait_for(lambda: shell.pid in pids_on(probe, 0), timeout=10, what="the shell on GPU 0")
    snap = probe.snapshot()[0]
    assert [p.pid for p in snap.processes] == [shell.pid]
    assert snap.used_bytes == 6 * GIB


def test_foreign_processes_from_the_file_reduce_free_memory(tmp_path):
    """Processes of other users listed in the JSON take their memory; an invisible pid is 'unknown'."""
    spec = tmp_path / "sim.json"
    spec.write_text(json.dumps({"gpus": [
        {"memory_gb": 24, "processes": [{"pid": 999_999_999, "memory_gb": 20}]},
        {"memory_gb": 24, "processes": [{"pid": 999_999_998, "memory_gb": 2, "user": "alice"}]}]}))
    snaps = open_probe(simulate=str(spec), namespace=str(tmp_path)).snapshot()
    assert snaps[0].free_bytes == 4 * GIB and snaps[0].processes[0].user == "unknown"
    assert snaps[1].free_bytes == 22 * GIB and snaps[1].processes[0].user == "alice"


def test_the_file_is_read_again_when_it_changes(tmp_path):
    """Editing the JSON mid-run loses a GPU, fails a process list, then brings the GPU back."""
    spec = tmp_path / "sim.json"

    def write(**gpu1):
        spec.write_text(json.dumps({"gpus": [{"memory_gb": 24}, {"memory_gb": 24, **gpu1}]}))
        os.utime(spec, ns=(time.time_ns(), time.time_ns()))

    write()
    probe = open_probe(simulate=str(spec))
    assert probe.snapshot()[1].available
    write(lost=True)
    wait_for(lambda: not probe.snapshot()[1].available, timeout=5, what="GPU 1 lost")
    assert probe.snapshot()[0].available
    write(fail="processes")
    wait_for(lambda: probe.snapshot()[1].error == "process list unavailable (simulated)", timeout=5, what="failure")
    write()
    wait_for(lambda: probe.snapshot()[1].available and probe.snapshot()[1].error is None, timeout=5, what="back")


def test_scope_follows_gpus_option_and_cuda_visible_devices():
    """--gpus picks GPUs by index or UUID; our own CUDA_VISIBLE_DEVICES narrows the default."""
    assert SimulatedProbe(parse_spec("4x24"), scope="1,3").indices == [1, 3]
    assert SimulatedProbe(parse_spec("4x24"), environ={"CUDA_VISIBLE_DEVICES": "2"}).indices == [2]
    uuid = SimulatedProbe(parse_spec("4x24")).snapshot()[2].uuid
    assert SimulatedProbe(parse_spec("4x24"), scope=uuid).indices == [2]
    with pytest.raises(ScopeError):
        SimulatedProbe(parse_spec("4x24"), scope="7")
    with pytest.raises(ScopeError):
        SimulatedProbe(parse_spec("4x24"), environ={"CUDA_VISIBLE_DEVICES": ""})


def test_a_comma_list_holds_the_vram_on_each_listed_gpu(children):
    """CUDA_VISIBLE_DEVICES=1,2 (a gpus=2 task) uses its GPU_COMPETE_VRAM_GB on each of GPUs 1 and 2."""
    probe = SimulatedProbe(parse_spec("3x24"), namespace=NS)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES="1,2", GPU_COMPETE_VRAM_GB="5", GPU_COMPETE_NAMESPACE=NS),
                            start_new_session=True)
    children.append(proc)
    wait_for(lambda: proc.pid in pids_on(probe, 1) and proc.pid in pids_on(probe, 2), 10, "the process on GPUs 1, 2")
    mine = [[p.used_bytes for p in snap.processes if p.pid == proc.pid] for snap in probe.snapshot()]
    assert mine == [[], [5 * GIB], [5 * GIB]]  # (other processes of the machine may be listed too)


def test_a_child_with_its_own_vram_replaces_its_parents_claim(children):
    """A child that sets its own GPU_COMPETE_VRAM_GB is counted in place of its shell (not added)."""
    probe = SimulatedProbe(parse_spec("1x24"), namespace=NS)
    shell = subprocess.Popen(["bash", "-c", "GPU_COMPETE_VRAM_GB=9 sleep 60 & wait"],
                             env=dict(os.environ, CUDA_VISIBLE_DEVICES="0", GPU_COMPETE_VRAM_GB="2", GPU_COMPETE_NAMESPACE=NS),
                             start_new_session=True)
    children.append(shell)
    import psutil

    def child():
        kids = psutil.Process(shell.pid).children()
        return kids[0].pid if kids else None

    kid = wait_for(child, 10, "the shell's child")
    wait_for(lambda: kid in pids_on(probe, 0), 10, "the child on GPU 0")
    listed = {p.pid: p.used_bytes for p in probe.snapshot()[0].processes}
    assert listed[kid] == 9 * GIB and shell.pid not in listed


def test_a_claim_seen_before_exec_is_read_again_after_it(children, monkeypatch, tmp_path):
    """A process between fork and exec still shows its parent's environment (under load that
    moment can last): what a young process claims is not remembered, so once it has exec'd with
    a GPU_COMPETE_VRAM_GB of its own, that is what it holds. (Young: the window is widened here
    so that the test does not race it.)"""
    from gpu_compete.gpus import simulated

    monkeypatch.setattr(simulated, "_CLAIM_SETTLE_S", 30.0)
    probe = SimulatedProbe(parse_spec("1x24"), namespace=NS)
    gate = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.01)\n" \
           "os.execvpe('sleep', ['sleep', '60'], dict(os.environ, GPU_COMPETE_VRAM_GB='9'))"
    go = tmp_path / "go"
    proc = _claiming_2_gb(children, gate, go)
    wait_for(lambda: _used(probe, proc.pid) == 2 * GIB, 10, "the process, not yet exec'd, with its parent's claim")
    go.touch()
    wait_for(lambda: _used(probe, proc.pid) == 9 * GIB, 10, "its own claim once it has exec'd")


def _claiming_2_gb(children, script: str, go) -> subprocess.Popen:
    """`python -c script go` on simulated GPU 0, claiming 2 GB (its children inherit it)."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(go)], start_new_session=True,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES="0", GPU_COMPETE_VRAM_GB="2",
                                     GPU_COMPETE_NAMESPACE=NS))
    children.append(proc)
    return proc


def _used(probe: SimulatedProbe, pid: int) -> int | None:
    return {p.pid: p.used_bytes for p in probe.snapshot()[0].processes}.get(pid)


def test_a_forked_child_that_execs_late_is_read_again_after_it(children, monkeypatch, tmp_path):
    """A child that has not exec'd yet shows its parent's command line and environment; on a
    loaded machine it can stay so past the short settle time. Its claim (its parent's) is not
    remembered while its command line is its parent's, so once it execs with a claim of its
    own, that is what it holds. (The longer grace is widened so that the test does not race it.)"""
    from gpu_compete.gpus import simulated

    monkeypatch.setattr(simulated, "_EXEC_GRACE_S", 30.0)
    probe = SimulatedProbe(parse_spec("1x24"), namespace=NS)
    script = ("import os, sys, time\npid = os.fork()\nif pid == 0:\n"
              "    while not os.path.exists(sys.argv[1]): time.sleep(0.01)\n"
              "    os.execvpe('sleep', ['sleep', '60'], dict(os.environ, GPU_COMPETE_VRAM_GB='9'))\n"
              "os.wait()\n")
    go = tmp_path / "go"
    proc = _claiming_2_gb(children, script, go)
    kid = wait_for(lambda: [c.pid for c in psutil.Process(proc.pid).children()], 10, "the fork")[0]
    born = psutil.Process(kid).create_time()

    def read_past_settle():
        probe.snapshot()
        return time.time() - born > 3 * simulated._CLAIM_SETTLE_S

    wait_for(read_past_settle, 10, "the probe to read the fork past the settle time")
    go.touch()
    wait_for(lambda: _used(probe, kid) == 9 * GIB, 10, "its own claim once it has exec'd")


def test_a_pid_reused_by_a_task_is_seen_within_a_second(children):
    """A pid set aside as no task of ours is looked at again after a second: on a busy machine
    pids wrap quickly, and a task that got the pid of a process set aside before must not stay
    invisible (its GPU would look free, its VRAM unmeasured)."""
    skew = [0.0]
    probe = SimulatedProbe(parse_spec("1x24"), namespace=NS, clock=lambda: time.time() + skew[0])
    child = spawn(0, "5")
    children.append(child)
    probe._ignored[child.pid] = time.time() + 1.0  # as if an earlier process with this pid was set aside
    assert child.pid not in pids_on(probe, 0)
    skew[0] = 1.5
    wait_for(lambda: child.pid in pids_on(probe, 0), 10, "the task, once its pid is looked at again")
