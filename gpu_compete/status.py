"""Status as data (`build`, the content of `status.json`) and as text (`render`).

`render` is a pure function of the view, so the daemon's periodic print, SIGUSR1 and
`gpu-compete status` from another terminal all show the same thing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Collection, Mapping, Sequence

from . import atomic, procs
from .policy import GpuView, Placement, after_state, build_views, candidates, fits, head, lease_active, queue_status
from .tasks import GIB, TaskState

if TYPE_CHECKING:  # pragma: no cover
    from .daemon import Daemon
    from .gpus.base import GpuSnapshot
    from .tasks import Queue


@dataclass(frozen=True)
class Scene:
    """What a status view is built from, taken once a round by whoever runs the queues (the
    single-machine daemon, the --ray coordinator): `build` reads this, never their objects."""

    wall: float
    exclusive: bool
    settle: float
    user: str
    queues: Mapping[str, "Queue"]  # the tasks as they stand this round
    snapshots: Sequence["GpuSnapshot"]
    ghosts: Collection[int] = ()  # pids of ended tasks not counted (one machine's)
    draining: bool = False
    forcing: bool = False
    guard_why: str | None = None
    guard_since: str | None = None
    waiting_why: Mapping[str, str] = field(default_factory=dict)

    @property
    def tasks(self) -> dict[str, Any]:
        return {t.uni_id: t for q in self.queues.values() for t in q}


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


def build(scene: Scene, now: float, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    wall = scene.wall
    exclusive = scene.exclusive
    tasks = scene.tasks
    running = [t for t in tasks.values() if t.state is TaskState.RUNNING]
    placements = [Placement(key, t.need_bytes, lease_active(t, now, scene.settle))
                  for t in running for key in t.gpu_keys]  # as daemon.placements(), without a second scan
    views = build_views(scene.snapshots, placements, scene.user, ignored=scene.ghosts)
    waits = Waits(views, exclusive, scene.draining or scene.forcing)
    due = {c.uni_id for c in candidates(scene.queues, now)}
    totals = dict.fromkeys(("pending", "running", "retrying", "backing_off", "completed", "failed", "blocked",
                            "skipped"), 0)
    queues, backing_off = [], []
    for name, queue in scene.queues.items():
        qstatus = queue_status(queue, scene.queues)
        counts = dict.fromkeys(totals, 0)
        for task in queue:
            if task.state is TaskState.PENDING:
                counts["blocked" if qstatus == "BLOCKED" else "pending"] += 1
            elif task.state is TaskState.RETRY:
                counts["backing_off" if task.retry_at > now + 1e-9 else "retrying"] += 1
            else:
                counts[task.state.value] += 1
        for state, n in counts.items():
            totals[state] += n
        current = head(queue)
        on_gpu = current is not None and current.state is TaskState.RUNNING
        retry_in = _retry_in(current, now)
        entry = {
            "queue": name, "status": qstatus, "done": sum(t.state is TaskState.COMPLETED for t in queue),
            "total": len(queue), "current": current.uni_id if current else None,
            "current_state": current.state.value if current else None,
            "gpu": current.gpu if on_gpu else None, "retry_in_s": retry_in,
            "gpus": list(current.gpus) if on_gpu and current.gpus else None,
            **_vram(current),
            "error_type": current.error_type if current else None,
            "why": _why_waiting(scene, current, qstatus),
            "attempt": current.retry_count + 1 if current else None,
            "adopted": bool(current and current.adopted),
            "elapsed_s": _elapsed(current, records, now, wall) if on_gpu else None,
            "counts": {k: n for k, n in counts.items() if n},  # only states it has: status.json stays small
        }
        if current is not None and not on_gpu and current.state is not TaskState.FAILED:
            if current.uni_id not in due and retry_in is not None:
                entry["why"] = entry["why"] or f"backing off after {current.error_type or 'a failure'}"
                backing_off.append({"uni_id": current.uni_id, "queue": name, "retry_in_s": retry_in,
                                    "retry_count": current.retry_count, "error_type": current.error_type})
            elif current.uni_id in due and (entry["why"] is None or entry["why"].startswith("waiting for a GPU")):
                # The planner's own reasons ("needs N GB; the largest GPU has M", "stopped; ...")
                # stay; its generic one gives way to what is short now.
                entry["why"] = waits.why(current.need_bytes)
        queues.append(entry)
    waiting_vram = [tasks[u].need_bytes for u in due if tasks[u].state is not TaskState.RUNNING]
    gpus = []
    for snap in scene.snapshots:
        here = [t for t in running if snap.key in t.gpu_keys]
        mine = snap.user_processes(scene.user)
        others = [p for p in snap.processes if p.user != scene.user]
        gpus.append({
            "index": snap.index, "key": snap.key, "name": snap.name, "available": snap.available, "error": snap.error,
            "free_bytes": snap.free_bytes, "total_bytes": snap.total_bytes, "utilization": snap.utilization,
            "ours_bytes": sum(p.used_bytes or 0 for p in mine),
            "others_bytes": sum(p.used_bytes or 0 for p in others),
            "others": [{"pid": p.pid, "user": p.user, "used_bytes": p.used_bytes} for p in others[:8]],
            "user_pids": [p.pid for p in mine],
            "running": [t.uni_id for t in here],
            "leased": [t.uni_id for t in here if lease_active(t, now, scene.settle)],
        })
    view = {
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(wall)), "updated_epoch": round(wall, 3),
        "daemon": {"pid": os.getpid(), "draining": scene.draining,
                   "mode": "exclusive" if exclusive else "shared"},
        "host_guard": None if scene.guard_why is None else {"why": scene.guard_why, "since": scene.guard_since},
        "totals": totals, "queues": queues, "gpus": gpus, "backing_off": backing_off,
        "gpus_free_for_waiting": waits.able(waiting_vram),
        "registry": records_view({u: r for u, r in records.items() if u in tasks}),
        "other_records": sum(1 for u in records if u not in tasks),
        "task_ids": sorted(tasks),
    }
    return view


def _elapsed(task: Any, records: dict[str, dict[str, Any]], now: float, wall: float) -> float | None:
    """Seconds since the running attempt started: the registry's start time (right for an
    adopted task too), else our launch time."""
    from .report import parse_time

    started = parse_time((records.get(task.uni_id) or {}).get("started_at"))
    if started is not None:
        return round(max(0.0, wall - started), 1)
    return None if task.launched_at is None else round(max(0.0, now - task.launched_at), 1)


class Waits:
    """Why a head that may start waits, in O(GPUs) once plus O(1) a head."""

    def __init__(self, views: list[GpuView], exclusive: bool, draining: bool):
        self.views, self.exclusive, self.draining = views, exclusive, draining
        usable = [v for v in views if v.available]
        self.any_gpu = bool(usable)
        self.most_free = max((v.free_bytes for v in usable if v.free_bytes is not None), default=None)
        own = [v for v in usable if fits(v, 0, exclusive)]
        self.most_free_own = max((v.free_bytes for v in own if v.free_bytes is not None), default=None)

    def why(self, vram_bytes: int) -> str:
        if self.draining:
            return "draining: nothing new starts"
        if not self.any_gpu:
            return "no GPU available"
        need = f"{vram_bytes / GIB:g} GB"
        if self.most_free is None or vram_bytes > self.most_free:
            return f"needs {need} (most free: {gb(self.most_free)} GB)"
        if self.most_free_own is None or vram_bytes > self.most_free_own:
            return f"needs {need} on a GPU running nothing (exclusive)" if self.exclusive else f"needs {need}"
        return "starts next round"

    def able(self, waiting_vram: list[int]) -> list[str]:
        """GPUs that could take one of the waiting heads now."""
        if self.draining or not waiting_vram:
            return []
        smallest = min(waiting_vram)
        return [v.key for v in self.views if fits(v, smallest, self.exclusive)]


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


def _why_waiting(scene: Scene, task: Any, qstatus: str) -> str | None:
    """A plain reason why a queue's head is not running, where there is one to give."""
    if task is None or task.state is TaskState.RUNNING or task.state is TaskState.COMPLETED:
        return None
    if task.state is TaskState.FAILED:
        return f"failed for good ({task.error_type or 'unknown'}); its queue is blocked"
    if task.state is TaskState.PENDING and task.spec.after:
        state, why = after_state(task, scene.queues)
        if state != "ready":
            return why
    if task.state is TaskState.RETRY and task.error_type == "stopped":
        return "stopped; runs on restart" if scene.draining or scene.forcing else "stopped; runs again now"
    return scene.waiting_why.get(task.uni_id)


def render_dry_run(daemon: "Daemon", views: list[GpuView], plan: dict[str, str],
                   expand_as: dict[str, str] | None = None) -> str:
    """What `run --dry-run` prints: eligible GPUs, then every queue with where its head would go.
    `expand_as`: what {available_gpu} becomes where it is not the GPU's name (a node's local
    index, with --ray)."""
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
            gpu = (expand_as or {}).get(task.uni_id, where)
            lines += [f"      $ {c}" for c in task.spec.expanded(str(daemon.config.work_dir), gpu)]
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


def _steering_lines(steer: dict[str, Any] | None) -> list[str]:
    """Paused queues, the command file's state and the last reload, where there is any."""
    if not steer:
        return []
    lines = []
    if steer.get("commands_error"):
        lines.append(f"command file NOT applied (the last good one stays in force): {steer['commands_error']}")
    if steer.get("paused_all"):
        lines.append("paused: nothing new starts (`gpu-compete resume` to go on)")
    elif steer.get("paused"):
        lines.append(f"paused queues: {', '.join(steer['paused'])}")
    if steer.get("last_reload"):
        lines.append(f"last reload: {steer['last_reload']}")
    if steer.get("running_out"):
        lines.append(f"no longer in the file, running to their end: {', '.join(steer['running_out'])}")
    if steer.get("follow"):
        lines.append("following the command file: waiting for more tasks when all are done")
    if steer.get("control"):
        lines.append(f"no steering: {steer['control']}")
    return lines


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
                     f"{t['blocked']} blocked" + (f", {t['skipped']} skipped" if t.get("skipped") else ""))
        lines += _steering_lines(view.get("steering"))
        lines.append("")
        guard = view.get("host_guard")
        if guard:
            lines.append(f"host guard holds every queue since {guard['since']}: {guard['why']}")
        for node, held in (view.get("cluster") or {}).get("host_guards", {}).items():
            lines.append(f"host guard holds node {node} since {held.get('since')}: {held.get('why')}")
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
