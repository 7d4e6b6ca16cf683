"""What each running task really holds on its GPUs, from the snapshots the daemon already takes.

No polling of its own: `sample()` reads the NVML snapshot of the round. A process on a GPU
belongs to a task when it is the task's supervisor or worker or descends from one (its whole
process tree, so DDP ranks and helper processes count); each pid is attributed once and
remembered while it stays listed.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from .gpus.base import GpuSnapshot

_UNSEEN = object()


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
