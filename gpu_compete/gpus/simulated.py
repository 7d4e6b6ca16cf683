"""Simulated GPUs, for trying gpu-compete without a GPU and for testing the daemon end to end.

A real process counts as running on simulated GPU N when its environment has
`CUDA_VISIBLE_DEVICES=N` and `GPU_COMPETE_VRAM_GB=X`: it then uses X GB there. With a comma
list (`CUDA_VISIBLE_DEVICES=3,5`, a gpus=2 task) it uses X GB on *each* listed GPU, as the
declared VRAM of a gpus=N task is per GPU. Only the topmost such process of a tree counts (a
shell and its child are one task), unless a process sets a GPU_COMPETE_VRAM_GB of its own:
then it replaces its parent's claim (how a test makes a task use more than it declared).
A process counts only once it has lived `startup_delay_s` (a CUDA context takes a while to
appear in NVML).

Specs: `4x24` (4 GPUs of 24 GB), `4x24,delay=2` (with a 2 s start-up delay), or a JSON file
re-read whenever it changes, so faults can be injected into a running daemon:

    {"startup_delay_s": 2,
     "gpus": [{"memory_gb": 24, "name": "Sim A100",
               "processes": [{"pid": 4242, "memory_gb": 5, "user": "alice"}],
               "lost": false, "fail": null}]}

`group: "numa0"` puts the GPU in a topology group (GPUs of one group are close: a gpus=N task
prefers N of one group). `lost: true` makes the GPU unavailable (like NVML's GpuIsLost); `fail: "processes"` makes its
process list fail, `fail: "memory"` its memory reading (like NotSupported).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil

from ..tasks import GIB
from .base import GpuIdentity, GpuProcess, GpuSnapshot, current_user, owner_of, resolve_scope

VRAM_ENV = "GPU_COMPETE_VRAM_GB"
# Set by the daemon on its tasks: a simulation with a namespace ignores tasks of other
# namespaces (another daemon's simulated machine), while hand-started processes without
# one count everywhere.
NAMESPACE_ENV = "GPU_COMPETE_NAMESPACE"
# A process younger than this may be between fork and exec, still showing its parent's
# environment: no claim read from it is remembered, it is read again next time.
_EXEC_GRACE_S = 1.0
# ... and a claim (its parent's, maybe) is remembered only once read from a process this old
# whose command line is no longer its parent's (it has exec'd): shorter, since every new task
# process is read each round until then. One still showing its parent's command line may not
# have exec'd yet (on a loaded machine that can take longer than this): _EXEC_GRACE_S.
_CLAIM_SETTLE_S = 0.2
# How long a process that is no task of ours goes unread before its pid is looked at again.
_IGNORE_S = 1.0
_SHORT_SPEC = re.compile(r"^(?P<n>\d+)x(?P<gb>\d+(?:\.\d+)?)(?:,delay=(?P<delay>\d+(?:\.\d+)?))?"
                         r"(?:,linger=(?P<linger>\d+(?:\.\d+)?))?$")


class SimulationSpecError(ValueError):
    pass


@dataclass(frozen=True)
class SimGpu:
    memory_gb: float
    name: str = "Simulated GPU"
    processes: tuple[tuple[int, float, str | None], ...] = ()  # (pid, GB, user or None)
    lost: bool = False
    fail: str | None = None
    group: str | None = None  # topology group (NUMA node / PCIe switch) for gpus=N placement


@dataclass(frozen=True)
class SimConfig:
    gpus: tuple[SimGpu, ...]
    startup_delay_s: float = 0.0
    # How long a process that exited is still listed: real NVML can list one for a moment
    # after its exit, and the scheduler must not wait for that.
    linger_s: float = 0.0


def parse_spec(spec: str) -> SimConfig:
    """`NxGB[,delay=S]` or the path of a JSON file."""
    match = _SHORT_SPEC.match(spec.strip())
    if match:
        count, gb = int(match["n"]), float(match["gb"])
        if not 1 <= count <= 64 or gb <= 0:
            raise SimulationSpecError(f"--simulate {spec!r}: want 1-64 GPUs of more than 0 GB")
        return SimConfig(tuple(SimGpu(gb) for _ in range(count)), float(match["delay"] or 0),
                         float(match["linger"] or 0))
    path = Path(spec)
    if not path.exists():
        raise SimulationSpecError(f"--simulate {spec!r}: neither NxGB (e.g. 4x24) nor an existing JSON file")
    return _parse_json(path)


def _parse_json(path: Path) -> SimConfig:
    try:
        obj = json.loads(path.read_text())
        gpus = tuple(_sim_gpu(g) for g in obj["gpus"])
        delay = float(obj.get("startup_delay_s", 0))
        linger = float(obj.get("linger_s", 0))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SimulationSpecError(f"{path}: not a simulation file ({exc}); see `gpu-compete gpus --help`") from None
    if not gpus:
        raise SimulationSpecError(f"{path}: \"gpus\" is empty")
    return SimConfig(gpus, delay, linger)


def _sim_gpu(obj: dict[str, Any]) -> SimGpu:
    procs = tuple((int(p["pid"]), float(p.get("memory_gb", 0)), p.get("user")) for p in obj.get("processes", ()))
    fail = obj.get("fail")
    if fail not in (None, "processes", "memory"):
        raise ValueError(f"fail must be \"processes\" or \"memory\", not {fail!r}")
    group = obj.get("group")
    return SimGpu(float(obj["memory_gb"]), str(obj.get("name", "Simulated GPU")), procs, bool(obj.get("lost")), fail,
                  None if group is None else str(group))


def sim_uuid(index: int) -> str:
    return f"GPU-5105{index:04d}-0000-4000-8000-{index:012d}"


class SimulatedProbe:
    def __init__(self, config: SimConfig, scope: str | None = "all", environ: dict[str, str] | None = None,
                 source: Path | None = None, clock: Callable[[], float] = time.time, namespace: str | None = None):
        self.config = config
        self.namespace = namespace
        self.source = source
        self._mtime = source.stat().st_mtime_ns if source else None
        self._clock = clock
        self.user = current_user()
        identities = [GpuIdentity(i, sim_uuid(i)) for i in range(len(config.gpus))]
        self.indices = resolve_scope(scope, identities, environ)
        # (pid, start ticks) -> (gpu index, bytes, create time) or None; a process's initial
        # environment never changes, so each process is read once.
        self._seen: dict[tuple[int, int], tuple[tuple[int, ...], int, float] | None] = {}
        # pid -> when to look at it again: a process that is no task of ours (its pid may be
        # taken by a new process meanwhile, and pids wrap quickly on a busy machine).
        self._ignored: dict[int, float] = {}
        # Processes that exited, still listed until `linger_s` passes: (pid, ct) -> (gpu, bytes, ppid, gone_at)
        # Keyed by ((pid, create time), gpu): a gpus=N task's process is listed on each GPU.
        self._lingering: dict[tuple[tuple[int, float], int], tuple[int, int, int, float]] = {}
        self._listed: dict[tuple[tuple[int, float], int], tuple[int, int, int]] = {}  # -> (gpu, bytes, ppid)

    @classmethod
    def from_spec(cls, spec: str, scope: str | None = "all", environ: dict[str, str] | None = None,
                  namespace: str | None = None) -> "SimulatedProbe":
        config = parse_spec(spec)
        source = None if _SHORT_SPEC.match(spec.strip()) else Path(spec)
        return cls(config, scope=scope, environ=environ, source=source, namespace=namespace)

    def _reload(self) -> None:
        if self.source is None:
            return
        try:
            mtime = self.source.stat().st_mtime_ns
            if mtime != self._mtime:
                self.config = _parse_json(self.source)
                self._mtime = mtime
        except (OSError, SimulationSpecError):
            pass  # a file caught mid-write: keep the last good config, read it again next round

    def _task_processes(self) -> dict[int, list[tuple[int, int]]]:
        """Real processes on each simulated GPU: {index: [(pid, bytes)]}."""
        now = self._clock()
        found: dict[int, dict[int, tuple[int, int]]] = {}  # gpu -> pid -> (ppid, bytes)
        listed: dict[tuple[tuple[int, float], int], tuple[int, int, int]] = {}
        alive = set()
        uid = os.getuid()
        pids = _pids()
        # Only new processes and those placed on a GPU are read: a process already known to be
        # someone else's (or no task) is looked at again only every _IGNORE_S (its pid may have
        # been reused by then: a new process is then read like any other).
        self._ignored = {p: until for p, until in self._ignored.items() if until > now and p in pids}
        for pid in pids - self._ignored.keys():
            row = _stat(pid)
            if row is None:
                continue
            ppid, state, start = row
            if state == "Z":
                continue
            key = (pid, start)
            alive.add(key)
            if key in self._seen:
                claim = self._seen[key]
                if claim is None:
                    self._ignored[pid] = now + _IGNORE_S  # the same process: still none of ours
            else:
                claim, created = _claim_pid(pid, uid, self.namespace)
                # A young process may be between fork and exec, showing its parent's
                # environment (no claim, or the parent's): used now, read again next time.
                age = None if created is None else now - created
                if age is None or age >= _EXEC_GRACE_S or (
                        claim is not None and age >= _CLAIM_SETTLE_S and not _parents_image(pid, ppid)):
                    self._seen[key] = claim
                    if claim is None:
                        self._ignored[pid] = now + _IGNORE_S
            if claim is None:
                continue
            gpus, used, created = claim
            if now - created < self.config.startup_delay_s:
                continue
            for gpu in gpus:  # a gpus=N task holds its VRAM on each of its GPUs
                found.setdefault(gpu, {})[pid] = (ppid, used)
                listed[(key, gpu)] = (gpu, used, ppid)
        self._seen = {k: v for k, v in self._seen.items() if k in alive or k[0] in self._ignored}
        if self.config.linger_s > 0:
            for key, (gpu, used, ppid) in self._listed.items():
                if key[0] not in alive and key not in self._lingering:
                    self._lingering[key] = (gpu, used, ppid, now)
            self._lingering = {k: v for k, v in self._lingering.items() if now - v[3] < self.config.linger_s}
            for ((pid, _ct), _gpu), (gpu, used, ppid, _gone) in self._lingering.items():
                found.setdefault(gpu, {}).setdefault(pid, (ppid, used))
            self._listed = listed
        # Topmost of each tree only: drop a process whose parent is on the same GPU with the
        # same claim; a child with a claim of its own replaces its parent's instead.
        out = {}
        for gpu, procs in found.items():
            overridden = {ppid for ppid, b in procs.values() if ppid in procs and procs[ppid][1] != b}
            out[gpu] = [(pid, b) for pid, (ppid, b) in procs.items()
                        if pid not in overridden and (ppid not in procs or procs[ppid][1] != b)]
        return out

    def snapshot(self) -> list[GpuSnapshot]:
        self._reload()
        try:
            tasks = self._task_processes()
        except psutil.Error:  # pragma: no cover - /proc unreadable
            tasks = {}
        out = []
        for index in self.indices:
            if index >= len(self.config.gpus):
                out.append(GpuSnapshot(index, sim_uuid(index), "missing", None, None, None, available=False,
                                       error="GPU is lost (simulated)"))
                continue
            gpu = self.config.gpus[index]
            if gpu.lost:
                out.append(GpuSnapshot(index, sim_uuid(index), gpu.name, None, None, None, available=False,
                                       error="GPU is lost (simulated)"))
                continue
            procs = [GpuProcess(pid, int(gb * GIB), user or owner_of(pid)) for pid, gb, user in gpu.processes]
            # A process that exited but is still listed has no owner to read, as with NVML.
            procs += [GpuProcess(pid, used, self.user if psutil.pid_exists(pid) else owner_of(pid))
                      for pid, used in tasks.get(index, [])]
            total = int(gpu.memory_gb * GIB)
            used = min(total, sum(p.used_bytes or 0 for p in procs))
            error, known = None, True
            if gpu.fail == "processes":
                procs, error, known = [], "process list unavailable (simulated)", False
            if gpu.fail == "memory":
                out.append(GpuSnapshot(index, sim_uuid(index), gpu.name, None, None, None, None, tuple(procs)))
                continue
            util = min(100, 100 * len(procs)) if procs else 0
            out.append(GpuSnapshot(index, sim_uuid(index), gpu.name, total, used, total - used, util,
                                   tuple(procs), error=error, processes_known=known, group=gpu.group))
        return out

    def close(self) -> None:
        pass


def _pids() -> set[int]:
    return {int(name) for name in os.listdir("/proc") if name.isdigit()}


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start ticks) from /proc/<pid>/stat alone: the simulation reads processes
    every round, and psutil's several files per process made the simulated probe the slowest
    part of a round on a busy machine."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[1]), fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None


def _claim_pid(pid: int, uid: int, namespace: str | None) -> tuple[tuple[tuple[int, ...], int, float] | None,
                                                                  float | None]:
    """(((gpu index, ...), bytes, create time) or None, create time) for one process."""
    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
        if proc.uids().real != uid:
            return None, created
        claim = _claim(proc, namespace)
        return (None if claim is None else (claim[0], claim[1], created)), created
    except psutil.Error:
        return None, None


def _parents_image(pid: int, ppid: int) -> bool:
    """Whether the process still shows its parent's command line: it may not have exec'd yet."""
    try:
        return psutil.Process(pid).cmdline() == psutil.Process(ppid).cmdline()
    except psutil.Error:
        return False


def _claim(proc: psutil.Process, namespace: str | None) -> tuple[tuple[int, ...], int] | None:
    """((gpu index, ...), bytes on each) when the process's environment puts it on simulated GPUs."""
    try:
        env = proc.environ()
    except (psutil.Error, OSError):
        return None
    theirs = env.get(NAMESPACE_ENV)
    if namespace and theirs and theirs != namespace:
        return None
    gb, visible = env.get(VRAM_ENV), env.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if gb is None or not all(v.isdigit() for v in visible):
        return None
    try:
        return tuple(dict.fromkeys(int(v) for v in visible)), int(float(gb) * GIB)
    except ValueError:
        return None
