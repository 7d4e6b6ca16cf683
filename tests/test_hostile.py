"""Hostile input: unsafe uni_ids and queue ids, bad option values, and registries full of records of
the wrong type. Everything must be refused cleanly (exit 2, a clear message, nothing touched) or
read sensibly, and nothing already recorded may be lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from gpu_compete.cli import main

from .daemon_harness import DaemonRun, assert_each_succeeded_once
from .helpers import clean_env, files_under, run_gpu_compete, wait_for

# Path tricks, whitespace and control characters, shell metacharacters (each armed to create a
# file named `pwned` should a shell ever evaluate it), quotes, globs, and look-alike Unicode.
BAD_IDS = [
    "", ".", "..", "a/b", "../x", "/abs", "~", "a\\b",
    "a b", " lead", "trail ", "a\nb", "a\tb", "a\rb", "a\x1bb",
    "a;touch pwned", "$(touch pwned)", "`touch pwned`", "a|touch pwned", "a&touch pwned", "a&&touch pwned",
    "a>pwned", "a<b", "*", "a*", "a?", "[ab]", "a{b,c}", "a#b", "a=b", "a:b", "a,b", "a%b", "a!b",
    "'a'", '"a"', "a'b", "é", "a\u200bb", "\uff41",
]


@pytest.fixture(autouse=True)
def _keep_structlog_config():
    """`run` invoked in-process (CliRunner) configures structlog onto CliRunner's stderr; put it back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def no_gpu_compete_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("GPU_COMPETE_"):
            monkeypatch.delenv(name)


# --- uni_ids ------------------------------------------------------------------------------------

@pytest.mark.parametrize("uni_id", BAD_IDS, ids=repr)
def test_exec_refuses_an_unsafe_uni_id_before_any_path_or_shell(tmp_path, uni_id, monkeypatch):
    """`gpu-compete exec` with an unsafe uni_id exits 2 with a clear message, runs nothing and
    creates no file: not the registry (from the environment or the default), not the log."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = clean_env(GPU_COMPETE_REGISTRY=str(tmp_path / "envreg" / "uni_id.json"))
    result = run_gpu_compete("exec", "--uni-id", uni_id, "--log", str(tmp_path / "logs" / "x.log"),
                             "--", "touch", "ran", env=env, cwd=cwd)
    assert result.returncode == 2, result.stderr
    assert "bad uni_id" in result.stderr and "letters, digits" in result.stderr
    assert "Traceback" not in result.stderr
    # The default registry (./script_process/uni_id.json), in-process: no process start to pay for.
    no_gpu_compete_env(monkeypatch)
    monkeypatch.chdir(cwd)
    default = CliRunner().invoke(main, ["exec", "--uni-id", uni_id, "--", "touch", "ran"])
    assert default.exit_code == 2 and "bad uni_id" in default.stderr, default.output
    assert files_under(tmp_path) == ["cwd"], files_under(tmp_path)


@pytest.mark.parametrize("uni_id", BAD_IDS + ["a\x00b"], ids=repr)
def test_registry_commands_refuse_an_unsafe_uni_id_before_any_path(tmp_path, uni_id, monkeypatch):
    """`registry set/get/rm` with an unsafe uni_id (NUL included) exit 2 with a clear message and create
    no file, whether the registry is given, taken from the environment or the default."""
    no_gpu_compete_env(monkeypatch)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    runner = CliRunner()
    for where in ([], ["--registry", str(tmp_path / "reg" / "uni_id.json")], "env"):
        if where == "env":
            monkeypatch.setenv("GPU_COMPETE_REGISTRY", str(tmp_path / "envreg" / "uni_id.json"))
            where = []
        for args in (["set", uni_id, "--state", "running", "--pid", str(os.getpid())],
                     ["set", uni_id, "--state", "abnormal_exit", "--error-type", "oom"],
                     ["get", uni_id], ["rm", uni_id]):
            result = runner.invoke(main, ["registry", *args, *where])
            assert result.exit_code == 2, (args, where, result.output)
            assert "bad uni_id" in result.stderr, result.output
            assert result.exception is None or isinstance(result.exception, SystemExit)
    assert files_under(tmp_path) == ["cwd"], files_under(tmp_path)


def test_exec_refuses_a_uni_id_with_a_nul_byte(tmp_path, monkeypatch):
    """A NUL byte in `exec --uni-id` (only possible in-process: argv cannot carry one) exits 2, runs nothing."""
    no_gpu_compete_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["exec", "--uni-id", "a\x00b", "--registry", str(tmp_path / "r" / "u.json"),
                                       "--", "touch", str(tmp_path / "ran")])
    assert result.exit_code == 2 and "bad uni_id" in result.stderr
    assert files_under(tmp_path) == []


def test_registry_set_refuses_an_unsafe_uni_id_as_a_real_process(tmp_path):
    """Through the console script too: `registry set '$(touch pwned)'` exits 2 and nothing is created."""
    result = run_gpu_compete("registry", "set", "$(touch pwned)", "--state", "running", cwd=tmp_path)
    assert result.returncode == 2 and "bad uni_id" in result.stderr and "Traceback" not in result.stderr
    assert files_under(tmp_path) == []


# --- queue ids in the command file ----------------------------------------------------------------

BAD_QUEUES = ["../x", "a/b", "/abs", ".", "..", "a;b", "$(touch pwned)", "`touch pwned`", "a|b", "a&b", "a*",
              "'a'", '"a"', "a\\b", "a b", "a\x00b", "é", "a>b", "~"]


@pytest.mark.parametrize("queue", BAD_QUEUES, ids=repr)
def test_a_queue_id_with_path_or_shell_characters_is_refused_with_its_line(tmp_path, queue):
    """`check` (and `run`) refuse a queue id with path or shell characters as FILE:LINE, exit 2, and
    `run` creates no state directory and starts nothing."""
    commands = tmp_path / "command.txt"
    commands.write_bytes(f"echo ok\n1,1\n\ntouch {tmp_path / 'ran'}\n{queue},1\n".encode())
    check = run_gpu_compete("check", "--commands", str(commands), cwd=tmp_path)
    assert check.returncode == 2, check.stdout
    assert check.stderr.startswith(f"gpu-compete: {commands}:5: "), check.stderr
    assert "Traceback" not in check.stderr
    run = CliRunner().invoke(main, ["run", "--commands", str(commands), "--simulate", "1x24", "--state-dir",
                                    str(tmp_path / "state"), "--poll", "0.2"])
    assert run.exit_code == 2 and f"{commands}:5: " in run.stderr, run.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["command.txt"]


# --- option values -------------------------------------------------------------------------------

BAD_OPTIONS = [(opt, value) for opt in ("--poll", "--settle", "--backoff", "--status-every")
               for value in ("-1", "-0.5", "abc", "", "nan", "inf", "-inf", "1e999", "0x10", "1,5")]
BAD_OPTIONS += [(opt, value) for opt in ("--retry-burst", "--max-retries")
                for value in ("-1", "-100", "abc", "", "1.5", "1e3", "nan")]
BAD_OPTIONS += [("--retry-burst", "0"), ("--poll", "0"), ("--poll", "-0")]


@pytest.mark.parametrize("option,value", BAD_OPTIONS, ids=lambda v: repr(v))
def test_bad_option_values_for_run_exit_2_naming_the_option(tmp_path, monkeypatch, option, value):
    """Negative, non-numeric or non-finite values of run's numeric options exit 2 naming the option,
    before any state directory is created (as options and as GPU_COMPETE_* variables)."""
    no_gpu_compete_env(monkeypatch)
    commands = tmp_path / "command.txt"
    commands.write_text(f"touch {tmp_path / 'ran'}\n1,1\n")
    base = ["run", "--commands", str(commands), "--simulate", "1x24", "--state-dir", str(tmp_path / "state")]
    runner = CliRunner()
    result = runner.invoke(main, [*base, option, value])
    assert result.exit_code == 2, result.output
    assert option in result.stderr, result.stderr
    env_name = "GPU_COMPETE_" + option[2:].upper().replace("-", "_")
    if value != "":  # an empty variable is the same as an unset one: it would run the daemon
        from_env = runner.invoke(main, base, env={env_name: value})
        assert from_env.exit_code == 2, from_env.output
        assert option in from_env.stderr, from_env.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["command.txt"]


def test_a_bad_option_value_exits_2_from_the_console_script_without_a_traceback(tmp_path):
    """The real process: `--retry-burst -3` exits 2 with click's message naming the option."""
    commands = tmp_path / "command.txt"
    commands.write_text("true\n1,1\n")
    result = run_gpu_compete("run", "--commands", str(commands), "--simulate", "1x24", "--retry-burst", "-3",
                             cwd=tmp_path)
    assert result.returncode == 2
    assert "Invalid value for '--retry-burst'" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["command.txt"]


def test_a_huge_poll_is_refused_or_works_never_a_traceback(tmp_path):
    """`--poll 1e300` is either refused with exit 2 naming --poll, or the run works; never a traceback."""
    run = DaemonRun(tmp_path, [("1", 1, "a", 0.1, "ok"), ("1", 1, "b", 0.1, "ok")], simulate="1x24")
    argv = run.argv()
    argv[argv.index("--poll") + 1] = "1e300"
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 0 or (result.returncode == 2 and "--poll" in result.stderr)


def test_a_huge_backoff_is_refused_or_works_never_a_traceback(tmp_path):
    """`--backoff 1e300` with a failing task is either refused with exit 2 naming --backoff, or the task
    backs off and the daemon drains on SIGTERM (exit 130); never a traceback."""
    run = DaemonRun(tmp_path, [("1", 1, "bad", 0.1, "fail")], simulate="1x24")
    run.start("--retry-burst", "1", "--backoff", "1e300")
    try:
        wait_for(lambda: run.proc.poll() is not None or any(a.end for a in run.attempts()), 20, "the first failure")
        wait_for(lambda: run.proc.poll() is not None or run.history(), 10, "the failure to be recorded")
        if run.proc.poll() is None:
            run.signal(signal.SIGTERM)
        code, _, err = run.wait(timeout=30)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()
    assert "Traceback" not in err, err[-2000:]
    assert code == 130 or (code == 2 and "--backoff" in err)


# --- registries with records of the wrong type ------------------------------------------------------

ODD = {
    "strpid": {"pid": "abc", "state": "running", "retry_count": 2},
    "negretry": {"pid": 2**22 + 7, "state": "abnormal_exit", "retry_count": -1, "error_type": "oom"},
    "nested": {"pid": {"x": 1}, "state": ["running"], "retry_count": "3", "gpu": "zero", "create_time": "yesterday",
               "retry_at": 17, "supervisor_pid": -4, "error_type": 5},
    "hugepid": {"pid": 2**70, "state": "running", "create_time": 1.5},
    "boolpid": {"pid": True, "state": "normal_exit", "retry_count": False},
    "alist": [1, "two", {"three": 3}],
    "astring": "hello",
    "anull": None,
    "abool": True,
    "afloat": 1.5,
    "emptyobj": {},
    "weird key ../$(x)": {"pid": "1; rm -rf /", "state": "running"},
}
DICT_IDS = ["strpid", "negretry", "nested", "hugepid", "boolpid", "emptyobj", "weird key ../$(x)"]
UNREADABLE_IDS = ["alist", "astring", "anull", "abool", "afloat"]


def write_registry(path: Path, records: dict) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(records, indent=2).encode()
    path.write_bytes(data)
    return data


def assert_kept(path: Path, records: dict) -> None:
    """Every record in `records` is in the file with the same JSON value, byte for byte."""
    raw = json.loads(path.read_text())
    for key, value in records.items():
        assert key in raw, f"record {key!r} was lost"
        assert json.dumps(raw[key], sort_keys=True) == json.dumps(value, sort_keys=True), key


def test_status_shows_a_registry_of_odd_records_sensibly(tmp_path):
    """`gpu-compete status` (text and --json) exits 0 on odd records: understandable ones are listed
    with bad fields shown as unknown/clamped, the others named in a warning; the file is not changed."""
    state = tmp_path / "state"
    before = write_registry(state / "uni_id.json", ODD)
    result = run_gpu_compete("status", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    rows = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    for uid in DICT_IDS:
        assert uid in rows, f"{uid!r} not shown:\n{result.stdout}"
    assert rows["strpid"].split()[2:4] == ["-", "dead"]  # a string pid is no pid, and not alive
    assert rows["negretry"].split()[4] == "0"  # a negative retry count is clamped
    for uid in UNREADABLE_IDS:
        assert f"record {uid!r} is not a pid or an object" in result.stderr
    as_json = run_gpu_compete("status", "--state-dir", str(state), "--json")
    assert as_json.returncode == 0, as_json.stderr
    view = {r["uni_id"]: r for r in json.loads(as_json.stdout)["registry"]}
    assert set(view) == set(DICT_IDS)
    assert view["strpid"]["pid"] is None and view["strpid"]["alive"] == "dead"
    assert view["hugepid"]["alive"] == "dead" and view["negretry"]["retry_count"] == 0
    assert (state / "uni_id.json").read_bytes() == before
    assert sorted(p.name for p in state.iterdir()) == ["uni_id.json"]


def test_registry_set_and_rm_of_another_id_keep_odd_records_as_they_were(tmp_path):
    """`registry set` / `rm` of another id rewrite the file but keep every odd record's JSON value."""
    reg = tmp_path / "uni_id.json"
    write_registry(reg, ODD)
    set_ = run_gpu_compete("registry", "set", "mine", "--state", "running", "--pid", str(os.getpid()),
                           "--registry", str(reg))
    assert set_.returncode == 0, set_.stderr
    assert_kept(reg, ODD)
    assert json.loads(reg.read_text())["mine"]["pid"] == os.getpid()
    got = run_gpu_compete("registry", "get", "strpid", "--registry", str(reg))
    assert got.returncode == 0 and json.loads(got.stdout)["pid"] is None
    assert run_gpu_compete("registry", "get", "alist", "--registry", str(reg)).returncode == 1
    rm = run_gpu_compete("registry", "rm", "mine", "--registry", str(reg))
    assert rm.returncode == 0, rm.stderr
    assert_kept(reg, ODD)
    assert set(json.loads(reg.read_text())) == set(ODD)


def test_daemon_completes_its_tasks_and_keeps_unrelated_odd_records(tmp_path):
    """A daemon whose registry holds odd records under other ids runs every task once, exit 0, and
    leaves every one of those records as it was."""
    blocks = [("1", 1, "a", 0.2, "ok"), ("1", 1, "b", 0.2, "ok"), ("2", 1, "c", 0.2, "ok")]
    run = DaemonRun(tmp_path, blocks, simulate="2x24")
    write_registry(run.state / "uni_id.json", ODD)
    code, out, err = run.run(timeout=60)
    assert code == 0, err
    assert "Traceback" not in err
    assert_each_succeeded_once(run.attempts(), list(run.names.values()))
    assert_kept(run.state / "uni_id.json", ODD)
    assert set(run.registry()) == set(ODD), "a completed task's record stayed, or an odd one went"
    status = run_gpu_compete("status", "--state-dir", str(run.state))
    assert status.returncode == 0 and "Traceback" not in status.stderr


def test_daemon_recovers_tasks_whose_own_records_have_wrong_types(tmp_path):
    """Tasks whose own records say running with `"pid": "abc"` / `"retry_count": -1`, or hold a list, or
    an abnormal_exit with fields of the wrong type, are taken as not running, run once, and complete;
    unrelated odd records stay."""
    blocks = [("1", 1, "strpid", 0.2, "ok"), ("2", 1, "negretry", 0.2, "ok"), ("3", 1, "alist", 0.2, "ok"),
              ("4", 1, "typo", 0.2, "ok")]
    run = DaemonRun(tmp_path, blocks, simulate="2x24")
    own = {run.names["strpid"]: {"pid": "abc", "state": "running"},
           run.names["negretry"]: {"pid": "abc", "state": "running", "retry_count": -1},
           run.names["alist"]: [1, 2, 3],
           run.names["typo"]: {"state": "abnormal_exit", "error_type": 5, "retry_count": "2", "retry_at": 17,
                               "gpu": "zero", "pgid": "x", "supervisor_pid": "y"}}
    write_registry(run.state / "uni_id.json", {**ODD, **own})
    code, _, err = run.run("--backoff", "60", timeout=60)
    assert code == 0, err
    assert "Traceback" not in err
    attempts = run.attempts()
    assert_each_succeeded_once(attempts, list(run.names.values()))
    assert len(attempts) == len(blocks), "a task ran more than once"
    assert_kept(run.state / "uni_id.json", ODD)
    assert set(run.registry()) == set(ODD)


def test_a_gave_up_field_of_the_wrong_type_is_not_trusted(tmp_path):
    """A task record with `"gave_up": "false"` (a string, not a bool) does not block its queue."""
    run = DaemonRun(tmp_path, [("1", 1, "a", 0.2, "ok")], simulate="1x24")
    write_registry(run.state / "uni_id.json", {run.names["a"]: {
        "state": "abnormal_exit", "error_type": "oom", "retry_count": 1, "gave_up": "false",
        "retry_at": "2000-01-01T00:00:00"}})
    code, out, err = run.run(timeout=60)
    assert code == 0, out
    assert run.started("a") == 1
