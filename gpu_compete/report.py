"""The run report: what `history.jsonl` says happened, per task, per GPU and in total.

Every ended attempt has a line in the history (successes written by the supervisor, failures
by the daemon), with its queue, GPU, attempt number, start and end, and, where known, its error
type and peak VRAM. Everything here is a pure function of those lines; `gpu-compete report`
reads the file and prints.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from .status import table


@dataclass(frozen=True)
class Attempt:
    uni_id: str
    queue: str | None
    gpu: str | None
    attempt: int | None
    start: float | None  # wall-clock seconds; None when the line does not say
    end: float | None
    state: str  # normal_exit or abnormal_exit
    error_type: str | None = None
    peak_vram_gb: float | None = None
    gave_up: bool = False

    @property
    def duration(self) -> float | None:
        if self.start is None or self.end is None:
            return None
        return max(0.0, self.end - self.start)


def parse_time(text: Any) -> float | None:
    """`2026-11-22T14:03:00` or `2026-11-22T14:03:00.250` (local time, as the history writes it)."""
    if not isinstance(text, str) or len(text) < 19:
        return None
    try:
        whole = time.mktime(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None
    fraction = text[19:]
    if fraction.startswith(".") and fraction[1:].isdigit():
        whole += float("0" + fraction)
    return whole


#: Two lines of one task, attempt number and outcome whose starts (else ends) are this close
#: say the same attempt twice (the daemon and the supervisor both recorded a success: the
#: supervisor's start is a moment later, and to the millisecond). A later run of the task
#: (`--fresh`) starts its attempts again at 1, a run later.
SAME_ATTEMPT_S = 3.0


def attempts(entries: Iterable[dict[str, Any]]) -> list[Attempt]:
    """One Attempt per ended attempt, in the history's order; a line repeated (the daemon and
    the supervisor both recorded a success) counts once, a later run's attempt again."""
    out: list[Attempt] = []
    seen: dict[tuple[str, int | None, str], list[tuple[float | None, float | None]]] = {}
    for e in entries:
        uid = e.get("uni_id")
        if not isinstance(uid, str) or e.get("state") not in ("normal_exit", "abnormal_exit"):
            continue
        number = e.get("attempt") if isinstance(e.get("attempt"), int) else None
        start, end = parse_time(e.get("start")), parse_time(e.get("end"))
        said = seen.setdefault((uid, number, e["state"]), [])
        if any(_same_attempt((start, end), other) for other in said):
            continue
        said.append((start, end))
        gpu = e.get("gpu")
        peak = e.get("peak_vram_gb")
        out.append(Attempt(uid, None if e.get("queue") is None else str(e["queue"]),
                           None if gpu is None else str(gpu), number, start, end, e["state"], e.get("error_type"),
                           float(peak) if isinstance(peak, (int, float)) else None, e.get("gave_up") is True))
    return out


def _same_attempt(a: tuple[float | None, float | None], b: tuple[float | None, float | None]) -> bool:
    for x, y in zip(a, b):  # the starts, else the ends
        if x is not None and y is not None:
            return abs(x - y) <= SAME_ATTEMPT_S
    return True  # nothing to tell them apart by: one attempt said twice


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def _intersect(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Length of (union of xs) ∩ (union of ys)."""
    return union_length(xs) + union_length(ys) - union_length(xs + ys)


def waiting_intervals(atts: list[Attempt], t0: float) -> list[tuple[float, float]]:
    """When some queue had work ready and not started: from the run's first start (for a
    queue's first attempt) or the end of the queue's previous success, to the next start.
    Gaps after a failure are left out: they may be a backoff the user asked for."""
    out = []
    by_queue: dict[str | None, list[Attempt]] = {}
    for a in atts:
        if a.start is not None:
            by_queue.setdefault(a.queue, []).append(a)
    for queue_atts in by_queue.values():
        queue_atts.sort(key=lambda a: a.start)
        ready_since: float | None = t0
        for a in queue_atts:
            if ready_since is not None and a.start > ready_since:
                out.append((ready_since, a.start))
            ready_since = a.end if a.state == "normal_exit" else None
    return out


def build(atts: list[Attempt], gpus: Iterable[str] = ()) -> dict[str, Any]:
    """The report as data: tasks, GPUs and totals (durations in seconds)."""
    timed = [a for a in atts if a.start is not None and a.end is not None]
    t0 = min((a.start for a in timed), default=None)
    t1 = max((a.end for a in timed), default=None)
    makespan = (t1 - t0) if t0 is not None and t1 is not None else 0.0

    tasks: dict[str, dict[str, Any]] = {}
    for a in atts:
        task = tasks.setdefault(a.uni_id, {"uni_id": a.uni_id, "queue": a.queue, "attempts": []})
        row = asdict(a)
        row["duration_s"] = None if a.duration is None else round(a.duration, 3)
        task["attempts"].append(row)
    for task in tasks.values():
        rows = task["attempts"]
        last = rows[-1]
        task["outcome"] = ("completed" if any(r["state"] == "normal_exit" for r in rows)
                           else "failed" if last["gave_up"] else "not completed")
        task["total_s"] = round(sum(r["duration_s"] or 0.0 for r in rows), 3)
        task["gpus"] = sorted({r["gpu"] for r in rows if r["gpu"] is not None})
        task["error_types"] = [r["error_type"] for r in rows if r["error_type"]]
        peaks = [r["peak_vram_gb"] for r in rows if r["peak_vram_gb"] is not None]
        task["peak_vram_gb"] = max(peaks) if peaks else None

    keys = sorted({*gpus, *(a.gpu for a in atts if a.gpu is not None)}, key=gpu_order)
    waiting = waiting_intervals(atts, t0) if t0 is not None else []
    gpu_rows, used, idle_waiting = [], 0.0, 0.0
    for key in keys:
        busy = [(a.start, a.end) for a in timed if a.gpu == key]
        busy_s = union_length(busy)
        idle = [(t0, t1)] if t0 is not None else []
        idle_wait = max(0.0, _intersect(idle, waiting) - _intersect(busy, waiting))
        used += busy_s
        idle_waiting += idle_wait
        gpu_rows.append({"gpu": key, "attempts": len(busy), "busy_s": round(busy_s, 3),
                         "busy_share": round(busy_s / makespan, 4) if makespan else 0.0,
                         "idle_while_waiting_s": round(idle_wait, 3)})
    return {
        "tasks": list(tasks.values()),
        "gpus": gpu_rows,
        "totals": {
            "tasks": len(tasks), "attempts": len(atts),
            "completed": sum(t["outcome"] == "completed" for t in tasks.values()),
            "failed": sum(t["outcome"] == "failed" for t in tasks.values()),
            "failed_attempts": sum(a.state == "abnormal_exit" for a in atts),
            "start": _iso(t0), "end": _iso(t1), "makespan_s": round(makespan, 3),
            "gpu_hours_used": round(used / 3600, 4),
            "gpu_hours_idle_while_waiting": round(idle_waiting / 3600, 4),
        },
    }


def gpu_order(key: str) -> tuple[int, str]:
    head = key.split(":")[0]
    return (int(head) if head.isdigit() else 1 << 30, key)


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def render(report: dict[str, Any]) -> str:
    t = report["totals"]
    if not t["attempts"]:
        return "no attempts in the history yet"
    lines = [f"{t['tasks']} tasks, {t['attempts']} attempts ({t['failed_attempts']} failed): "
             f"{t['completed']} completed, {t['failed']} failed for good",
             f"from {t['start']} to {t['end']}: makespan {duration_text(t['makespan_s'])}, "
             f"{t['gpu_hours_used']:.2f} GPU-hours used, "
             f"{t['gpu_hours_idle_while_waiting']:.2f} GPU-hours idle while work waited", ""]
    rows = []
    for task in report["tasks"]:
        peak = task["peak_vram_gb"]
        rows.append([task["uni_id"], task["queue"], task["outcome"], len(task["attempts"]),
                     duration_text(task["total_s"]), ",".join(task["gpus"]) or None,
                     ",".join(task["error_types"]) or None, None if peak is None else f"{peak:g}"])
    lines += table(["UNI_ID", "QUEUE", "OUTCOME", "ATTEMPTS", "TIME", "GPUS", "ERRORS", "PEAK GB"], rows)
    lines.append("")
    lines += table(["GPU", "ATTEMPTS", "BUSY", "BUSY SHARE", "IDLE WHILE WAITING"],
                   [[g["gpu"], g["attempts"], duration_text(g["busy_s"]), f"{g['busy_share'] * 100:.0f}%",
                     duration_text(g["idle_while_waiting_s"])] for g in report["gpus"]])
    return "\n".join(lines)
