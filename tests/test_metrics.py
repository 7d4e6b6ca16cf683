"""Prometheus metrics: scraped over real HTTP from a running daemon and parsed with prometheus_client's parser."""

from __future__ import annotations

import socket
import subprocess
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpu_compete import metrics

from .daemon_harness import DaemonRun
from .helpers import clean_env, python_cmd, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_families_from_a_view_and_history_lines():
    """Every metric the issue names is produced from a view and history counts, with the right labels and values."""
    counts = metrics.HistoryCounts()
    counts.add([{"state": "abnormal_exit", "error_type": "oom", "start": "2027-01-01T00:00:00",
                 "end": "2027-01-01T00:00:20"},
                {"state": "normal_exit", "start": "2027-01-01T00:00:00", "end": "2027-01-01T00:01:40"},
                {"state": "abnormal_exit"}])
    view = {"updated_epoch": 100.0, "totals": {"running": 1, "completed": 2},
            "queues": [{"queue": "q", "counts": {"running": 1, "pending": 2}}],
            "gpus": [{"key": "3:1", "free_bytes": 5, "total_bytes": 10, "running": ["a"], "ours_bytes": 3,
                      "others_bytes": 2}],
            "idle_while_waiting_gpu_seconds": 12.5}
    fams = {f.name: f for f in metrics.families(view, counts, now=103.0)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert samples[("gpu_compete_tasks", (("state", "running"),))] == 1
    assert samples[("gpu_compete_queue_tasks", (("queue", "q"), ("state", "pending")))] == 2
    assert samples[("gpu_compete_gpu_memory_free_bytes", (("gpu", "3:1"),))] == 5
    assert samples[("gpu_compete_gpu_memory_total_bytes", (("gpu", "3:1"),))] == 10
    assert samples[("gpu_compete_gpu_tasks", (("gpu", "3:1"),))] == 1
    assert samples[("gpu_compete_task_failures_total", (("error_type", "oom"),))] == 1
    assert samples[("gpu_compete_task_failures_total", (("error_type", "unknown"),))] == 1
    assert samples[("gpu_compete_task_duration_seconds_bucket", (("le", "30"), ("outcome", "failed")))] == 1
    assert samples[("gpu_compete_task_duration_seconds_bucket", (("le", "60"), ("outcome", "completed")))] == 0
    assert samples[("gpu_compete_task_duration_seconds_sum", (("outcome", "completed"),))] == 100
    assert samples[("gpu_compete_gpu_idle_while_waiting_seconds_total", ())] == 12.5
    assert samples[("gpu_compete_status_age_seconds", ())] == 3.0


def test_scrape_a_running_daemon_over_http(tmp_path):
    """While the daemon runs, /metrics answers over HTTP with its tasks, GPUs and failures; the server ends with it."""
    run = DaemonRun(tmp_path, [("1", 1, "fails", 0.1, "fail-until-2"), ("1", 1, "slow", 3, "ok")], simulate="2x24")
    port = free_port()
    proc = subprocess.Popen(run.argv("--metrics-port", str(port)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        def slow_running():
            try:
                got = scrape(port)
            except OSError:
                return None
            done = got.get("gpu_compete_queue_tasks", {}).get((("queue", "1"), ("state", "completed")))
            return got if got.get("gpu_compete_tasks", {}).get((("state", "running"),)) == 1 and done == 1 else None

        got = wait_for(slow_running, 30, "a scrape showing the slow task running after one failure")
        assert got["gpu_compete_task_failures_total"] == {(("error_type", "runtime_error"),): 1.0}
        assert got["gpu_compete_gpu_memory_total_bytes"][(("gpu", "0"),)] == 24 * 1024**3
        assert sum(got["gpu_compete_gpu_tasks"].values()) == 1
        assert got["gpu_compete_queue_tasks"][(("queue", "1"), ("state", "completed"))] == 1
        assert "gpu_compete_gpu_idle_while_waiting_seconds_total" in got
        assert got["gpu_compete_task_duration_seconds_count"][(("outcome", "completed"),)] == 1
        server = [c for c in psutil.Process(proc.pid).children() if "gpu_compete.metrics" in " ".join(c.cmdline())]
        assert len(server) == 1
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        wait_for(lambda: not server[0].is_running() or server[0].status() == psutil.STATUS_ZOMBIE, 10,
                 "the metrics server to end with the daemon")
        with pytest.raises(OSError):
            scrape(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_port_in_use_is_an_error_at_start(tmp_path):
    """A metrics port another program listens on stops the daemon before it runs anything, exit 2, naming the port."""
    run = DaemonRun(tmp_path, [("1", 1, "a", 0.1, "ok")])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run(run.argv("--metrics-port", str(port)), capture_output=True, text=True, timeout=30,
                              env=clean_env())
    assert proc.returncode == 2
    assert f"127.0.0.1:{port}: the port is in use" in proc.stderr
    assert not (run.dir / "events").exists()  # no task ran


def test_metrics_server_leaves_when_the_daemon_dies(tmp_path):
    """A metrics process whose daemon was killed (SIGKILL, no clean-up) exits by itself."""
    code = ("import sys, time; from pathlib import Path; from gpu_compete import metrics; "
            "s = metrics.Server(metrics.bind('127.0.0.1', 0), Path(sys.argv[1])); "
            "print(s.address[1], s.proc.pid, flush=True); time.sleep(60)")
    daemon = subprocess.Popen(python_cmd(code, str(tmp_path)), stdout=subprocess.PIPE, text=True)
    try:
        port, pid = map(int, daemon.stdout.readline().split())
        server = psutil.Process(pid)
        wait_for(lambda: scrape_ok(port), 10, "the server to answer")
        daemon.kill()
        daemon.wait()
        wait_for(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, 10,
                 "the orphaned metrics server to exit")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def scrape_ok(port: int) -> bool:
    try:
        return "gpu_compete_gpu_idle_while_waiting_seconds_total" in scrape(port)
    except OSError:
        return False


def test_grafana_dashboard_uses_only_exported_metrics():
    """contrib/grafana-dashboard.json is valid JSON and every metric its queries name is one the server exports."""
    import json
    import re
    from pathlib import Path

    dash = json.loads((Path(__file__).parent.parent / "contrib" / "grafana-dashboard.json").read_text())
    counts = metrics.HistoryCounts()
    counts.add([{"state": "abnormal_exit", "error_type": "oom"}])
    exported = {s.name for f in metrics.families({"updated_epoch": 0, "totals": {"running": 1},
                                                   "queues": [{"queue": "q", "counts": {"running": 1}}],
                                                   "gpus": [{"key": "0", "free_bytes": 1, "total_bytes": 2,
                                                             "ours_bytes": 1, "others_bytes": 0}]},
                                                  counts, 0) for s in f.samples}
    named = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"gpu_compete_\w+", t["expr"])}
    assert named and named <= exported, named - exported
