"""Proof under faults: GPUs that fail mid-run (simulated JSON end to end, and NVML through a fake
module in-process), a state directory that is unusable or full, and the modes of every file the
daemon writes.

End-to-end tests drive the real daemon through tests/daemon_harness.py (`--poll 0.2`) and read
back the tasks' `events`; in-process tests build a `Daemon` here and call acquire/resume/tick
themselves, so that writers can be made to fail with ENOSPC (as root, chmod cannot).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import time
import warnings
from pathlib import Path

import psutil
import pytest
import structlog

from gpu_compete import journal, procs, status
from gpu_compete.daemon import Config, Daemon
from gpu_compete.gpus.nvml import NvmlProbe, NvmlWarning
from gpu_compete.gpus.simulated import NAMESPACE_ENV, SimulatedProbe
from gpu_compete.policy import RetryPolicy, lease_active
from gpu_compete.registry import Registry
from gpu_compete.tasks import TaskSpec, TaskState

from .daemon_harness import DaemonRun, assert_each_succeeded_once, assert_exclusive, assert_queue_order
from .helpers import clean_env, console_script, stop_daemon, wait_for
from .test_nvml import GPU_IS_LOST, NOT_SUPPORTED, PROCESS_CALLS, FakeGpu, FakeNvml

ENOSPC_TEXT = "No space left on device"


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, ENOSPC_TEXT)


# --- helpers -----------------------------------------------------------------------------------

class SimFile:
    """A `--simulate FILE.json` the test rewrites mid-run: atomically, with a strictly growing
    mtime so the probe never misses a change that falls in one timestamp tick."""

    def __init__(self, path: Path, gpus: list[dict]):
        self.path = path
        self.mtime = 0
        self.write(gpus)

    def write(self, gpus: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"gpus": gpus}))
        self.mtime = max(self.mtime + 10_000_000, time.time_ns())
        os.utime(tmp, ns=(self.mtime, self.mtime))
        os.replace(tmp, self.path)


def status_gpus(run: DaemonRun) -> dict[int, dict] | None:
    """GPU index -> its entry in the daemon's status.json (None while there is none)."""
    try:
        view = json.loads((run.state / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return {g["index"]: g for g in view.get("gpus", [])}


def daemon_sees(run: DaemonRun, index: int, **want) -> bool:
    gpus = status_gpus(run)
    return bool(gpus) and index in gpus and all(gpus[index].get(k) == v for k, v in want.items())


def stop_if_running(run: DaemonRun) -> None:
    stop_daemon(run.proc)


def many(queues: str, per_queue: int, vram: float, seconds: float) -> list[tuple[str, float, str, float, str]]:
    return [(q, vram, f"{q}{i}", seconds, "ok") for q in queues for i in range(per_queue)]


def queues_of(run: DaemonRun, blocks) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for queue, _, name, _, _ in blocks:
        out.setdefault(queue, []).append(run.names[name])
    return out


# --- 1. GPU faults mid-run, end to end (simulated JSON) --------------------------------------------

def test_lost_gpu_gets_no_new_task_while_lost_and_is_used_again_when_back(tmp_path):
    """GPU 1 lost mid-run: tasks go on completing on GPU 0 only, none starts on GPU 1 while it is
    lost (the task it held finishes normally), and once NVML reports it again tasks start there."""
    sim = SimFile(tmp_path / "sim.json", [{"memory_gb": 24}, {"memory_gb": 24}])
    blocks = many("AB", 14, 1, 0.25)
    run = DaemonRun(tmp_path, blocks, simulate=str(sim.path))
    run.start()
    try:
        wait_for(lambda: any(a.gpu == "1" for a in run.attempts()), 20, "a task on GPU 1")
        sim.write([{"memory_gb": 24}, {"memory_gb": 24, "lost": True}])
        wait_for(lambda: daemon_sees(run, 1, available=False), 10, "the daemon to see GPU 1 lost")
        seen = time.time()
        window_start = seen + 1.0  # launches planned on an older snapshot have long started by then
        wait_for(lambda: sum(a.gpu == "0" and a.start > window_start for a in run.attempts()) >= 4, 30,
                 "tasks to keep starting on GPU 0 while GPU 1 is lost")
        assert run.proc.poll() is None, "the daemon ended while a GPU was lost"
        back = time.time()
        sim.write([{"memory_gb": 24}, {"memory_gb": 24}])
        wait_for(lambda: any(a.gpu == "1" and a.start > back for a in run.attempts()), 20,
                 "a task to start on GPU 1 again once it is back")
        code, _, err = run.wait(timeout=60)
    finally:
        stop_if_running(run)
    assert code == 0, err
    attempts = run.attempts()
    in_window = [a for a in attempts if a.gpu == "1" and window_start < a.start < back]
    assert in_window == [], f"tasks started on GPU 1 while it was lost: {in_window}"
    assert all(a.status == 0 for a in attempts), "a task failed (was the task on the lost GPU killed?)"
    assert_each_succeeded_once(attempts, list(run.names.values()))
    assert_queue_order(attempts, queues_of(run, blocks))
    assert_exclusive(attempts)


def test_gpu_with_unknown_memory_takes_only_zero_vram_tasks_and_the_daemon_goes_on(tmp_path):
    """`fail: "memory"` on the only GPU: a 0 GB task still runs there, a 1 GB task waits (no crash,
    no launch) and starts as soon as the memory reading works again."""
    sim = SimFile(tmp_path / "sim.json", [{"memory_gb": 24, "fail": "memory"}])
    blocks = [("Z", 0, "zero", 0.2, "ok"), ("A", 1, "needs", 0.2, "ok")]
    run = DaemonRun(tmp_path, blocks, simulate=str(sim.path))
    run.start()
    try:
        wait_for(lambda: any(a.uni_id == run.names["zero"] and a.end for a in run.attempts()), 20,
                 "the 0 GB task to finish on the GPU with unknown memory")
        wait_for(lambda: daemon_sees(run, 0, available=True, free_bytes=None, running=[]), 10,
                 "the daemon to report the GPU available with unknown free memory and idle")
        time.sleep(1.0)  # five rounds at --poll 0.2 with an idle GPU the 1 GB task may not use
        assert run.started("needs") == 0, "a 1 GB task went to a GPU whose free memory is unknown"
        assert run.proc.poll() is None, "the daemon ended or crashed on a GPU with unknown memory"
        sim.write([{"memory_gb": 24}])
        run.wait_started("needs")
        code, _, err = run.wait(timeout=30)
    finally:
        stop_if_running(run)
    assert code == 0, err
    assert "Traceback" not in err
    assert [a.status for a in run.attempts()] == [0, 0]


def test_unknown_memory_on_one_gpu_sends_vram_tasks_to_the_other(tmp_path):
    """With `fail: "memory"` on GPU 0, every task needing VRAM runs on GPU 1, and the run completes."""
    sim = SimFile(tmp_path / "sim.json", [{"memory_gb": 24, "fail": "memory"}, {"memory_gb": 24}])
    blocks = many("AB", 3, 2, 0.2)
    run = DaemonRun(tmp_path, blocks, simulate=str(sim.path))
    code, _, err = run.run(timeout=60)
    assert code == 0, err
    attempts = run.attempts()
    assert_each_succeeded_once(attempts, list(run.names.values()))
    assert {a.gpu for a in attempts} == {"1"}
    view = json.loads((run.state / "status.json").read_text())
    assert view["gpus"][0]["available"] is True and view["gpus"][0]["free_bytes"] is None


@pytest.mark.parametrize("mode", ["--exclusive", "--shared"])
def test_failing_process_list_mid_run_closes_the_gpu_in_exclusive_mode_only(tmp_path, mode):
    """`fail: "processes"` on GPU 1 mid-run: in exclusive mode no new task goes there while its
    processes can't be seen (a process of ours may be there), and it is used again once they can;
    in shared mode its memory is trusted and it stays in use. Every task completes once, in order."""
    sim = SimFile(tmp_path / "sim.json", [{"memory_gb": 24}, {"memory_gb": 24}])
    blocks = many("AB", 8, 1, 0.25)
    run = DaemonRun(tmp_path, blocks, simulate=str(sim.path))
    run.start(mode)
    try:
        wait_for(lambda: any(a.gpu == "1" for a in run.attempts()), 20, "a task on GPU 1")
        sim.write([{"memory_gb": 24}, {"memory_gb": 24, "fail": "processes"}])
        wait_for(lambda: daemon_sees(run, 1, available=True, error="process list unavailable (simulated)"), 10,
                 "the daemon to see GPU 1's process list fail")
        seen = time.time()
        if mode == "--shared":
            wait_for(lambda: sum(a.gpu == "1" and a.start > seen for a in run.attempts()) >= 2, 30,
                     "tasks to keep starting on GPU 1 without a process list")
        else:
            wait_for(lambda: sum(a.gpu == "0" and a.start > seen for a in run.attempts()) >= 3, 30,
                     "tasks to go on on GPU 0")
            assert not [a for a in run.attempts() if a.gpu == "1" and a.start > seen + 0.5], \
                "a task was put on a GPU whose processes could not be seen"
            sim.write([{"memory_gb": 24}, {"memory_gb": 24}])
            back = time.time()
            wait_for(lambda: any(a.gpu == "1" and a.start > back for a in run.attempts()), 30,
                     "GPU 1 to be used again once its processes can be seen")
        code, _, err = run.wait(timeout=60)
    finally:
        stop_if_running(run)
    assert code == 0, err
    attempts = run.attempts()
    assert_each_succeeded_once(attempts, list(run.names.values()))
    assert_queue_order(attempts, queues_of(run, blocks))
    if mode == "--exclusive":
        assert_exclusive(attempts)


# --- in-process daemons ------------------------------------------------------------------------

def spec(queue: str, position: int, command: str, vram: float = 1) -> TaskSpec:
    return TaskSpec(queue=queue, position=position, commands=(command,), vram_gb=vram, line=position)


class InProcess:
    """A Daemon built in this process around `probe`, on tmp_path/state; its tasks are real
    processes (forked supervisors), ended and reaped by `close()`."""

    def __init__(self, tmp_path: Path, specs: list[TaskSpec], probe=None, **config):
        self.state = (tmp_path / "state").resolve()
        self.probe = probe or SimulatedProbe.from_spec("2x24", namespace=str(self.state))
        cfg = dict(poll=0.2, settle=5.0, retry=RetryPolicy(3, 0.0, None), status_every=0, seed=1)
        cfg.update(config)
        self.config = Config(work_dir=tmp_path.resolve(), state_dir=self.state, registry=self.state / "uni_id.json",
                             **cfg)
        self.daemon = Daemon(self.config, specs, self.probe, out=lambda _text: None)
        self.specs = {s.commands[0]: s for s in specs}

    def task(self, command: str):
        return self.daemon.tasks[self.specs[command].uni_id]

    def tick_until(self, predicate, timeout: float, what: str):
        def step():
            self.daemon.tick()
            return predicate()

        return wait_for(step, timeout, what)

    def history(self) -> list[dict]:
        return list(journal.entries(self.config.history))

    def registry_raw(self) -> dict:
        try:
            return json.loads((self.state / "uni_id.json").read_text())
        except FileNotFoundError:
            return {}

    def close(self) -> None:
        procs.kill_all(procs.processes_with_env(**{NAMESPACE_ENV: str(self.state)}))
        for child in list(self.daemon.children.values()):
            child.wait(timeout=5)
        self.daemon.release()
        self.probe.close()


@pytest.fixture
def in_process(tmp_path):
    made: list[InProcess] = []

    def make(specs, probe=None, **config) -> InProcess:
        d = InProcess(tmp_path, specs, probe, **config)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


# --- 1b. NVML faults, through NvmlProbe over the fake module ------------------------------------

def three_fake_gpus() -> list[FakeGpu]:
    return [FakeGpu("GPU-aaaa1111-0000"), FakeGpu("GPU-bbbb2222-0000"), FakeGpu("GPU-cccc3333-0000")]


def exited(pid: int) -> bool:
    """True once our child `pid` has exited, without reaping it (the daemon does that)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def availability(d: InProcess) -> list[bool]:
    return [s.available for s in d.daemon.snapshots]


def test_tick_survives_nvml_faults_and_reports_each_gpu_until_it_answers_again(in_process):
    """GpuIsLost, NotSupported memory and a failing process list, on different GPUs: tick() never
    raises, the snapshots and status.json say which GPU is unavailable, and all recover."""
    fake = FakeNvml(three_fake_gpus())
    probe = NvmlProbe(pynvml_module=fake.module, environ={})
    d = in_process([spec("1", 1, "true", vram=1000)], probe)  # fits nowhere: nothing launches
    d.state.mkdir(mode=0o700)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d.daemon.tick()
        assert availability(d) == [True, True, True]
        fake.gpus[1].fail["handle"] = GPU_IS_LOST
        fake.gpus[2].fail.update({"memory_v2": NOT_SUPPORTED, "memory_v1": NOT_SUPPORTED, "util": NOT_SUPPORTED})
        fake.gpus[0].fail.update({call: NOT_SUPPORTED for call in PROCESS_CALLS})
        for _ in range(3):
            d.daemon.tick()
        snaps = d.daemon.snapshots
        assert availability(d) == [True, False, True]
        assert snaps[1].error == "GPU is lost"
        assert snaps[2].free_bytes is None and snaps[2].utilization is None and snaps[2].error is None
        assert snaps[0].error == "process list unavailable: Not Supported" and snaps[0].free_bytes is not None
        assert snaps[0].processes_known is False
        view = json.loads((d.state / "status.json").read_text())
        assert [g["available"] for g in view["gpus"]] == [True, False, True]
        assert view["gpus"][1]["error"] == "GPU is lost"
        assert "UNAVAILABLE: GPU is lost" in status.render(view)
        # GPU 1 now fails later, inside the process call, with GpuIsLost: still unavailable.
        del fake.gpus[1].fail["handle"]
        fake.gpus[1].fail[PROCESS_CALLS[0]] = GPU_IS_LOST
        d.daemon.tick()
        assert availability(d) == [True, False, True]
        for gpu in fake.gpus:
            gpu.fail.clear()
        d.daemon.tick()
    assert availability(d) == [True, True, True]
    assert all(s.error is None and s.free_bytes is not None for s in d.daemon.snapshots)
    assert any(issubclass(w.category, NvmlWarning) and "GPU 1" in str(w.message) for w in caught)
    assert d.task("true").state is TaskState.PENDING and not d.daemon.children


def test_tasks_launch_on_the_gpu_that_works_while_nvml_loses_the_others(in_process):
    """Over NVML (fake): with GPUs 0 and 2 lost a task launches on GPU 1 and completes; then with
    GPU 1 lost and GPU 0 back, the next task launches on GPU 0."""
    fake = FakeNvml(three_fake_gpus())
    probe = NvmlProbe(pynvml_module=fake.module, environ={})
    d = in_process([spec("1", 1, "true"), spec("1", 2, "true && true")], probe)
    d.daemon.acquire()
    d.daemon.resume()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NvmlWarning)
        fake.gpus[0].fail["handle"] = GPU_IS_LOST
        fake.gpus[2].fail["memory_v2"] = GPU_IS_LOST
        d.daemon.tick()
        first = d.task("true")
        assert first.state is TaskState.RUNNING and first.gpu == "1"
        assert availability(d) == [False, True, False]
        # Without ticking (the round that collects it would launch the next task at once):
        supervisor = d.daemon.children[first.uni_id].pid
        wait_for(lambda: exited(supervisor), 20, "the first task's supervisor to exit")
        fake.gpus[1].fail["handle"] = GPU_IS_LOST
        del fake.gpus[0].fail["handle"]
        d.daemon.tick()
        second = d.task("true && true")
        assert first.state is TaskState.COMPLETED and second.state is TaskState.RUNNING
        assert second.gpu == "0" and availability(d) == [True, False, False]
        d.tick_until(lambda: second.state is TaskState.COMPLETED, 20, "the second task to complete")
    assert {e["uni_id"] for e in d.history() if e["state"] == "normal_exit"} == {first.uni_id, second.uni_id}
    assert [e["gpu"] for e in d.history()] == [1, 0]


# --- 2. disk trouble -----------------------------------------------------------------------------

def wait_file(path: Path) -> str:
    """A shell loop that ends once `path` exists (a task the test finishes when it wants)."""
    return f"while [ ! -e {path} ]; do sleep 0.05; done"


def processes_alive(*procs_: int | psutil.Process):
    """A check that each of these processes (pid + create time) is still alive and not a zombie."""
    known = [p if isinstance(p, psutil.Process) else psutil.Process(p) for p in procs_]
    return lambda: all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in known)


def wait_stable(path: Path, quiet_s: float = 0.5, timeout: float = 10) -> bytes:
    """The file's bytes once nobody has changed it for `quiet_s` seconds."""
    last, since = path.read_bytes(), time.monotonic()

    def still():
        nonlocal last, since
        now = path.read_bytes()
        if now != last:
            last, since = now, time.monotonic()
        return time.monotonic() - since >= quiet_s

    wait_for(still, timeout, f"{path.name} to stop changing")
    return last


def errors_logged(logs: list[dict], event: str) -> list[dict]:
    return [e for e in logs if e["event"] == event and e["log_level"] in ("warning", "error")]


def test_full_disk_for_registry_and_status_is_logged_loses_nothing_and_kills_nothing(in_process, tmp_path,
                                                                                      monkeypatch):
    """ENOSPC on every registry and status.json write: tick() goes on with errors logged, the running
    task lives, the registry file keeps its bytes (an unrelated record too), a task completes
    meanwhile, and once the disk works the rest is recorded, history included."""
    go = tmp_path / "go"
    long_cmd, quick, after = wait_file(go), "true", "sleep 0.3"
    d = in_process([spec("1", 1, long_cmd), spec("2", 1, quick), spec("2", 2, after)])
    d.daemon.acquire()
    Registry(d.state / "uni_id.json").set("other-exp", state="abnormal_exit", error_type="oom", retry_count=2)
    other = d.registry_raw()["other-exp"]
    d.daemon.resume()
    d.daemon.tick()
    long_task, quick_task, after_task = d.task(long_cmd), d.task(quick), d.task(after)
    assert long_task.state is TaskState.RUNNING and quick_task.state is TaskState.RUNNING

    wait_for(lambda: exited(d.daemon.children[quick_task.uni_id].pid), 10, "the quick task's supervisor to exit")
    long_sup = d.daemon.children[long_task.uni_id].pid
    long_alive = processes_alive(long_sup, *wait_for(lambda: psutil.Process(long_sup).children(), 10, "the worker"))
    before = wait_stable(d.state / "uni_id.json")
    assert long_alive()
    with monkeypatch.context() as m, structlog.testing.capture_logs() as logs:
        m.setattr(Registry, "_write", enospc)
        m.setattr(status, "write_json", enospc)

        def step():
            d.daemon.tick()  # must not raise
            assert (d.state / "uni_id.json").read_bytes() == before, "the registry file changed on a full disk"
            assert long_alive(), "the running task was killed"
            return after_task.state is TaskState.COMPLETED

        wait_for(step, 20, "the quick task to be collected and the next one to run and complete, disk full")
        assert quick_task.state is TaskState.COMPLETED and long_task.state is TaskState.RUNNING
    registry_errors = errors_logged(logs, "cannot write the registry; running tasks go on")
    assert registry_errors and all(ENOSPC_TEXT in e["error"] for e in registry_errors)
    assert errors_logged(logs, "cannot write status.json")

    go.touch()
    d.tick_until(lambda: d.daemon.finished(), 20, "the long task to complete once the disk works")
    raw = d.registry_raw()
    assert raw["other-exp"] == other, "an unrelated record was lost"
    assert long_task.uni_id not in raw
    assert not [u for u, r in raw.items() if isinstance(r, dict) and r.get("state") == "running"]
    successes = {e["uni_id"] for e in d.history() if e["state"] == "normal_exit"}
    assert successes == {long_task.uni_id, quick_task.uni_id, after_task.uni_id}
    assert all(t.state is TaskState.COMPLETED for t in d.daemon.tasks.values())
    assert (d.state / "status.json").exists()


def test_records_the_daemon_could_not_remove_leave_once_the_disk_works(in_process, monkeypatch):
    """A completed task whose record removal failed (ENOSPC) has it removed once writes work again."""
    d = in_process([spec("1", 1, "true"), spec("2", 1, "sleep 1")])
    d.daemon.acquire()
    d.daemon.resume()
    d.daemon.tick()
    quick = d.task("true")
    wait_for(lambda: exited(d.daemon.children[quick.uni_id].pid), 10, "the quick task's supervisor to exit")
    wait_stable(d.state / "uni_id.json")
    with monkeypatch.context() as m:
        m.setattr(Registry, "_write", enospc)
        d.tick_until(lambda: quick.state is TaskState.COMPLETED, 10, "the quick task collected")
    d.tick_until(lambda: d.daemon.finished(), 20, "the other task to complete with a working disk")
    assert quick.uni_id not in d.registry_raw()


def test_a_task_that_succeeds_while_history_cannot_be_written_is_not_a_failure(in_process, monkeypatch):
    """history.jsonl appends fail (ENOSPC) for the supervisor and the daemon: a task exiting 0 is still
    recorded normal_exit in the registry and completes, with the history error logged, not retried."""
    d = in_process([spec("1", 1, "echo done")], retry=RetryPolicy(1, 600.0, None))  # a failure backs off
    d.daemon.acquire()
    d.daemon.resume()
    with monkeypatch.context() as m, structlog.testing.capture_logs() as logs:
        m.setattr(journal, "append", enospc)  # forked supervisors inherit it
        d.daemon.tick()
        task = d.task("echo done")
        d.tick_until(lambda: task.state is not TaskState.RUNNING, 20, "the task to end")
    log_text = (d.state / "logs" / f"{task.uni_id}.log").read_text()
    assert "status 0, normal_exit" in log_text  # the command itself succeeded
    assert task.state is TaskState.COMPLETED, (task.state, task.error_type, d.registry_raw())
    assert task.retry_count == 0
    assert d.registry_raw().get(task.uni_id, {}).get("state") in (None, "normal_exit")
    assert errors_logged(logs, "cannot append to the history")


def group_members(pgid: int) -> list[int]:
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                out.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


@pytest.mark.parametrize("stale", ["leader alive", "leader gone", "pgid true"])
def test_a_lost_task_never_signals_a_process_group_it_cannot_verify(in_process, monkeypatch, stale):
    """An adopted task whose record names a `pgid` that is not its own (pid != pgid, so no create time
    to verify it: a stranger's group, leader alive or gone, or a wrong-typed `true`) is recorded lost
    without that group being signalled (os.killpg is spied on, so such a signal is recorded, never sent)."""
    if stale == "pgid true":
        pgid, stranger = True, None
    else:
        script = "sleep 60" if stale == "leader alive" else "sleep 60 & exit 0"
        stranger = subprocess.Popen(["bash", "-c", script], start_new_session=True)
        pgid = stranger.pid
        if stale == "leader gone":
            stranger.wait()
            wait_for(lambda: group_members(pgid), 5, "the stranger's group to outlive its leader")
    forbidden = {1, pgid}
    sent: list[tuple[int, int]] = []
    real_killpg = os.killpg

    def spy(group, sig):
        if sig == 0:
            return real_killpg(group, sig)
        if group in forbidden:
            sent.append((group, sig))
            return None
        return real_killpg(group, sig)

    monkeypatch.setattr(os, "killpg", spy)
    supervisor = subprocess.Popen(["sleep", "1"])  # stands for the task's supervisor, alive at adoption
    try:
        d = in_process([spec("1", 1, "sleep 30")], retry=RetryPolicy(1, 600.0, None))
        d.daemon.acquire()
        task = d.task("sleep 30")
        ct = procs.create_time(supervisor.pid)
        Registry(d.state / "uni_id.json").update(lambda data: data.update({task.uni_id: {
            "state": "running", "retry_count": 0, "pid": supervisor.pid, "create_time": ct,
            "supervisor_pid": supervisor.pid, "supervisor_create_time": ct, "pgid": pgid}}))
        d.daemon.resume()
        assert task.state is TaskState.RUNNING and task.adopted
        d.tick_until(lambda: task.state is not TaskState.RUNNING, 10, "the adopted task to be lost")
        assert task.error_type == "lost"
        assert sent == [], f"gpu-compete signalled process groups it cannot tell are its own: {sent}"
    finally:
        supervisor.kill()
        supervisor.wait()
        if stranger is not None:
            for pid in group_members(stranger.pid) + [stranger.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            stranger.wait()


def test_a_relaunched_task_never_signals_the_previous_attempts_process_group(in_process, monkeypatch):
    """A retried task whose new supervisor is killed before it can record anything (its registry writes
    fail) is recorded lost without signalling the `pgid` of the attempt before, now another group's."""
    stranger = subprocess.Popen(["bash", "-c", "sleep 60 & exit 0"], start_new_session=True)
    stranger.wait()  # its group lives on, leader gone: the case a create time cannot rule out
    pgid = stranger.pid
    wait_for(lambda: group_members(pgid), 5, "the stranger's group to outlive its leader")
    sent: list[tuple[int, int]] = []
    real_killpg = os.killpg
    monkeypatch.setattr(os, "killpg", lambda g, sig: real_killpg(g, sig) if sig == 0 or g != pgid
                        else sent.append((g, sig)))
    try:
        d = in_process([spec("1", 1, "sleep 30")], retry=RetryPolicy(1, 600.0, None))
        d.daemon.acquire()
        task = d.task("sleep 30")
        # The previous attempt ran as pid = pgid = P and failed; P now names someone else's group.
        Registry(d.state / "uni_id.json").update(lambda data: data.update({task.uni_id: {
            "state": "abnormal_exit", "error_type": "oom", "retry_count": 1, "pid": pgid, "pgid": pgid,
            "create_time": 1.0, "retry_at": "2000-01-01T00:00:00"}}))
        d.daemon.resume()
        parent, write = os.getpid(), Registry._write

        def children_cannot_write(self, data, *rest):
            if os.getpid() != parent:
                enospc()
            return write(self, data, *rest)

        with monkeypatch.context() as m:
            m.setattr(Registry, "_write", children_cannot_write)
            d.daemon.tick()
            assert task.state is TaskState.RUNNING
            os.kill(d.daemon.children[task.uni_id].pid, signal.SIGKILL)
            d.tick_until(lambda: task.state is not TaskState.RUNNING, 10, "the killed supervisor to be collected")
        assert task.error_type == "lost"
        assert sent == [], f"gpu-compete signalled the previous attempt's process group: {sent}"
    finally:
        for pid in group_members(pgid):
            os.kill(pid, signal.SIGKILL)


def test_an_unreadable_history_at_start_up_is_a_clear_error(tmp_path):
    """A state directory whose history.jsonl cannot be read (a directory in its place) makes run exit 2
    with one clear message naming it, not a traceback, and starts no task."""
    run = DaemonRun(tmp_path, [("1", 1, "x", 0.1, "ok")], simulate="1x24")
    (run.state / "history.jsonl").mkdir(parents=True)
    result = subprocess.run(run.argv(), capture_output=True, text=True, timeout=30)
    assert "Traceback" not in result.stderr, result.stderr[-1500:]
    assert result.returncode == 2 and "history.jsonl" in result.stderr
    assert run.attempts() == []


def test_tick_survives_the_history_becoming_unreadable(in_process, tmp_path):
    """history.jsonl turning unreadable mid-run (EISDIR here; EIO on a failing disk) is logged by tick(),
    which goes on: the running task lives and completes once the history is readable again."""
    go = tmp_path / "go"
    d = in_process([spec("1", 1, wait_file(go))])
    d.daemon.acquire()
    d.daemon.resume()
    d.daemon.tick()
    task = d.task(wait_file(go))
    history = d.config.history
    history.unlink(missing_ok=True)
    history.mkdir()
    try:
        with warnings.catch_warnings(record=True) as caught, structlog.testing.capture_logs() as logs:
            warnings.simplefilter("always")
            for _ in range(3):
                d.daemon.tick()
        assert task.state is TaskState.RUNNING
    finally:
        history.rmdir()
    said = [str(w.message) for w in caught] + [f"{e['event']} {e}" for e in logs if e["log_level"] != "info"]
    assert any("history.jsonl" in text for text in said), f"nothing said about the unreadable history: {said}"
    go.touch()
    d.tick_until(lambda: task.state is TaskState.COMPLETED, 20, "the task to complete")


# --- a real full disk: the state directory on a tiny tmpfs (root only; skipped elsewhere) ---------

@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs mounted at tmp_path/disk, unmounted afterwards; skips where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mnt
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full (ENOSPC); returns it."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


class FullDiskRun:
    """Two queues, each one task that waits for its `go-N` file and appends to `runs-N` each time it
    runs; the daemon's state directory is on `disk`."""

    def __init__(self, tmp_path: Path, disk: Path):
        self.dir, self.state = tmp_path, (disk / "state").resolve()
        lines = []
        for n in (1, 2):
            lines += [f"echo run >> {{work_dir}}/runs-{n}; while [ ! -e {{work_dir}}/go-{n} ]; do sleep 0.05; done",
                      f"{n},1", ""]
        self.commands = tmp_path / "command.txt"
        self.commands.write_text("\n".join(lines))
        check = subprocess.run([console_script(), "check", "--commands", str(self.commands), "--json"],
                               capture_output=True, text=True, check=True)
        self.uids = [q["tasks"][0]["uni_id"] for q in json.loads(check.stdout)["queues"]]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([console_script(), "run", "--commands", str(self.commands), "--work-dir",
                                      str(self.dir), "--state-dir", str(self.state), "--simulate", "2x24",
                                      "--poll", "0.2", "--status-every", "0", "--log-format", "json"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def runs(self, n: int) -> int:
        try:
            return len((self.dir / f"runs-{n}").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def task_processes(self, n: int) -> list:
        return procs.processes_with_env(GPU_COMPETE_UNI_ID=self.uids[n - 1], **{NAMESPACE_ENV: str(self.state)})

    def wait(self, timeout: float = 30) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"daemon did not finish in {timeout}s\n{err[-3000:]}") from None
        return self.proc.returncode, err

    def close(self) -> None:
        for n in (1, 2):
            (self.dir / f"go-{n}").touch()
        stop_daemon(self.proc)
        procs.kill_all(procs.processes_with_env(**{NAMESPACE_ENV: str(self.state)}))


def through_a_full_disk(tmp_path: Path, disk: Path) -> tuple[FullDiskRun, dict]:
    """Both tasks run; the disk fills; task 2 ends while it is full; the disk is freed; task 1 ends."""
    run = FullDiskRun(tmp_path, disk)
    seen: dict = {}
    run.start()
    wait_for(lambda: run.runs(1) and run.runs(2), 20, "both tasks to start")
    seen["before"] = wait_stable(run.state / "uni_id.json")
    filler = fill(disk)
    (tmp_path / "go-2").touch()
    wait_for(lambda: not run.task_processes(2), 20, "task 2 and its supervisor to end, disk full")
    time.sleep(1.0)  # five rounds at --poll 0.2 on a full disk
    seen["during"] = (run.state / "uni_id.json").read_bytes()
    seen["daemon_alive"] = run.proc.poll() is None
    seen["task_1_alive"] = bool(run.task_processes(1))
    filler.unlink()
    (tmp_path / "go-1").touch()
    seen["code"], seen["err"] = run.wait()
    return run, seen


def test_a_real_full_disk_kills_nothing_loses_nothing_and_says_so(tmp_path, tiny_disk):
    """State dir on a 1 MiB tmpfs filled to ENOSPC mid-run: the daemon and the other running task live,
    the registry keeps its bytes, the error is logged, and once space is back the run completes (exit 0)."""
    run, seen = None, {}
    try:
        run, seen = through_a_full_disk(tmp_path, tiny_disk)
    finally:
        if run is not None:
            run.close()
    assert seen["daemon_alive"] and seen["task_1_alive"]
    assert seen["during"] == seen["before"], "the registry file changed while the disk was full"
    assert seen["code"] == 0, seen["err"][-3000:]
    assert ENOSPC_TEXT in seen["err"] and "Traceback" not in seen["err"]
    assert (run.runs(1), run.runs(2)) == (1, 1)
    raw = json.loads((run.state / "uni_id.json").read_text())
    assert not [u for u in run.uids if u in raw], f"records of completed tasks stayed: {raw}"


def test_a_task_that_ended_on_a_full_disk_is_in_the_history_and_not_run_again(tmp_path, tiny_disk):
    """A task that completed while the disk was full has its success in history.jsonl once space is back,
    so running the same command again starts nothing."""
    run = None
    try:
        run, seen = through_a_full_disk(tmp_path, tiny_disk)
        assert seen["code"] == 0, seen["err"][-3000:]
        completed = {e["uni_id"] for e in journal.entries(run.state / "history.jsonl") if e["state"] == "normal_exit"}
        assert set(run.uids) <= completed, f"missing from the history: {set(run.uids) - completed}"
        run.start()
        code, err = run.wait()
        assert code == 0, err[-3000:]
        assert (run.runs(1), run.runs(2)) == (1, 1), "a completed task ran again"
    finally:
        if run is not None:
            run.close()


# --- the daemon's launch record against a supervisor that writes first ----------------------------
# A supervisor is a fork with everything imported: a quick command can be recorded (running, then
# its end) before the daemon, which forked it, writes its own launch record. These tests hold the
# daemon back at `procs.create_time` (called between the fork and its registry write) until the
# supervisor has done so, making that interleaving certain instead of occasional.

def hold_launch_write_until(monkeypatch, condition) -> None:
    parent, create_time = os.getpid(), procs.create_time

    def held(pid):
        if os.getpid() == parent:
            wait_for(lambda: condition(pid), 10, "the supervisor to write first")
        return create_time(pid)

    monkeypatch.setattr(procs, "create_time", held)


def test_a_fast_tasks_final_record_is_not_overwritten_by_the_launch_record(in_process, monkeypatch):
    """When a task's supervisor records its end before the daemon writes the launch record, the
    registry keeps `normal_exit` (it never goes back to `running` for a task that has ended)."""
    d = in_process([spec("1", 1, "true")])
    d.daemon.acquire()
    d.daemon.resume()
    hold_launch_write_until(monkeypatch, exited)
    d.daemon.tick()
    task = d.task("true")
    assert d.registry_raw()[task.uni_id]["state"] == "normal_exit"
    d.tick_until(lambda: task.state is TaskState.COMPLETED, 10, "the task collected")


def test_an_error_type_a_fast_task_records_itself_survives_the_launch_record(in_process, monkeypatch):
    """A wrapped script that records its own error_type and exits at once keeps that error_type, in the
    registry and in the daemon's verdict, though the daemon's launch record is written after."""
    cmd = (f"{console_script()} registry set {{uni_id}} --state abnormal_exit --error-type dataset_missing "
           "> /dev/null; exit 1")
    d = in_process([spec("1", 1, cmd)], retry=RetryPolicy(1, 600.0, None))
    d.daemon.acquire()
    d.daemon.resume()
    hold_launch_write_until(monkeypatch, exited)
    d.daemon.tick()
    task = d.task(cmd)
    d.tick_until(lambda: task.state is not TaskState.RUNNING, 10, "the task collected")
    assert task.error_type == "dataset_missing"
    assert d.registry_raw()[task.uni_id]["error_type"] == "dataset_missing"


def test_the_workers_pid_and_group_recorded_first_by_the_supervisor_stay(in_process, monkeypatch):
    """When the supervisor records its worker (pid, create_time, pgid) before the daemon's launch record
    lands, the launch record keeps them (it adds the supervisor's own pid as `supervisor_pid`)."""
    d = in_process([spec("1", 1, "sleep 30")])
    d.daemon.acquire()
    d.daemon.resume()
    uid = d.task("sleep 30").uni_id
    hold_launch_write_until(monkeypatch, lambda pid: d.registry_raw().get(uid, {}).get("exec_pid") == pid)
    d.daemon.tick()
    supervisor = d.daemon.children[uid].pid
    record = d.registry_raw()[uid]
    worker = psutil.Process(supervisor).children()[0].pid
    assert (record["supervisor_pid"], record["pid"], record.get("pgid")) == (supervisor, worker, worker), record
    assert procs.liveness(record["pid"], record["create_time"]) == "alive"


def test_state_dir_under_a_regular_file_exits_2_with_a_clear_message(tmp_path):
    """`--state-dir FILE/sub` cannot be created: exit 2, one clear line, no traceback, nothing launched."""
    run = DaemonRun(tmp_path, [("1", 1, "x", 0.1, "ok")], simulate="1x24")
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a directory\n")
    argv = run.argv()
    argv[argv.index("--state-dir") + 1] = str(blocker / "sub")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot use state directory {blocker / 'sub'}" in result.stderr
    assert "Not a directory" in result.stderr
    assert run.attempts() == [] and blocker.read_text() == "not a directory\n"


def test_state_dir_that_is_a_regular_file_exits_2(tmp_path):
    """`--state-dir FILE` for run, status and stop: exit 2 naming the file, no traceback, file untouched."""
    run = DaemonRun(tmp_path, [("1", 1, "x", 0.1, "ok")], simulate="1x24")
    blocker = tmp_path / "plain-file"
    blocker.write_text("keep me\n")
    argv = run.argv()
    argv[argv.index("--state-dir") + 1] = str(blocker)
    for args in (argv, [console_script(), "status", "--state-dir", str(blocker)],
                 [console_script(), "stop", "--state-dir", str(blocker)]):
        result = subprocess.run(args, capture_output=True, text=True, timeout=30, env=clean_env())
        assert result.returncode == 2, (args[1], result.stderr)
        assert "Traceback" not in result.stderr
        assert f"--state-dir {blocker} is a file, not a directory" in result.stderr
    assert run.attempts() == [] and blocker.read_text() == "keep me\n"


def test_pid_file_that_cannot_be_created_exits_2(tmp_path):
    """A directory in the way of `daemon.pid` makes run exit 2 with the path, before any task starts."""
    run = DaemonRun(tmp_path, [("1", 1, "x", 0.1, "ok")], simulate="1x24")
    (run.state / "daemon.pid").mkdir(parents=True)
    result = subprocess.run(run.argv(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot create {run.state / 'daemon.pid'}" in result.stderr
    assert run.attempts() == []


# --- 4. file modes -------------------------------------------------------------------------------

def test_every_file_the_daemon_creates_is_private_even_with_umask_0(tmp_path):
    """Run (umask 0) with a success, a retried failure and a corrupt registry set aside: every file under
    the state dir is 0600 and every directory 0700."""
    blocks = [("1", 1, "ok", 0.1, "ok"), ("2", 1, "flaky", 0.1, "fail-until-2")]
    run = DaemonRun(tmp_path, blocks, simulate="2x24")
    first = subprocess.run(run.argv(), capture_output=True, text=True, timeout=60, umask=0)
    assert first.returncode == 0, first.stderr
    (run.state / "uni_id.json").write_text("{not json")  # the next run copies it aside
    second = subprocess.run(run.argv("--fresh"), capture_output=True, text=True, timeout=60, umask=0)
    assert second.returncode == 0, second.stderr
    names = {p.relative_to(run.state).as_posix() for p in run.state.rglob("*")}
    expected = {"uni_id.json", "uni_id.json.lock", "history.jsonl", "status.json", "daemon.pid", "logs",
                f"logs/{run.names['ok']}.log", f"logs/{run.names['flaky']}.log"}
    assert expected <= names, f"missing: {expected - names}"
    assert any(n.startswith("uni_id.json.corrupt-") for n in names)
    assert not [n for n in names if n.endswith(".tmp")], "a temp file was left behind"
    modes = {n: stat.S_IMODE((run.state / n).stat().st_mode) for n in names}
    modes["."] = stat.S_IMODE(run.state.stat().st_mode)
    wrong = {n: oct(m) for n, m in modes.items()
             if m != (0o700 if (run.state / n).is_dir() else 0o600)}
    assert wrong == {}, f"files or directories not private: {wrong}"


def test_in_a_container_nvml_host_pids_are_said_once_and_leases_end_at_settle(in_process):
    """NVML lists pids from another namespace (a container without --pid=host): our task never
    shows as itself. The daemon says so once, naming --pid=host; the lease ends at --settle; no
    owner is guessed from those pids."""
    fake = FakeNvml(three_fake_gpus())
    host_pid = 4_190_000  # above this machine's pids: means nothing here, like a host pid would
    for gpu in fake.gpus:
        gpu.processes = [(host_pid, 2 * 2**30)]
    probe = NvmlProbe(pynvml_module=fake.module, environ={})
    d = in_process([spec("1", 1, "sleep 30")], probe, settle=0.3)
    d.daemon.acquire()
    d.daemon.resume()
    task = d.task("sleep 30")
    d.daemon.tick()
    assert task.state is TaskState.RUNNING
    with structlog.testing.capture_logs() as logs:
        d.tick_until(lambda: d.daemon.foreign_pids, 10, "the namespace mismatch to be noticed")
        for _ in range(5):
            d.daemon.tick()
    said = [e["event"] for e in logs if "--pid=host" in e["event"]]
    assert len(said) == 1, logs
    assert not task.confirmed  # never seen as itself...
    assert not lease_active(task, time.monotonic(), d.config.settle)  # ...and no longer holds its GPU
    assert all(p.user == "unknown" for s in d.daemon.snapshots for p in s.processes)


def test_stop_with_no_daemon_says_so_and_exits_2_as_the_steering_commands_do(tmp_path):
    for op in ("stop", "pause"):
        result = subprocess.run([console_script(), op, "--state-dir", str(tmp_path)], capture_output=True, text=True,
                                timeout=30, env=clean_env())
        assert result.returncode == 2, (op, result.stderr)
        assert f"no gpu-compete daemon is running on {tmp_path}" in result.stderr
