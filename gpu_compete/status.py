"""Status as data (`build`, the content of `status.json`) and as text (`render`).

`render` is a pure function of the view, so the daemon's periodic print, SIGUSR1 and
`gpu-compete status` from another terminal all show the same thing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import atomic, procs
from .policy import GpuView, after_state, fits, head, lease_active, queue_status
from .tasks import GIB, TaskState

if TYPE_CHECKING:  # pragma: no cover
    from .daemon import Daemon


def records_view(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Registry records with whether their pid is alive (dead, or reused by another process)."""
    rows = []
    for uid, record in sorted(records.items()):
        state = record.get("state")
        alive = procs.liveness(record.get("pid"), record.get("create_time"))
        rows.append({"uni_id": uid, "state": state, "pid": record.get("pid"), "retry_count": record.get("retry_count"),
                     "error_type": record.get("error_type"), "alive": alive, "gpu": record.get("gpu"),
                     "retry_at": record.get("retry_at")})
    return rows


def build(daemon: "Daemon", now: float, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    totals = dict.fromkeys(("pending", "running", "retrying", "backing_off", "completed", "failed", "blocked"), 0)
    queues = []
    for name, queue in daemon.queues.items():
        qstatus = queue_status(queue, daemon.queues)
        for task in queue:
            if task.state is TaskState.PENDING:
                totals["blocked" if qstatus == "BLOCKED" else "pending"] += 1
            elif task.state is TaskState.RETRY:
                totals["backing_off" if task.retry_at > now + 1e-9 else "retrying"] += 1
            else:
                totals[task.state.value] += 1
        current = head(queue)
        queues.append({
            "queue": name, "status": qstatus, "done": sum(t.state is TaskState.COMPLETED for t in queue),
            "total": len(queue), "current": current.uni_id if current else None,
            "current_state": current.state.value if current else None,
            "gpu": current.gpu if current and current.state is TaskState.RUNNING else None,
            "gpus": list(current.gpus) if current and current.gpus and current.state is TaskState.RUNNING else None,
            **_vram(current),
            "retry_in_s": _retry_in(current, now),
            "error_type": current.error_type if current else None,
            "why": _why_waiting(daemon, current, qstatus),
        })
    running = [t for t in daemon.tasks.values() if t.state is TaskState.RUNNING]
    gpus = []
    for snap in daemon.snapshots:
        here = [t for t in running if snap.key in t.gpu_keys]
        gpus.append({
            "index": snap.index, "key": snap.key, "name": snap.name, "available": snap.available, "error": snap.error,
            "free_bytes": snap.free_bytes, "total_bytes": snap.total_bytes,
            "user_pids": [p.pid for p in snap.user_processes(daemon.user)],
            "running": [t.uni_id for t in here],
            "leased": [t.uni_id for t in here if lease_active(t, now, daemon.config.settle)],
        })
    return {
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(daemon.wall())),
        "daemon": {"pid": os.getpid(), "draining": daemon.draining,
                   "mode": "exclusive" if daemon.config.exclusive else "shared"},
        "host_guard": None if daemon.guard.why is None else {"why": daemon.guard.why, "since": daemon.guard.since},
        "totals": totals, "queues": queues, "gpus": gpus,
        "registry": records_view({u: r for u, r in records.items() if u in daemon.tasks}),
        "other_records": sum(1 for u in records if u not in daemon.tasks),
        "task_ids": sorted(daemon.tasks),
    }


def _vram(task: Any) -> dict[str, Any]:
    """Declared VRAM beside what the current attempt used at its peak, and the raised need
    after an oom."""
    if task is None:
        return {"vram_gb": None, "peak_vram_gb": None, "vram_gb_needed": None}
    peak = None if task.peak_vram_bytes is None else round(task.peak_vram_bytes / GIB, 2)
    return {"vram_gb": task.spec.vram_gb, "peak_vram_gb": peak, "vram_gb_needed": task.vram_gb_needed}


def _retry_in(task: Any, now: float) -> float | None:
    """Seconds until a failed task runs again; None when it is not waiting for a time (a task
    ended by `stop --kill` runs again as soon as a daemon runs)."""
    if task is None or task.state is not TaskState.RETRY or task.retry_at <= now:
        return None
    return round(task.retry_at - now, 1)


def _why_waiting(daemon: "Daemon", task: Any, qstatus: str) -> str | None:
    """A plain reason why a queue's head is not running, where there is one to give."""
    if task is None or task.state is TaskState.RUNNING or task.state is TaskState.COMPLETED:
        return None
    if task.state is TaskState.FAILED:
        return f"failed for good ({task.error_type or 'unknown'}); its queue is blocked"
    if task.state is TaskState.PENDING and task.spec.after:
        state, why = after_state(task, daemon.queues)
        if state != "ready":
            return why
    if task.state is TaskState.RETRY and task.error_type == "stopped":
        return "stopped; runs on restart" if daemon.draining or daemon.force else "stopped; runs again now"
    return daemon.waiting_why.get(task.uni_id)


def render_dry_run(daemon: "Daemon", views: list[GpuView], plan: dict[str, int]) -> str:
    """What `run --dry-run` prints: eligible GPUs, then every queue with where its head would go."""
    exclusive = daemon.config.exclusive
    lines = [f"dry run: {len(daemon.tasks)} tasks in {len(daemon.queues)} queues, "
             f"{'exclusive' if exclusive else 'shared'} mode; nothing is launched"]
    for v in views:
        eligible = any(fits(v, t.spec.vram_bytes, exclusive) for t in daemon.tasks.values())
        lines.append(f"  GPU {v.key}: free {gb(v.free_bytes)} GB, {'eligible' if eligible else 'not eligible'} now"
                     + ("" if v.available else " (unavailable)") + (", has your processes" if v.user_busy else ""))
    for name, queue in daemon.queues.items():
        lines.append(f"queue {name}:")
        for task in queue:
            where = plan.get(task.uni_id)
            tag = task.state.value if where is None else f"would start on GPU {where}"
            lines.append(f"  {task.uni_id}  {task.spec.vram_gb:g} GB  [{tag}]")
            lines += [f"      $ {c}" for c in task.spec.expanded(str(daemon.config.work_dir), where)]
    return "\n".join(lines)


def write_json(path: Path, view: dict[str, Any]) -> None:
    """Atomically, so `gpu-compete status` never reads half a file."""
    atomic.write(path, json.dumps(view, separators=(",", ":")).encode(), durable=False)  # C encoder


def gb(value: Any) -> str:
    return "?" if not isinstance(value, (int, float)) else f"{value / GIB:.1f}"


def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip()] + [fmt.format(*r).rstrip() for r in cells]


def _decl_used(q: dict[str, Any]) -> str | None:
    """`8/14.2` (declared/peak used), `8/-` before a peak is seen, `8/-, needs 17.8` after an oom."""
    if q.get("vram_gb") is None:
        return None
    used = "-" if q.get("peak_vram_gb") is None else f"{q['peak_vram_gb']:g}"
    text = f"{q['vram_gb']:g}/{used}"
    if q.get("vram_gb_needed"):
        text += f", needs {q['vram_gb_needed']:g}"
    return text


def render_records(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "registry: no records"
    lines = [f"registry ({len(rows)} records)"]
    lines += table(["UNI_ID", "STATE", "PID", "ALIVE", "RETRIES", "ERROR", "GPU"],
                    [[r["uni_id"], r["state"], r["pid"], r["alive"], r["retry_count"], r["error_type"], r["gpu"]]
                     for r in rows])
    return "\n".join(lines)


def render(view: dict[str, Any]) -> str:
    lines = []
    if "totals" in view:
        t = view["totals"]
        daemon = view.get("daemon", {})
        lines.append(f"gpu-compete status at {view.get('updated_at', '?')} ({daemon.get('mode', '?')} mode"
                     f"{', draining' if daemon.get('draining') else ''})")
        lines.append(f"tasks: {t['pending']} pending, {t['running']} running, {t['retrying']} retrying, "
                     f"{t['backing_off']} backing off, {t['completed']} completed, {t['failed']} failed, "
                     f"{t['blocked']} blocked")
        lines.append("")
        guard = view.get("host_guard")
        if guard:
            lines.append(f"host guard holds every queue since {guard['since']}: {guard['why']}")
        lines += table(["QUEUE", "STATUS", "DONE", "CURRENT", "STATE", "GPU", "VRAM GB DECL/USED", "WHY WAITING"],
                        [[q["queue"], q["status"], f"{q['done']}/{q['total']}", q["current"],
                          q["current_state"] + (f" (in {q['retry_in_s']}s)" if q.get("retry_in_s") else "")
                          if q["current_state"] else None, ",".join(map(str, q.get("gpus") or [])) or q["gpu"],
                          _decl_used(q), q.get("why")] for q in view["queues"]])
        lines.append("")
        lines += table(["GPU", "NAME", "FREE/TOTAL GB", "MY PIDS", "LEASED", "RUNNING"],
                        [[g.get("key", g["index"]), g["name"] if g["available"] else f"UNAVAILABLE: {g['error']}",
                          f"{gb(g['free_bytes'])}/{gb(g['total_bytes'])}",
                          ",".join(map(str, g["user_pids"])) or None, ",".join(g["leased"]) or None,
                          ",".join(g["running"]) or None] for g in view["gpus"]])
        lines.append("")
    lines.append(render_records(view.get("registry", [])))
    if view.get("other_records"):
        lines.append(f"({view['other_records']} other records in the registry: not this daemon's tasks; "
                     "--all-records shows them)")
    return "\n".join(lines)
