"""What each running task really holds on its GPUs, from the snapshots the daemon already takes.

No polling of its own: `sample()` reads the NVML snapshot of the round. A process on a GPU
belongs to a task when it is the task's supervisor or worker or descends from one (its whole
process tree, so DDP ranks and helper processes count); each pid is attributed once and
remembered while it stays listed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import structlog

from .gpus.base import GpuSnapshot, key_from_record, key_to_record
from .policy import vram_after_oom, why_unplaceable
from .tasks import GIB, Task

log = structlog.get_logger("gpu_compete")

_UNSEEN = object()
# A task's peak VRAM is written to its record when it has grown by this much since the last write.
PEAK_STEP_BYTES = GIB // 10


class VramWatch:
    def __init__(self, descends: Callable[[int, set[int]], bool], user: str):
        self.descends = descends
        self.user = user
        self.owner: dict[int, str | None] = {}  # pid on a GPU -> uni_id of a running task, or None

    def sample(self, snapshots: Iterable[GpuSnapshot],
               tasks: Mapping[str, tuple[tuple[str, ...], set[int]]]) -> dict[str, dict[str, int]]:
        """{uni_id: {gpu key: bytes its processes hold there now}} for `tasks`, given as
        {uni_id: (its GPU keys, its root pids)}. A GPU whose driver does not report a
        process's memory adds nothing for it."""
        by_gpu: dict[str, list[str]] = {}
        for uid, (gpus, _) in tasks.items():
            for key in gpus:
                by_gpu.setdefault(key, []).append(uid)
        used: dict[str, dict[str, int]] = {}
        listed = set()
        for snap in snapshots:
            here = by_gpu.get(snap.key)
            for proc in snap.processes:
                listed.add(proc.pid)
                if not here or proc.user != self.user:
                    continue
                owner = self.owner.get(proc.pid, _UNSEEN)
                if owner is _UNSEEN or (owner is not None and owner not in tasks):
                    owner = next((uid for uid in here if self.descends(proc.pid, tasks[uid][1])), None)
                    self.owner[proc.pid] = owner
                if owner in tasks and snap.key in tasks[owner][0] and proc.used_bytes:
                    per = used.setdefault(owner, {})
                    per[snap.key] = per.get(snap.key, 0) + proc.used_bytes
        self.owner = {pid: o for pid, o in self.owner.items() if pid in listed}
        return used


def update_peaks(watch: VramWatch, snapshots: list[GpuSnapshot], running: Mapping[str, tuple[Task, set[int]]],
                 shared: bool) -> dict[str, dict[str, Any]]:
    """Sample the round's snapshot for the running tasks ({uni_id: (task, root pids)}): keep
    each one's peak, warn once of a task using more than it declared, and return the record
    fields to write for peaks that grew by PEAK_STEP_BYTES since last written."""
    used_now = watch.sample(snapshots, {uid: (t.gpu_keys, roots) for uid, (t, roots) in running.items()})
    grown = {}
    for uid, per_gpu in used_now.items():
        fields = note_usage(running[uid][0], per_gpu, shared)
        if fields:
            grown[uid] = fields
    return grown


def note_usage(task: Task, per_gpu: Mapping[str, int], shared: bool) -> dict[str, Any] | None:
    """What a task holds now on each of its GPUs ({key: bytes}, from `VramWatch.sample`, here
    or on a node's agent): keep its peak, warn once of more than it declared, and return the
    record fields to write when the peak grew by PEAK_STEP_BYTES since last written."""
    if not per_gpu:
        return None
    key, used = max(per_gpu.items(), key=lambda kv: kv[1])
    if task.peak_vram_bytes is not None and used <= task.peak_vram_bytes:
        return None
    task.peak_vram_bytes, task.peak_gpu = used, key
    if used > task.spec.vram_bytes and not task.warned_over:
        task.warned_over = True
        log.warning(f"{task.uni_id} declared {task.spec.vram_gb:g} GB and uses {used / GIB:.1f} GB on GPU {key}"
                    + (" (other tasks were promised that memory)" if shared else ""), uni_id=task.uni_id)
    fields = peak_to_write(used, task.peak_written, key)
    if fields:
        task.peak_written = used
    return fields


def peak_to_write(peak: int, written: int, key: str) -> dict[str, Any] | None:
    """The record fields for a peak (seen on GPU `key`) once it has grown by PEAK_STEP_BYTES
    since it was last written; None until then. The daemon's rule and every node agent's."""
    if peak - written < PEAK_STEP_BYTES:
        return None
    return {"peak_vram_gb": round(peak / GIB, 2), "peak_gpu": key_to_record(key)}


def usage_fields(task: Task) -> dict[str, Any]:
    """What a history line and a final record say of an attempt's GPUs and memory."""
    out: dict[str, Any] = {"peak_vram_gb": None if task.peak_vram_bytes is None
                           else round(task.peak_vram_bytes / GIB, 2)}
    if task.gpus:
        out["gpus"] = [key_to_record(k) for k in task.gpus]
    return out


def learn_from_oom(task: Task, growth: float, snapshots: list[GpuSnapshot]) -> float:
    """An oom raises what the next attempt asks for: max(declared, peak x growth); said in
    the log, plainly when it now fits no GPU in scope. Returns the new need in GB."""
    peak = None if task.peak_vram_bytes is None else task.peak_vram_bytes / GIB
    task.vram_gb_needed = vram_after_oom(task.spec.vram_gb, task.vram_gb_needed, peak, growth)
    cap_need(task, snapshots)
    need = task.vram_gb_needed
    totals = [s.total_bytes for s in snapshots if s.available and s.total_bytes]
    never = why_unplaceable(task.need_bytes, task.spec.gpus, totals) if totals else None
    log.warning(f"{task.uni_id} ran out of memory: the next attempt needs {need:g} GB"
                + (f", and fits no GPU: {never}" if never else ""), uni_id=task.uni_id,
                declared_gb=task.spec.vram_gb, peak_gb=None if peak is None else round(peak, 2))
    return need


def cap_need(task: Task, snapshots: list[GpuSnapshot]) -> bool:
    """A need raised past the largest GPU in scope comes back down to it: grown past every GPU
    a task that fitted could never run again and its queue would wait forever. Called when
    the need is raised and before each round's planning (a need raised, or restored from the
    registry, while no snapshot was at hand)."""
    if task.vram_gb_needed is None:
        return False
    totals = [s.total_bytes for s in snapshots if s.available and s.total_bytes]
    if not totals:
        return False
    largest = math.floor(max(totals) / GIB * 100) / 100  # rounded down, so it fits exactly
    if task.spec.vram_gb <= largest < task.vram_gb_needed:
        log.warning(f"{task.uni_id}: the raised need ({task.vram_gb_needed:g} GB) is more than the largest "
                    f"GPU has; asking for the largest ({largest:g} GB) instead", uni_id=task.uni_id)
        task.vram_gb_needed = largest
        return True
    return False


def restore(task: Task, record: dict[str, Any], fresh: bool) -> None:
    """What an earlier daemon learned of a task: its GPUs, its raised need after an oom, the
    current attempt's peak."""
    gpus = record.get("gpus")
    if isinstance(gpus, list):
        keys = tuple(k for k in (key_from_record(g) for g in gpus) if k is not None)
        task.gpus = keys if len(keys) > 1 else ()
    needed = record.get("vram_gb_needed")
    if not fresh and _number(needed) and needed > 0:
        task.vram_gb_needed = float(needed)
    peak = record.get("peak_vram_gb")
    if _number(peak) and peak >= 0:
        task.peak_vram_bytes = task.peak_written = int(peak * GIB)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
