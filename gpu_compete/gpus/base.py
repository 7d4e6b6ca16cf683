"""Values every probe returns, and the helpers around them.

A probe hands the scheduler frozen values, never NVML handles, and never raises into it: a
GPU that fails is a snapshot with `available=False` and an `error`.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, replace
from typing import Collection, Iterable, Mapping, Protocol, Sequence

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
    """A scheduling unit as `--gpus` can name it: a whole GPU, or (with `mig` set) MIG device
    `mig` of GPU `index`, whose uuid is "MIG-...". """

    index: int
    uuid: str = ""
    mig: int | None = None

    @property
    def key(self) -> str:
        return str(self.index) if self.mig is None else f"{self.index}:{self.mig}"


def current_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # pragma: no cover - uid without a passwd entry (some containers)
        return str(os.getuid())


def owner_of(pid: int) -> str:
    """User name owning `pid`, or "unknown" if it is not visible here (another pid namespace)."""
    try:
        return psutil.Process(pid).username()
    # OSError: a process ending while psutil reads /proc can surface as FileNotFoundError
    # rather than NoSuchProcess (gpustat #95).
    except (psutil.Error, KeyError, ValueError, OSError):
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


def resolve_keys(spec: str | None, gpus: Sequence[GpuIdentity], environ: Mapping[str, str] | None = None) -> list[str]:
    """Keys of the scheduling units in scope. `spec` is "all" (or None) or a comma list of
    indices, keys ("3:1"), GPU UUIDs and MIG UUIDs (or unique prefixes of them).

    A GPU that has MIG devices among `gpus` is never a unit itself: naming it (by index or
    UUID) means all of its MIG devices. With "all", a CUDA_VISIBLE_DEVICES of our own narrows
    the default scope the same way (indices read in PCI bus order, as CUDA does with
    CUDA_DEVICE_ORDER=PCI_BUS_ID).
    """
    environ = os.environ if environ is None else environ
    if spec is None or spec.strip().lower() == "all":
        visible = environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return _order({k for g in gpus for k in _units(g, gpus)})
        if not visible.strip():
            raise ScopeError("CUDA_VISIBLE_DEVICES is empty, so no GPU is in scope; unset it or pass --gpus")
        return _pick(visible, gpus, "CUDA_VISIBLE_DEVICES")
    return _pick(spec, gpus, "--gpus")


def resolve_scope(spec: str | None, gpus: Sequence[GpuIdentity], environ: Mapping[str, str] | None = None) -> list[int]:
    """The physical GPU indices in scope (see `resolve_keys`); for GPUs without MIG the keys
    and the indices are the same thing."""
    return sorted({int(key.split(":")[0]) for key in resolve_keys(spec, gpus, environ)})


def _units(identity: GpuIdentity, gpus: Sequence[GpuIdentity]) -> list[str]:
    """The keys that naming `identity` selects: itself, or a MIG-enabled GPU's MIG devices."""
    if identity.mig is not None:
        return [identity.key]
    migs = [g.key for g in gpus if g.index == identity.index and g.mig is not None]
    return migs or [identity.key]


def _order(keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=lambda k: tuple(int(p) for p in k.split(":")))


def _pick(spec: str, gpus: Sequence[GpuIdentity], source: str) -> list[str]:
    chosen: list[str] = []
    wholes = {g.index: g for g in gpus if g.mig is None}
    by_key = {g.key: g for g in gpus}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise ScopeError(f"{source}: empty entry in {spec!r}")
        if item.lstrip("-").isdigit():
            if int(item) not in wholes:
                raise ScopeError(f"{source}: there is no GPU {int(item)} (GPUs here: "
                                 f"{', '.join(str(i) for i in sorted(wholes)) or 'none'})")
            identity = wholes[int(item)]
        elif item in by_key:  # "3:1", MIG device 1 of GPU 3
            identity = by_key[item]
        else:
            matches = [g for g in gpus if g.uuid and (g.uuid == item or g.uuid.startswith(item))]
            if len(matches) != 1:
                what = "no GPU has" if not matches else "several GPUs match"
                raise ScopeError(f"{source}: {what} the UUID {item!r}")
            identity = matches[0]
        chosen.extend(k for k in _units(identity, gpus) if k not in chosen)
    return _order(chosen)


# --- pid namespaces ----------------------------------------------------------------------------
# NVML names processes by their pid in the host's pid namespace. In a container started without
# --pid=host those numbers mean nothing here (or, worse, another process), so a task of ours is
# never recognised on its GPU and an owner looked up for such a pid would be a guess.

PID_NAMESPACE_WARNING = (
    "NVML lists processes by pids from another pid namespace (this looks like a container started "
    "without --pid=host): gpu-compete cannot see which GPU processes are its own tasks, so a "
    "task's start-up lease ends only at --settle and owners shown for GPU processes are not "
    "trustworthy; run the container with --pid=host to fix this")


def listed_pids_visible(snapshots: Iterable[GpuSnapshot]) -> bool | None:
    """Whether any pid NVML lists is a process visible here (its owner could be read).
    None when NVML lists no process at all, so there is nothing to judge by. Costs nothing:
    the probe already looked each pid up."""
    users = [p.user for s in snapshots for p in s.processes]
    if not users:
        return None
    return any(user != UNKNOWN_USER for user in users)


def pid_namespace_mismatch(snapshots: Iterable[GpuSnapshot], our_pids: Mapping[str, Collection[int]]) -> bool:
    """True when NVML evidently counts pids in another namespace than ours.

    `our_pids` maps a snapshot key to the pids (as seen here) of our tasks running on that unit
    that are old enough to hold their CUDA context (running past --settle). The evidence: NVML
    lists processes on such a unit, not one pid NVML lists anywhere is one of ours, and not one
    of them is visible here at all. The last condition keeps a task that is slow to open its
    CUDA context, next to someone else's visible process, from looking like a container.
    Pure: call it every round and warn (PID_NAMESPACE_WARNING) the first time it says True.
    """
    snapshots = list(snapshots)
    ours = {pid for pids in our_pids.values() for pid in pids}
    crowded = any(s.key in our_pids and our_pids[s.key] and s.available and s.processes_known and s.processes
                  for s in snapshots)
    if not crowded:
        return False
    if any(p.pid in ours for s in snapshots for p in s.processes):
        return False
    return listed_pids_visible(snapshots) is False


def without_owners(snapshots: Iterable[GpuSnapshot]) -> list[GpuSnapshot]:
    """The snapshots with every process owner "unknown": once the pid namespaces are known to
    differ, an owner found for an NVML pid belongs to whatever process has that number here."""
    return [replace(s, processes=tuple(replace(p, user=UNKNOWN_USER) for p in s.processes)) for s in snapshots]
