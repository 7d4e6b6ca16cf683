"""`--metrics-port`: Prometheus metrics, served by a process of their own.

Why a process and not a thread or the daemon's loop: the daemon forks task supervisors and
must stay single-threaded (a fork beside another thread can copy a lock that thread holds),
and an HTTP exchange inside its loop would let a slow scraper delay a round. So the daemon
binds the port itself (a port in use is an error at start, exit 2), then hands the listening
socket to `python -m gpu_compete.metrics`, which serves it with prometheus_client. The server
reads the view the daemon writes every round (`status.json`) and the lines appended to
`history.jsonl`, so it never asks the daemon anything; it exits when the daemon stops it, or
by itself within a second of the daemon's death.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

DURATION_BUCKETS = (10, 30, 60, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, float("inf"))


class MetricsError(Exception):
    """The metrics port can't be used (in use, no permission, bad host)."""


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a port in use is reported before anything runs."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, IndexError) as exc:
        raise MetricsError(f"cannot serve metrics on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart within TIME_WAIT
        sock.bind(address)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        why = "the port is in use" if exc.errno == 98 else (exc.strerror or str(exc))
        raise MetricsError(f"cannot serve metrics on {host}:{port}: {why} (choose another --metrics-port)") from None
    return sock


class Server:
    """The metrics process, seen from the daemon: started on a bound socket, stopped at the end."""

    def __init__(self, sock: socket.socket, state_dir: Path):
        self.address = sock.getsockname()[:2]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_compete.metrics", "--fd", str(sock.fileno()), "--state-dir", str(state_dir),
             "--parent", str(os.getpid())],
            pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True)
        sock.close()  # the child has its copy; ours would only keep the port open after it ends

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # our child, not reaped: its pid can't belong to anyone else
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- what is exposed: pure functions of the view and the history's lines ---------------------

class HistoryCounts:
    """Failures by error type and attempt durations, from history lines seen since the start."""

    def __init__(self) -> None:
        self.failures: dict[str, int] = {}
        self.durations: dict[str, list[float]] = {"completed": [], "failed": []}

    def add(self, entries: list[dict[str, Any]]) -> None:
        from .report import parse_time

        for e in entries:
            state = e.get("state")
            if state not in ("normal_exit", "abnormal_exit"):
                continue
            if state == "abnormal_exit":
                kind = str(e.get("error_type") or "unknown")
                self.failures[kind] = self.failures.get(kind, 0) + 1
            start, end = parse_time(e.get("start")), parse_time(e.get("end"))
            if start is not None and end is not None:
                self.durations["completed" if state == "normal_exit" else "failed"].append(max(0.0, end - start))


def families(view: dict[str, Any] | None, counts: HistoryCounts, now: float) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    up = GaugeMetricFamily("gpu_compete_status_age_seconds", "Seconds since the daemon last wrote its view")
    if view is not None and isinstance(view.get("updated_epoch"), (int, float)):
        up.add_metric([], max(0.0, now - view["updated_epoch"]))
    yield up
    view = view or {}
    tasks = GaugeMetricFamily("gpu_compete_tasks", "Tasks by state", labels=["state"])
    for state, n in sorted((view.get("totals") or {}).items()):
        tasks.add_metric([state], n)
    yield tasks
    queue = GaugeMetricFamily("gpu_compete_queue_tasks", "Tasks of each queue by state", labels=["queue", "state"])
    for q in view.get("queues", ()):
        for state, n in sorted((q.get("counts") or {}).items()):
            queue.add_metric([str(q["queue"]), state], n)
    yield queue
    free = GaugeMetricFamily("gpu_compete_gpu_memory_free_bytes", "Free memory of each GPU", labels=["gpu"])
    total = GaugeMetricFamily("gpu_compete_gpu_memory_total_bytes", "Total memory of each GPU", labels=["gpu"])
    ours = GaugeMetricFamily("gpu_compete_gpu_memory_ours_bytes", "Memory your processes use on each GPU",
                             labels=["gpu"])
    others = GaugeMetricFamily("gpu_compete_gpu_memory_others_bytes", "Memory other users' processes use",
                               labels=["gpu"])
    running = GaugeMetricFamily("gpu_compete_gpu_tasks", "Tasks of gpu-compete running on each GPU", labels=["gpu"])
    for g in view.get("gpus", ()):
        key = str(g.get("key", g.get("index")))
        for family, value in ((free, g.get("free_bytes")), (total, g.get("total_bytes")),
                              (ours, g.get("ours_bytes")), (others, g.get("others_bytes"))):
            if isinstance(value, (int, float)):
                family.add_metric([key], value)
        running.add_metric([key], len(g.get("running", ())))
    yield from (free, total, ours, others, running)
    failures = CounterMetricFamily("gpu_compete_task_failures", "Failed attempts by error type", labels=["error_type"])
    for kind, n in sorted(counts.failures.items()):
        failures.add_metric([kind], n)
    yield failures
    hist = HistogramMetricFamily("gpu_compete_task_duration_seconds", "Duration of ended attempts",
                                 labels=["outcome"])
    for outcome, values in counts.durations.items():
        buckets = [(_le(b), sum(v <= b for v in values)) for b in DURATION_BUCKETS]
        hist.add_metric([outcome], buckets, sum_value=sum(values))
    yield hist
    idle = CounterMetricFamily("gpu_compete_gpu_idle_while_waiting_seconds",
                               "GPU-seconds a GPU that could take waiting work sat idle")
    idle.add_metric([], float(view.get("idle_while_waiting_gpu_seconds") or 0.0))
    yield idle


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:g}"


class _Collector:
    def __init__(self, state_dir: Path):
        from . import journal

        self.status = state_dir / "status.json"
        self.tail = journal.Tail(state_dir / "history.jsonl")
        self.tail.new_entries()  # counters start with this daemon
        self.counts = HistoryCounts()

    def collect(self) -> Iterator[Any]:
        self.counts.add(self.tail.new_entries())
        try:
            view = json.loads(self.status.read_text())
        except (OSError, ValueError):
            view = None
        return families(view if isinstance(view, dict) else None, self.counts, time.time())


def main(argv: list[str] | None = None) -> int:
    """The metrics process: serve the inherited socket until stopped or the daemon is gone."""
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    from prometheus_client import CollectorRegistry, make_wsgi_app

    parser = argparse.ArgumentParser(prog="gpu_compete.metrics")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(Path(args.state_dir)))  # type: ignore[arg-type]

    class Quiet(WSGIRequestHandler):
        timeout = 5  # a client that stalls can hold us 5 s at most

        def log_message(self, *_args: Any) -> None:
            pass

    server = WSGIServer(sock.getsockname()[:2], Quiet, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_name, server.server_port = str(sock.getsockname()[0]), sock.getsockname()[1]
    server.setup_environ()
    server.set_app(make_wsgi_app(registry))
    server.timeout = 1.0
    while os.getppid() == args.parent:
        server.handle_request()
    return 0


if __name__ == "__main__":
    sys.exit(main())
