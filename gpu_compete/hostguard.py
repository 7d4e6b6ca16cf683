"""Host guards: no task starts while the machine is short of free RAM or disk.

`--min-free-ram GB` (available memory, as the kernel estimates it: free plus reclaimable
cache) and `--min-free-disk GB` (free space on the work directory's filesystem, for the
user). `holding()` is pure; `read()` is the one place that asks the host.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

from .tasks import GIB


@dataclass(frozen=True)
class HostGuard:
    min_free_ram_gb: float | None = None
    min_free_disk_gb: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.min_free_ram_gb) or bool(self.min_free_disk_gb)

    def holding(self, free_ram: int | None, free_disk: int | None) -> str | None:
        """Why nothing may start now, or None. An unreadable value holds nothing: a guard
        that can't see must not stop every queue forever."""
        held = []
        if self.min_free_ram_gb and free_ram is not None and free_ram < self.min_free_ram_gb * GIB:
            held.append(f"free RAM {free_ram / GIB:.1f} GB < --min-free-ram {self.min_free_ram_gb:.12g} GB")
        if self.min_free_disk_gb and free_disk is not None and free_disk < self.min_free_disk_gb * GIB:
            held.append(f"free disk {free_disk / GIB:.1f} GB < --min-free-disk {self.min_free_disk_gb:.12g} GB")
        return "; ".join(held) or None


def read(work_dir: Path) -> tuple[int | None, int | None]:
    """(available RAM, free disk under work_dir) in bytes; None where it can't be read."""
    try:
        ram = int(psutil.virtual_memory().available)
    except (OSError, psutil.Error):  # pragma: no cover - /proc unreadable
        ram = None
    try:
        disk = int(shutil.disk_usage(work_dir).free)
    except OSError:
        disk = None
    return ram, disk


class GuardWatch:
    """Whether the guards hold now, and since when (for status)."""

    def __init__(self, guard: HostGuard, work_dir: Path, now_iso: Callable[[], str]):
        self.guard, self.work_dir, self.now_iso = guard, work_dir, now_iso
        self.why: str | None = None
        self.since: str | None = None

    def check(self) -> str | None:
        """Why nothing may start this round, or None; the host is read only with a guard set."""
        if not self.guard.active:
            return None
        why = self.guard.holding(*read(self.work_dir))
        if why is None:
            self.since = None
        elif self.why is None:
            self.since = self.now_iso()
        self.why = why
        return why
