"""`gpu-compete check`: human and JSON views of a command file, warnings on stderr only, and
`FILE:LINE: message` with exit status 2 for bad input (through CliRunner and the real script)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpu_compete.cli import main
from gpu_compete.commandfile import parse

GOOD = """\
# queue 1: a then b
cd {work_dir} && python a.py --id {uni_id} --gpu {available_gpu}
echo ${HOME} | awk '{print $1}'
1,20

python b.py \\
  --lr 0.1
1, 7.5

# queue exp.2
cp out.{a,b} /tmp
exp.2,0
"""

SCRIPT = shutil.which("gpu-compete", path=os.path.dirname(sys.executable))


def write(tmp_path: Path, text: str, name: str = "commands.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def run_script(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    assert SCRIPT, "the gpu-compete console script is not installed next to this Python"
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=60, **kwargs)


def test_check_shows_queues_tasks_and_expanded_commands(tmp_path):
    """`check` lists queues in order with each task's uni_id, VRAM and expanded commands, `<gpu>` for the GPU."""
    path = write(tmp_path, GOOD)
    work = tmp_path / "work"
    result = invoke("check", "--commands", str(path), "--work-dir", str(work))
    assert result.exit_code == 0, result.output
    out = result.stdout
    tasks = parse(GOOD).tasks
    assert f"{path}: 3 tasks in 2 queues" in out
    assert out.index("queue 1 ") < out.index("queue exp.2 ")
    assert out.index(tasks[0].uni_id) < out.index(tasks[1].uni_id) < out.index(tasks[2].uni_id)
    assert re.search(rf"1\. {re.escape(tasks[0].uni_id)}\s+vram 20 GB", out)
    assert re.search(rf"2\. {re.escape(tasks[1].uni_id)}\s+vram 7\.5 GB", out)
    assert re.search(rf"1\. {re.escape(tasks[2].uni_id)}\s+vram 0 GB", out)
    resolved = str(work.resolve())
    assert f"$ cd {resolved} && python a.py --id {tasks[0].uni_id} --gpu <gpu>" in out
    assert "$ echo ${HOME} | awk '{print $1}'" in out
    assert "$ python b.py   --lr 0.1" in out
    assert "$ cp out.{a,b} /tmp" in out
    assert "{work_dir}" not in out and "{uni_id}" not in out and "{available_gpu}" not in out
    assert result.stderr == ""


def test_check_json_matches_the_file(tmp_path):
    """`check --json` prints valid JSON with queues in order and each task's uni_id, VRAM, commands and expansion."""
    path = write(tmp_path, GOOD)
    work = tmp_path / "w"
    result = invoke("check", "--commands", str(path), "--json", "--work-dir", str(work))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    tasks = parse(GOOD).tasks
    assert data["file"] == str(path)
    assert [q["queue"] for q in data["queues"]] == ["1", "exp.2"]
    flat = [t for q in data["queues"] for t in q["tasks"]]
    assert [t["uni_id"] for t in flat] == [t.uni_id for t in tasks]
    assert [t["vram_gb"] for t in flat] == [20, 7.5, 0]
    assert [t["position"] for t in flat] == [1, 2, 1]
    assert [t["line"] for t in flat] == [2, 6, 11]
    assert flat[1]["commands"] == ["python b.py   --lr 0.1"]
    assert flat[0]["expanded"][0] == (f"cd {work.resolve()} && python a.py --id {tasks[0].uni_id} --gpu <gpu>")
    assert flat[0]["expanded"][1] == "echo ${HOME} | awk '{print $1}'"
    assert result.stderr == ""


def test_check_default_work_dir_is_the_current_directory(tmp_path, monkeypatch):
    """Without --work-dir, {work_dir} expands to the current directory."""
    path = write(tmp_path, "echo {work_dir}\n1,1\n")
    monkeypatch.chdir(tmp_path)
    data = json.loads(invoke("check", "--commands", str(path), "--json").stdout)
    assert data["queues"][0]["tasks"][0]["expanded"] == [f"echo {Path.cwd().resolve()}"]


def test_check_json_keeps_warnings_on_stderr(tmp_path):
    """Suspicious placeholders warn on stderr naming the line, and stdout stays pure JSON."""
    path = write(tmp_path, "echo ok\necho {uniid} {gpu}\n1,2\n\nrun {work-dir}\n2,2\n")
    result = invoke("check", "--commands", str(path), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["queues"]) == 2
    lines = result.stderr.splitlines()
    assert any(line.startswith(f"{path}:2: warning:") and "{uniid}" in line and "{uni_id}" in line for line in lines)
    assert any(line.startswith(f"{path}:2: warning:") and "{gpu}" in line and "{available_gpu}" in line
               for line in lines)
    assert any(line.startswith(f"{path}:5: warning:") and "{work-dir}" in line for line in lines)
    assert ": warning:" not in result.stdout


@pytest.mark.parametrize("text, line", [
    ("echo a\necho b\n", 2),
    ("1,20\n", 1),
    ("echo a\n1,20\necho b\n2,5\n", 3),
    ("echo a\n1,2\n\necho b\n1,abc\n", 5),
    ("echo a\n1,-3\n", 2),
    ("echo a\n1,nan\n", 2),
    ("echo a\nbad/q,2\n", 2),
])
def test_check_bad_file_exits_2_with_file_and_line(tmp_path, text, line):
    """Bad input makes `check` exit 2 with `FILE:LINE: message` on stderr and nothing on stdout."""
    path = write(tmp_path, text)
    result = invoke("check", "--commands", str(path), "--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"gpu-compete: {path}:{line}: ")


@pytest.mark.parametrize("text", ["", "# nothing\n\n"])
def test_check_file_without_tasks_exits_2(tmp_path, text):
    """A file with no tasks makes `check` exit 2 saying so."""
    path = write(tmp_path, text)
    result = invoke("check", "--commands", str(path))
    assert result.exit_code == 2
    assert f"{path}: no tasks" in result.stderr


def test_check_missing_file_exits_2(tmp_path):
    """A missing command file makes `check` exit 2 naming the file."""
    path = tmp_path / "missing.txt"
    result = invoke("check", "--commands", str(path))
    assert result.exit_code == 2
    assert f"{path}: no such file" in result.stderr


def test_check_non_utf8_exits_2_with_line(tmp_path):
    """A non-UTF-8 command file makes `check` exit 2 naming the line of the bad byte."""
    path = tmp_path / "latin1.txt"
    path.write_bytes("echo a\n1,2\n\necho café\n2,2\n".encode("latin-1"))
    result = invoke("check", "--commands", str(path))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"gpu-compete: {path}:4: not UTF-8")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_check_unreadable_file_exits_2(tmp_path):
    """A chmod 000 command file makes `check` exit 2 with `cannot read`."""
    path = write(tmp_path, "echo a\n1,2\n")
    path.chmod(0)
    try:
        result = invoke("check", "--commands", str(path))
    finally:
        path.chmod(0o644)
    assert result.exit_code == 2
    assert f"{path}: cannot read" in result.stderr


def test_check_requires_commands():
    """`check` without --commands is a usage error (exit 2)."""
    result = invoke("check")
    assert result.exit_code == 2
    assert "--commands" in result.output


def test_console_script_check_json(tmp_path):
    """The installed `gpu-compete` script runs `check --json` and prints parseable JSON with the file's tasks."""
    path = write(tmp_path, GOOD)
    proc = run_script("check", "--commands", str(path), "--json", "--work-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [t["uni_id"] for q in data["queues"] for t in q["tasks"]] == [t.uni_id for t in parse(GOOD).tasks]
    assert proc.stderr == ""


def test_console_script_bad_file_exits_2(tmp_path):
    """The installed script exits 2 with `FILE:LINE: message` on stderr for a bad file."""
    path = write(tmp_path, "echo a\n1,2\n\necho b\n1,-5\n")
    proc = run_script("check", "--commands", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"gpu-compete: {path}:5: ")
    assert "negative" in proc.stderr


def test_uni_ids_are_stable_across_processes(tmp_path):
    """Two separate runs of the script (different hash seeds) print the same uni_ids for an unchanged file."""
    path = write(tmp_path, GOOD)
    outs = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = run_script("check", "--commands", str(path), "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        outs.append([t["uni_id"] for q in json.loads(proc.stdout)["queues"] for t in q["tasks"]])
    assert outs[0] == outs[1] == [t.uni_id for t in parse(GOOD).tasks]


def test_run_with_bad_file_runs_nothing(tmp_path):
    """`run` on a file with a bad block exits 2 before launching anything, even the good blocks."""
    marker = tmp_path / "ran"
    path = write(tmp_path, f"touch {marker}\n1,0\n\necho b\n2,-1\n")
    state = tmp_path / "state"
    proc = run_script("run", "--commands", str(path), "--simulate", "1x24", "--state-dir", str(state),
                      "--work-dir", str(tmp_path), "--poll", "0.1")
    assert proc.returncode == 2
    assert f"{path}:5: " in proc.stderr
    assert not marker.exists()
    assert not (state / "uni_id.json").exists()
