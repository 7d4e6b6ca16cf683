"""`gpu-compete exec`, `registry` and `status` end to end.

`exec` runs through the installed console script in a real subprocess, around real commands,
with real signals; `registry` and `status` go through click's CliRunner.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gpu_compete import procs
from gpu_compete.cli import main
from gpu_compete.registry import ENV_VAR, Registry

from .helpers import clean_env, files_under, gpu_compete_cmd, python_cmd, read_json, run_gpu_compete, wait_for

PY = sys.executable


def run_exec(registry: Path, uni_id: str, *cmd: str, log: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    args = ["exec", "--uni-id", uni_id, "--registry", str(registry)]
    if log is not None:
        args += ["--log", str(log)]
    return run_gpu_compete(*args, "--", *cmd, env=env)


def record_of(registry: Path, uni_id: str) -> dict:
    return read_json(registry)[uni_id]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(autouse=True)
def _no_registry_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """CliRunner calls run in this process: keep a developer's GPU_COMPETE_* settings out."""
    for name in list(os.environ):
        if name.startswith("GPU_COMPETE_"):
            monkeypatch.delenv(name)


# --- outcomes ----------------------------------------------------------------------------------

def test_exit_0_is_normal_exit_and_keeps_retry_count(tmp_path: Path) -> None:
    """CMD exiting 0 gives normal_exit with no error_type, exit status 0, and the pre-seeded retry_count 2 kept."""
    reg = tmp_path / "uni_id.json"
    Registry(reg).set("exp1", pid=1, state="abnormal_exit", error_type="oom", retry_count=2)
    result = run_exec(reg, "exp1", PY, "-c", "print('fine')")
    assert result.returncode == 0, result.stderr
    record = record_of(reg, "exp1")
    assert record["state"] == "normal_exit"
    assert "error_type" not in record
    assert record["retry_count"] == 2
    assert record["exit_status"] == 0
    assert record["pid"] != 1  # the pid of this run replaced the old one


def test_exit_3_is_abnormal_unknown(tmp_path: Path) -> None:
    """CMD exiting 3 with no recognisable output gives abnormal_exit/unknown and exec exits 3."""
    reg = tmp_path / "uni_id.json"
    result = run_exec(reg, "exp3", PY, "-c", "import sys; print('plain failure', file=sys.stderr); sys.exit(3)")
    assert result.returncode == 3
    record = record_of(reg, "exp3")
    assert record["state"] == "abnormal_exit"
    assert record["error_type"] == "unknown"
    assert record["exit_status"] == 3
    assert record["retry_count"] == 0


@pytest.mark.parametrize("text", [
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "RuntimeError: CUDA out of memory.",  # OOM wins over the RuntimeError around it
    "OutOfMemoryError",
    "cudaMalloc failed: out of memory",
])
def test_oom_text_on_stderr_is_oom(tmp_path: Path, text: str) -> None:
    """Out-of-memory text on CMD's stderr with a failing status is classified oom."""
    reg = tmp_path / "uni_id.json"
    result = run_exec(reg, "oom", PY, "-c", "import sys; sys.stderr.write(sys.argv[1] + '\\n'); sys.exit(1)", text)
    assert result.returncode == 1
    assert text in result.stderr
    record = record_of(reg, "oom")
    assert (record["state"], record["error_type"]) == ("abnormal_exit", "oom")


def test_runtime_error_is_runtime_error(tmp_path: Path) -> None:
    """A Python `RuntimeError: boom` traceback is classified runtime_error."""
    reg = tmp_path / "uni_id.json"
    result = run_exec(reg, "rt", PY, "-c", "raise RuntimeError('boom')")
    assert result.returncode == 1
    assert "RuntimeError: boom" in result.stderr
    record = record_of(reg, "rt")
    assert (record["state"], record["error_type"]) == ("abnormal_exit", "runtime_error")


def test_cmd_killed_by_sigkill_is_host_oom_137(tmp_path: Path) -> None:
    """CMD SIGKILLed by someone other than us (as the kernel OOM killer does) gives
    abnormal_exit/host_oom and exec exits 137 (128+9)."""
    reg = tmp_path / "uni_id.json"
    result = run_exec(reg, "k", PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert result.returncode == 128 + signal.SIGKILL
    record = record_of(reg, "k")
    assert (record["state"], record["error_type"]) == ("abnormal_exit", "host_oom")
    assert record["exit_status"] == 137


def test_missing_cmd_is_127_abnormal(tmp_path: Path) -> None:
    """A CMD that does not exist gives exit status 127, a message on stderr, and abnormal_exit/not_found."""
    reg = tmp_path / "uni_id.json"
    result = run_exec(reg, "x", "/nonexistent")
    assert result.returncode == 127
    assert "/nonexistent" in result.stderr
    record = record_of(reg, "x")
    assert record["state"] == "abnormal_exit"
    assert record["error_type"] == "not_found"
    assert record["exit_status"] == 127


# --- signals and the running record ------------------------------------------------------------

TRAPPING_CHILD = r"""
import os, signal, sys, time
got_file, ready = sys.argv[1], sys.argv[2]
got = []

def handler(signum, frame):
    got.append(signum)
    with open(got_file, "a") as fh:
        fh.write(signal.Signals(signum).name + "\n")

for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, handler)
with open(ready + ".tmp", "w") as fh:
    fh.write(str(os.getpid()))
os.replace(ready + ".tmp", ready)          # handlers are in place
deadline = time.monotonic() + 30
while not got and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(0.3)                            # stay long enough to see a duplicate delivery
sys.exit(0 if got else 5)
"""


def running_record(reg: Path, uni_id: str) -> dict | None:
    record = Registry(reg).get(uni_id)
    return record if record and record["state"] == "running" else None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_forwarded_exactly_once(tmp_path: Path, sig: signal.Signals) -> None:
    """A signal sent to the exec process reaches CMD exactly once; meanwhile the registry shows running with CMD's live pid, not exec's."""
    reg, got, ready = tmp_path / "uni_id.json", tmp_path / "got", tmp_path / "ready"
    Registry(reg).set("sig", pid=1, state="abnormal_exit", error_type="killed", retry_count=2)
    proc = subprocess.Popen(
        gpu_compete_cmd("exec", "--uni-id", "sig", "--registry", str(reg), "--",
                        *python_cmd(TRAPPING_CHILD, str(got), str(ready))),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        child_pid = int(wait_for(lambda: ready.exists() and ready.read_text(), 20, "CMD to install its handlers"))
        record = wait_for(lambda: running_record(reg, "sig"), 10, "the running record")
        assert record["pid"] == child_pid
        assert record["pid"] != proc.pid
        assert record["exec_pid"] == proc.pid
        assert record["retry_count"] == 2
        assert "error_type" not in record
        assert procs.liveness(record["pid"], record.get("create_time")) == "alive"

        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert got.read_text().splitlines() == [sig.name]
    final = record_of(reg, "sig")
    assert final["state"] == "normal_exit"
    assert "error_type" not in final
    assert final["retry_count"] == 2
    assert procs.liveness(final["pid"], final.get("create_time")) == "dead"


def test_forwarded_sigterm_that_ends_cmd_is_killed_143(tmp_path: Path) -> None:
    """SIGTERM sent to exec ends a CMD that does not trap it; exec exits 143 and records killed."""
    reg = tmp_path / "uni_id.json"
    proc = subprocess.Popen(gpu_compete_cmd("exec", "--uni-id", "term", "--registry", str(reg), "--",
                                            PY, "-c", "import time; time.sleep(60)"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        record = wait_for(lambda: running_record(reg, "term"), 20, "the running record")
        os.kill(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM
    final = record_of(reg, "term")
    assert (final["state"], final["error_type"], final["exit_status"]) == ("abnormal_exit", "killed", 143)
    assert procs.liveness(record["pid"], record.get("create_time")) == "dead"


# --- output ------------------------------------------------------------------------------------

TWO_STREAMS = r"""
import sys
print("line-to-stdout", flush=True)
print("line-to-stderr", file=sys.stderr, flush=True)
print("more-stdout")
"""


def test_stdout_and_stderr_stay_separate_and_log_gets_both(tmp_path: Path) -> None:
    """CMD's stdout reaches exec's stdout only, its stderr exec's stderr only, and --log receives both."""
    reg, log = tmp_path / "uni_id.json", tmp_path / "logs" / "exp.log"
    result = run_exec(reg, "out", PY, "-c", TWO_STREAMS, log=log)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["line-to-stdout", "more-stdout"]
    assert "line-to-stderr" in result.stderr
    assert "stdout" not in result.stderr
    text = log.read_text()
    for line in ("line-to-stdout", "line-to-stderr", "more-stdout"):
        assert line in text
    assert "start out" in text and "end out" in text
    assert text.index("start out") < text.index("line-to-stdout") < text.index("more-stdout") < text.index("end out")


def test_without_log_no_log_file_is_written(tmp_path: Path) -> None:
    """Without --log, exec writes nothing but the registry (and its lock) next to it."""
    reg = tmp_path / "uni_id.json"
    result = run_exec(reg, "nolog", PY, "-c", "print('hi')")
    assert result.returncode == 0
    assert result.stdout == "hi\n"
    assert files_under(tmp_path) == ["uni_id.json", "uni_id.json.lock"]


# --- where the registry is ---------------------------------------------------------------------

def test_registry_defaults_to_env_var_then_script_process(tmp_path: Path) -> None:
    """Without --registry, exec writes to $GPU_COMPETE_REGISTRY, and without that to ./script_process/uni_id.json."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env_reg = tmp_path / "elsewhere" / "reg.json"
    result = run_gpu_compete("exec", "--uni-id", "e1", "--", PY, "-c", "pass",
                             env=clean_env(**{ENV_VAR: str(env_reg)}), cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert record_of(env_reg, "e1")["state"] == "normal_exit"
    assert list(cwd.iterdir()) == []

    result = run_gpu_compete("exec", "--uni-id", "e2", "--", PY, "-c", "pass", env=clean_env(), cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert record_of(cwd / "script_process" / "uni_id.json", "e2")["state"] == "normal_exit"
    assert "e2" not in read_json(env_reg)


def test_registry_commands_use_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`registry set/get` without --registry use $GPU_COMPETE_REGISTRY."""
    env_reg = tmp_path / "env" / "uni_id.json"
    monkeypatch.setenv(ENV_VAR, str(env_reg))
    monkeypatch.chdir(tmp_path)
    assert invoke("registry", "set", "viaenv", "--state", "normal_exit").exit_code == 0
    assert record_of(env_reg, "viaenv")["state"] == "normal_exit"
    assert json.loads(invoke("registry", "get", "viaenv").stdout)["state"] == "normal_exit"
    assert not (tmp_path / "script_process").exists()


# --- unsafe ids --------------------------------------------------------------------------------

BAD_IDS = ["", ".", "..", "a/b", "../etc", "/abs", "a b", "a\nb", "x;touch y", "$(id)", "`id`", "a|b", "a*", "é"]


@pytest.mark.parametrize("uni_id", BAD_IDS, ids=repr)
def test_exec_refuses_bad_uni_id(tmp_path: Path, uni_id: str) -> None:
    """exec refuses an unsafe uni_id with exit 2 and a clear message, running nothing and creating no file."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    ran = tmp_path / "ran"
    result = run_gpu_compete("exec", "--uni-id", uni_id, "--registry", str(tmp_path / "reg" / "uni_id.json"),
                             "--log", str(tmp_path / "logs" / "x.log"), "--", "touch", str(ran), cwd=cwd)
    assert result.returncode == 2
    assert "bad uni_id" in result.stderr
    assert files_under(tmp_path) == ["cwd"]


@pytest.mark.parametrize("uni_id", BAD_IDS, ids=repr)
def test_registry_commands_refuse_bad_uni_id(tmp_path: Path, uni_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`registry set/get/rm` refuse an unsafe uni_id with exit 2 and create no file."""
    monkeypatch.chdir(tmp_path)
    reg = str(tmp_path / "reg" / "uni_id.json")
    for args in (["set", uni_id, "--state", "running"], ["get", uni_id], ["rm", uni_id]):
        result = invoke("registry", *args, "--registry", reg)
        assert result.exit_code == 2, (args, result.output)
        assert "bad uni_id" in result.stderr
    assert list(tmp_path.iterdir()) == []


# --- registry and status commands --------------------------------------------------------------

def test_registry_set_get_rm_round_trip(tmp_path: Path) -> None:
    """`registry set` records state, pid (with its create time) and error type keeping retry_count; `get` prints it; `rm` removes it."""
    reg = tmp_path / "uni_id.json"
    Registry(reg).set("exp", state="abnormal_exit", error_type="oom", retry_count=2)
    me = os.getpid()

    result = invoke("registry", "set", "exp", "--state", "running", "--pid", str(me), "--registry", str(reg))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["exp"]["pid"] == me
    got = json.loads(invoke("registry", "get", "exp", "--registry", str(reg)).stdout)
    assert (got["state"], got["pid"], got["retry_count"]) == ("running", me, 2)
    assert "error_type" not in got
    assert got["create_time"] == procs.create_time(me)

    assert invoke("registry", "set", "exp", "--state", "abnormal_exit", "--error-type", "oom",
                  "--registry", str(reg)).exit_code == 0
    got = json.loads(invoke("registry", "get", "exp", "--registry", str(reg)).stdout)
    assert (got["state"], got["error_type"], got["pid"], got["retry_count"]) == ("abnormal_exit", "oom", me, 2)

    assert invoke("registry", "set", "exp", "--state", "abnormal_exit", "--registry", str(reg)).exit_code == 0
    assert json.loads(invoke("registry", "get", "exp", "--registry", str(reg)).stdout)["error_type"] == "unknown"

    assert invoke("registry", "set", "exp", "--state", "normal_exit", "--registry", str(reg)).exit_code == 0
    got = json.loads(invoke("registry", "get", "exp", "--registry", str(reg)).stdout)
    assert got["state"] == "normal_exit" and "error_type" not in got and got["retry_count"] == 2

    assert invoke("registry", "rm", "exp", "--registry", str(reg)).exit_code == 0
    missing = invoke("registry", "get", "exp", "--registry", str(reg))
    assert missing.exit_code == 1
    assert "no record for exp" in missing.stderr
    assert read_json(reg) == {}

    bad_state = invoke("registry", "set", "exp", "--state", "finished", "--registry", str(reg))
    assert bad_state.exit_code == 2


def test_status_json_shows_alive_dead_reused_unverified(tmp_path: Path) -> None:
    """`status --registry F --json` lists every record with state, pid, retries, error type and alive/dead/reused/unverified."""
    reg = tmp_path / "uni_id.json"
    me = os.getpid()
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait(timeout=10)
    assert invoke("registry", "set", "live", "--state", "running", "--pid", str(me), "--registry", str(reg)).exit_code == 0
    assert invoke("registry", "set", "gone", "--state", "running", "--pid", str(dead.pid),
                  "--registry", str(reg)).exit_code == 0
    Registry(reg).set("reused", pid=me, create_time=procs.create_time(me) - 60, state="running", retry_count=4)
    Registry(reg).set("failed", pid=me, state="abnormal_exit", error_type="oom", retry_count=1)
    Registry(reg).update(lambda data: data.update(legacy=me))

    result = invoke("status", "--state-dir", str(tmp_path / "state"), "--registry", str(reg), "--json")
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    assert view["daemon_running"] is False
    rows = {row["uni_id"]: row for row in view["registry"]}
    assert set(rows) == {"live", "gone", "reused", "failed", "legacy"}
    assert (rows["live"]["state"], rows["live"]["pid"], rows["live"]["alive"]) == ("running", me, "alive")
    assert (rows["gone"]["pid"], rows["gone"]["alive"]) == (dead.pid, "dead")
    assert (rows["reused"]["alive"], rows["reused"]["retry_count"]) == ("reused", 4)
    assert rows["legacy"]["alive"] == "unverified"
    assert (rows["failed"]["state"], rows["failed"]["error_type"], rows["failed"]["retry_count"]) == \
        ("abnormal_exit", "oom", 1)

    text = invoke("status", "--state-dir", str(tmp_path / "state"), "--registry", str(reg)).stdout
    assert "registry (5 records)" in text
    for uid, alive in (("live", "alive"), ("gone", "dead"), ("reused", "reused")):
        line = next(line for line in text.splitlines() if line.startswith(uid + " "))
        assert alive in line.split()


def test_status_sees_a_running_exec_as_alive(tmp_path: Path) -> None:
    """While exec runs CMD, `status --json` reports its record running and alive; after CMD ends, normal_exit."""
    reg, ready = tmp_path / "uni_id.json", tmp_path / "ready"
    release = tmp_path / "release"
    code = ("import os, sys, time\nopen(sys.argv[1], 'w').close()\n"
            "deadline = time.monotonic() + 30\n"
            "while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline: time.sleep(0.01)\n")
    proc = subprocess.Popen(gpu_compete_cmd("exec", "--uni-id", "live1", "--registry", str(reg), "--",
                                            *python_cmd(code, str(ready), str(release))),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        wait_for(ready.exists, 20, "CMD to start")
        wait_for(lambda: running_record(reg, "live1"), 10, "the running record")
        view = json.loads(invoke("status", "--state-dir", str(tmp_path / "state"), "--registry", str(reg),
                                 "--json").stdout)
        row = view["registry"][0]
        assert (row["uni_id"], row["state"], row["alive"]) == ("live1", "running", "alive")
        release.touch()
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    view = json.loads(invoke("status", "--state-dir", str(tmp_path / "state"), "--registry", str(reg), "--json").stdout)
    assert view["registry"][0]["state"] == "normal_exit"


def test_unusable_registry_does_not_change_exit_status(tmp_path: Path) -> None:
    """When the registry becomes unusable while CMD runs (a directory in its place), exec warns and still exits with CMD's status."""
    reg, ready, release = tmp_path / "uni_id.json", tmp_path / "ready", tmp_path / "release"
    code = ("import os, sys, time\nopen(sys.argv[1], 'w').close()\n"
            "deadline = time.monotonic() + 30\n"
            "while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline: time.sleep(0.01)\n"
            "sys.exit(4)\n")
    proc = subprocess.Popen(gpu_compete_cmd("exec", "--uni-id", "disk", "--registry", str(reg), "--",
                                            *python_cmd(code, str(ready), str(release))),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        wait_for(ready.exists, 20, "CMD to start")
        wait_for(lambda: running_record(reg, "disk"), 10, "the running record")
        reg.unlink()
        reg.mkdir()  # reading and writing the registry now fail
        release.touch()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 4, err
    assert "could not record" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("shim", [True, False], ids=["setpriv", "preexec"])
def test_a_task_dies_with_its_killed_supervisor(tmp_path: Path, shim: bool) -> None:
    """SIGKILL of a supervisor ends its task at once (the kernel's parent-death signal), both
    when the task starts through `setpriv --pdeathsig` (vfork) and through a preexec hook."""
    import shutil

    if shim and (sys.version_info < (3, 11) or not shutil.which("setpriv")):
        pytest.skip("no setpriv, or Python before 3.11: the preexec path is the one used")
    task_pid = tmp_path / "task.pid"
    code = f"""
import sys
from gpu_compete import supervisor
if {shim}:
    supervisor.load_death_shim()
    assert supervisor._SHIM, "setpriv --pdeathsig does not work here"
else:
    supervisor._SHIM = []
supervisor.run(["bash", "-c", "echo $$ > {task_pid}; exec sleep 60"], "t1", {str(tmp_path / "uni_id.json")!r}, quiet=True)
"""
    sup = subprocess.Popen(python_cmd(code), env=clean_env())
    try:
        pid = wait_for(lambda: task_pid.exists() and task_pid.read_text().strip() and int(task_pid.read_text()),
                       timeout=20, what="the task's pid")
        assert procs.liveness(pid) != "dead"
        sup.kill()
        sup.wait(timeout=10)
        wait_for(lambda: procs.liveness(pid) == "dead", timeout=10, what="the task to die with its supervisor")
    finally:
        sup.kill()
        sup.wait(timeout=10)
