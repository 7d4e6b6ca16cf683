"""Values every probe returns, and the helpers around them.

A probe hands the scheduler frozen values, never NVML handles, and never raises into it: a
GPU that fails is a snapshot with `available=False` and an `error`.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from typing import Protocol, Sequence

import psutil

UNKNOWN_USER = "unknown"


class NoDriverError(Exception):
    """No NVIDIA driver or NVML library on this machine."""


class ScopeError(Exception):
    """`--gpus` or CUDA_VISIBLE_DEVICES names a GPU that does not exist."""


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # None: the driver does not say (not the same as 0)
    user: str = UNKNOWN_USER  # owner's user name; "unknown" when the pid is not visible here


@dataclass(frozen=True)
class GpuSnapshot:
    index: int
    uuid: str
    name: str
    total_bytes: int | None
    used_bytes: int | None
    free_bytes: int | None
    utilization: int | None = None  # percent, None where unsupported
    processes: tuple[GpuProcess, ...] = ()
    available: bool = True
    error: str | None = None
    # False when the driver would not list this GPU's processes (no permission, not
    # supported): then nobody can say the GPU holds none of ours, and exclusive mode must
    # not call it free.
    processes_known: bool = True
    # The scheduling unit's name ("3"; "3:1" for MIG device 1 of GPU 3) and what
    # CUDA_VISIBLE_DEVICES must say to reach it ("3", or "MIG-<uuid>").
    key: str = ""
    cuda_visible: str = ""
    # Topology: GPUs with the same group (a NUMA node, a PCIe switch) are close, and a gpus=N
    # task prefers N of one group. None: not known (every such GPU counts as one group).
    group: str | None = None

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", str(self.index))
        if not self.cuda_visible:
            object.__setattr__(self, "cuda_visible", str(self.index))

    def user_processes(self, user: str) -> tuple[GpuProcess, ...]:
        return tuple(p for p in self.processes if p.user == user)

    def to_dict(self) -> dict:
        return {
            "index": self.index, "key": self.key, "cuda_visible": self.cuda_visible,
            "uuid": self.uuid, "name": self.name, "processes_known": self.processes_known,
            "total_bytes": self.total_bytes, "used_bytes": self.used_bytes, "free_bytes": self.free_bytes,
            "utilization": self.utilization, "available": self.available, "error": self.error,
            "group": self.group,
            "processes": [{"pid": p.pid, "used_bytes": p.used_bytes, "user": p.user} for p in self.processes],
        }


class GpuProbe(Protocol):
    def snapshot(self) -> list[GpuSnapshot]:
        """One reading of every GPU in scope; never raises."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class GpuIdentity:
    index: int
    uuid: str = ""


def current_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # pragma: no cover - uid without a passwd entry (some containers)
        return str(os.getuid())


def owner_of(pid: int) -> str:
    """User name owning `pid`, or "unknown" if it is not visible here (another pid namespace)."""
    try:
        return psutil.Process(pid).username()
    except (psutil.Error, KeyError, ValueError):
        return UNKNOWN_USER


def gpu_env(cuda_visible: int | str) -> dict[str, str]:
    """Environment that pins a task to a GPU: an NVML index (with PCI bus order, CUDA's
    numbering agrees with NVML's, so the index means the same GPU to both) or a MIG uuid."""
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(cuda_visible)}


def key_to_record(key: str | None) -> int | str | None:
    """A GPU key as the registry and history store it: a whole GPU as its index (an int, as
    wrapper scripts and earlier versions wrote it), anything else (MIG "3:1") as text."""
    if key is None:
        return None
    return int(key) if key.isdigit() else key


def key_from_record(value: object) -> str | None:
    """The GPU key a registry or history field names, or None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return str(value)
    if isinstance(value, str) and value and len(value) < 200:
        return value
    return None


def resolve_scope(spec: str | None, gpus: Sequence[GpuIdentity], environ: dict[str, str] | None = None) -> list[int]:
    """NVML indices in scope. `spec` is "all" (or None) or a comma list of indices and UUIDs.

    With "all", a CUDA_VISIBLE_DEVICES of our own narrows the default scope to those GPUs
    (indices read in PCI bus order, or UUIDs / UUID prefixes as CUDA accepts them).
    """
    environ = os.environ if environ is None else environ
    known = {g.index for g in gpus}
    if spec is None or spec.strip().lower() == "all":
        visible = environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return sorted(known)
        if not visible.strip():
            raise ScopeError("CUDA_VISIBLE_DEVICES is empty, so no GPU is in scope; unset it or pass --gpus")
        return _pick(visible, gpus, "CUDA_VISIBLE_DEVICES")
    return _pick(spec, gpus, "--gpus")


def _pick(spec: str, gpus: Sequence[GpuIdentity], source: str) -> list[int]:
    chosen: list[int] = []
    by_index = {g.index: g for g in gpus}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise ScopeError(f"{source}: empty entry in {spec!r}")
        if item.lstrip("-").isdigit():
            index = int(item)
            if index not in by_index:
                raise ScopeError(f"{source}: there is no GPU {index} (GPUs here: "
                                 f"{', '.join(str(i) for i in sorted(by_index)) or 'none'})")
        else:
            matches = [g.index for g in gpus if g.uuid and (g.uuid == item or g.uuid.startswith(item))]
            if len(matches) != 1:
                what = "no GPU has" if not matches else "several GPUs match"
                raise ScopeError(f"{source}: {what} the UUID {item!r}")
            index = matches[0]
        if index not in chosen:
            chosen.append(index)
    return sorted(chosen)

