"""End to end, the real daemon on simulated GPUs with real processes: time limits, gpus=2,
permanent failures, after=, peak VRAM and the oom lesson, host guards."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from .helpers import clean_env, console_script, read_json_or_none, wait_for

PY = sys.executable


class Run:
    def __init__(self, tmp_path: Path, text: str, *extra: str, simulate: str = "2x24"):
        self.dir = tmp_path
        self.state = tmp_path / "state"
        (tmp_path / "command.txt").write_text(text)
        argv = [console_script(), "run", "--commands", str(tmp_path / "command.txt"), "--work-dir", str(tmp_path),
                "--state-dir", str(self.state), "--simulate", simulate, "--poll", "0.2", "--status-every", "0",
                "--seed", "1", "--log-format", "json", *extra]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=clean_env())

    def wait(self, timeout: float = 60) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"daemon did not finish in {timeout}s\n{out}\n{err}") from None
        return self.proc.returncode, out, err

    def stop(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def history(self) -> list[dict]:
        path = self.state / "history.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def registry(self) -> dict:
        return read_json_or_none(self.state / "uni_id.json") or {}

    def status(self) -> dict:
        return read_json_or_none(self.state / "status.json") or {}

    def uid(self, queue: str, position: int = 1) -> str:
        out = subprocess.run([console_script(), "check", "--commands", str(self.dir / "command.txt"), "--json"],
                             capture_output=True, text=True, check=True)
        return next(t["uni_id"] for q in json.loads(out.stdout)["queues"] if q["queue"] == queue
                    for t in q["tasks"] if t["position"] == position)


def marks(tmp_path: Path, name: str) -> list[str]:
    path = tmp_path / name
    return path.read_text().split() if path.exists() else []


def test_timeout_ends_the_task_and_fails_it_as_timeout(tmp_path):
    """timeout= ends a hung task (SIGTERM to its group); --timeout does the same for a task
    without one; both fail as `timeout`, and with retries=0 for good."""
    text = (f"{PY} -c 'import time; time.sleep(120)'\n1,1,timeout=1s,retries=0\n\n"
            f"{PY} -c 'import time; time.sleep(120)'\n2,1,retries=0\n\n"
            "echo quick\n3,1,timeout=1h\n")
    run = Run(tmp_path, text, "--timeout", "2s")
    code, _, err = run.wait(60)
    assert code == 1, err
    ended = {h["uni_id"]: h for h in run.history()}
    assert ended[run.uid("1")]["error_type"] == "timeout" and ended[run.uid("1")]["gave_up"] is True
    assert ended[run.uid("2")]["error_type"] == "timeout"
    assert ended[run.uid("3")]["state"] == "normal_exit"
    log = (run.state / "logs" / f"{run.uid('1')}.log").read_text()
    assert "time limit: SIGTERM to the task's process group after 1 s" in log
    assert "time limit: SIGTERM to the task's process group after 2 s" in \
        (run.state / "logs" / f"{run.uid('2')}.log").read_text()


def test_gpus_2_gets_two_gpus_in_cuda_visible_devices_and_the_placeholder(tmp_path):
    """A gpus=2 task runs with CUDA_VISIBLE_DEVICES and {available_gpu} both the comma list of
    two GPUs; the registry names both; status shows it on both; a one-GPU task gets the third."""
    text = ("echo \"$CUDA_VISIBLE_DEVICES {available_gpu}\" > {work_dir}/seen; "
            "while [ ! -e {work_dir}/go ]; do sleep 0.05; done\n1,10,gpus=2\n\n"
            "echo $CUDA_VISIBLE_DEVICES > {work_dir}/single; while [ ! -e {work_dir}/go ]; do sleep 0.05; done\n"
            "2,10\n")
    run = Run(tmp_path, text, simulate="3x24")
    try:
        seen = wait_for(lambda: marks(tmp_path, "seen"), 20, "the gpus=2 task to start")
        single = wait_for(lambda: marks(tmp_path, "single"), 20, "the one-GPU task to start")
        visible, placeholder = seen
        assert visible == placeholder and len(visible.split(",")) == 2
        assert set(visible.split(",")) | set(single) == {"0", "1", "2"}  # exclusive: all different
        uid = run.uid("1")
        record = wait_for(lambda: run.registry().get(uid, {}).get("gpus"), 20, "the gpus list in the registry")
        assert [str(g) for g in record] == visible.split(",")

        def on_both():
            gpus = run.status().get("gpus", [])
            return sum(uid in g["running"] for g in gpus) == 2

        wait_for(on_both, 20, "status to show the task on both GPUs")
    finally:
        (tmp_path / "go").touch()
    code, _, err = run.wait(60)
    assert code == 0, err
    line = next(h for h in run.history() if h["uni_id"] == run.uid("1"))
    assert [str(g) for g in line["gpus"]] == visible.split(",")
    started = next(json.loads(ln) for ln in err.splitlines() if "task started" in ln and run.uid("1") in ln)
    assert started["gpus"] == visible.split(","), started  # the log names both


def test_more_gpus_than_exist_is_said_and_nothing_hangs_silently(tmp_path):
    """A gpus=3 task on two GPUs is named in the log and in status as needing 3 GPUs."""
    run = Run(tmp_path, "echo x\n1,1,gpus=3\n")
    uid = run.uid("1")
    wait_for(lambda: any(q.get("why") == "needs 3 GPUs; there are 2 in scope" for q in run.status().get("queues", [])),
             20, "status to say the task needs 3 GPUs")
    code, _, err = run.stop()
    assert code == 130
    assert "needs 3 GPUs; there are 2 in scope" in err and uid in err


def test_permanent_failure_fails_for_good_at_once_and_blocks_its_queue(tmp_path):
    """A SyntaxError fails for good on its first attempt with a one-line reason; the rest of its
    queue never runs, a queue after= it is blocked too, and the daemon exits 1."""
    (tmp_path / "bad.py").write_text("def f(:\n")
    text = (f"echo try >> {{work_dir}}/attempts; {PY} {{work_dir}}/bad.py\n1,1\n\n"
            "echo second >> {work_dir}/attempts\n1,1\n\n"
            "echo waiting >> {work_dir}/attempts\n2,1,after=1\n")
    run = Run(tmp_path, text)
    code, out, err = run.wait(60)
    assert code == 1, err
    assert marks(tmp_path, "attempts") == ["try"]  # one attempt, nothing else ran
    (line,) = run.history()
    assert (line["error_type"], line["gave_up"], line["attempt"]) == ("syntax_error", True, 1)
    assert "syntax_error would only repeat" in err
    assert "after=1: queue 1 is blocked" in out


def test_retry_permanent_retries_it(tmp_path):
    """With --retry-permanent a missing command is retried like any failure (here up to retries=1)."""
    run = Run(tmp_path, "echo try >> {work_dir}/attempts; no_such_command_gc\n1,1,retries=1\n",
              "--retry-permanent")
    code, _, err = run.wait(60)
    assert code == 1, err
    assert marks(tmp_path, "attempts") == ["try", "try"]
    assert [h["error_type"] for h in run.history()] == ["not_found", "not_found"]


def test_after_waits_for_the_queue_to_be_done(tmp_path):
    """A task with after=1 starts only once every task of queue 1 has completed."""
    text = ("sleep 0.5; echo a1 >> {work_dir}/order\n1,1\n\necho a2 >> {work_dir}/order\n1,1\n\n"
            "echo b >> {work_dir}/order\n2,1,after=1\n")
    run = Run(tmp_path, text)
    code, _, err = run.wait(60)
    assert code == 0, err
    assert marks(tmp_path, "order") == ["a1", "a2", "b"]


def test_peak_vram_is_recorded_and_overuse_warned_once(tmp_path):
    """A task declaring 2 GB whose process uses 5 GB: the peak goes into the registry and its
    history line, status shows declared beside used, and the log warns once."""
    text = "GPU_COMPETE_VRAM_GB=5 bash -c 'while [ ! -e {work_dir}/go ]; do sleep 0.05; done'\n1,2\n"
    run = Run(tmp_path, text, "--shared")
    uid = run.uid("1")
    try:
        wait_for(lambda: run.registry().get(uid, {}).get("peak_vram_gb") == 5.0, 20, "the peak in the registry")

        def shown():
            q = run.status().get("queues", [{}])[0]
            return q.get("vram_gb") == 2.0 and q.get("peak_vram_gb") == 5.0

        wait_for(shown, 20, "status to show declared 2 and used 5")
    finally:
        (tmp_path / "go").touch()
    code, _, err = run.wait(60)
    assert code == 0, err
    (line,) = run.history()
    assert line["peak_vram_gb"] == 5.0
    assert err.count("declared 2 GB and uses 5.0 GB on GPU") == 1


def test_oom_raises_the_need_but_never_past_the_largest_gpu(tmp_path):
    """An oom after using 10 GB would make the next attempt need 12.5 GB (x1.25), more than the
    only GPU (12 GB) has: it asks for the whole 12 GB instead, says so, and runs again there
    (grown past every GPU it could never run again and its queue would wait forever)."""
    text = ("GPU_COMPETE_VRAM_GB=10 bash -c 'while [ ! -e {work_dir}/go ]; do sleep 0.05; done'; "
            "echo 'torch.OutOfMemoryError: CUDA out of memory.' >&2; exit 1\n1,4\n")
    run = Run(tmp_path, text, simulate="1x12")
    uid = run.uid("1")
    wait_for(lambda: run.registry().get(uid, {}).get("peak_vram_gb") == 10.0, 20, "the peak in the registry")
    (tmp_path / "go").touch()
    wait_for(lambda: len(run.history()) >= 2, 30, "the task to run again on the 12 GB GPU")
    code, _, err = run.stop()
    assert code == 130
    assert "the next attempt needs 12 GB" in err and "more than the largest GPU has" in err
    first = run.history()[0]
    assert (first["error_type"], first["peak_vram_gb"], first["vram_gb_needed"]) == ("oom", 10.0, 12.0)


def test_host_guard_holds_every_queue_and_status_says_why(tmp_path):
    """--min-free-disk above what the disk has: nothing starts, and status says which guard holds since when."""
    run = Run(tmp_path, "echo ran > {work_dir}/ran\n1,1\n", "--min-free-disk", "100000000")
    guard = wait_for(lambda: run.status().get("host_guard"), 20, "status to show the host guard")
    assert "< --min-free-disk 100000000 GB" in guard["why"] and guard["since"]
    assert run.status()["queues"][0]["why"].startswith("host guard: free disk")
    code, _, err = run.stop()
    assert code == 130
    assert not (tmp_path / "ran").exists()


def test_gpus_2_prefers_two_close_gpus(tmp_path):
    """With topology groups from the probe (a, b, a, b), a gpus=2 task gets the two GPUs of one group."""
    sim = tmp_path / "sim.json"
    sim.write_text(json.dumps({"gpus": [{"memory_gb": 24, "group": g} for g in ("a", "b", "a", "b")]}))
    run = Run(tmp_path, "echo $CUDA_VISIBLE_DEVICES > {work_dir}/seen\n1,10,gpus=2\n", simulate=str(sim))
    code, _, err = run.wait(60)
    assert code == 0, err
    assert marks(tmp_path, "seen") in (["0,2"], ["1,3"])
