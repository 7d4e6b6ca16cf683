"""What status.json tells watchers: waits with reasons, backoffs, elapsed time, estimates, memory split, failures."""

from __future__ import annotations

import signal
import subprocess

from .daemon_harness import DaemonRun
from .helpers import clean_env, read_json_or_none, wait_for


def test_status_json_explains_a_running_daemon(tmp_path):
    """A live daemon's view holds elapsed time and estimates, why a head waits, backoffs, failures and the memory split."""
    blocks = [("1", 4, "quick", 0.2, "ok"), ("1", 4, "long", 30, "ok"),
              ("big", 30, "huge", 0.1, "ok"),
              ("flaky", 1, "flaky", 0.1, "fail")]
    run = DaemonRun(tmp_path, blocks, simulate="2x24")
    proc = subprocess.Popen(run.argv("--shared", "--retry-burst", "1", "--backoff", "120"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        def view_ready():
            view = read_json_or_none(run.state / "status.json")
            if not view:
                return None
            queues = {q["queue"]: q for q in view["queues"]}
            ok = queues["1"]["current_state"] == "running" and queues["1"]["done"] == 1 and view["backing_off"]
            return view if ok and (queues["1"]["elapsed_s"] or 0) >= 1 else None

        view = wait_for(view_ready, 30, "the long task running for a second, flaky backing off")
        queues = {q["queue"]: q for q in view["queues"]}
        assert queues["big"]["why"] == "needs 30 GB; the largest GPU has 24 GB"
        assert queues["big"]["current_state"] == "pending"
        q1 = queues["1"]
        # one task left, the running one: the mean of the completed one, less what it has run
        assert q1["mean_task_s"] > 0 and abs(q1["eta_s"] - max(0.0, q1["mean_task_s"] - q1["elapsed_s"])) <= 0.11
        assert queues["1"]["counts"]["completed"] == 1 and queues["1"]["counts"]["running"] == 1
        back = view["backing_off"][0]
        assert back["uni_id"] == run.names["flaky"] and 100 < back["retry_in_s"] <= 120
        assert back["error_type"] == "unknown"
        assert view["recent_failures"][0]["uni_id"] == run.names["flaky"]
        gpu = next(g for g in view["gpus"] if run.names["long"] in g["running"])
        assert gpu["ours_bytes"] == 4 * 1024**3 or run.names["long"] in gpu["leased"]
        assert view["gpus_free_for_waiting"] == []  # the only waiting head (30 GB) fits nowhere
        assert isinstance(view["idle_while_waiting_gpu_seconds"], float)
        proc.send_signal(signal.SIGUSR2)  # end the tasks: nothing more to see
        proc.wait(timeout=30)
        fail = next(h for h in run.history() if h["state"] == "abnormal_exit")
        assert fail["start"] and fail["end"] and fail["start"] <= fail["end"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
