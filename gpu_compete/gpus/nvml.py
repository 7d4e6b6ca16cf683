"""The NVML probe: reads each scheduling unit in scope through nvidia-ml-py (`pynvml`).

A unit is a GPU, or for a GPU in MIG mode each of its MIG devices (memory and processes of
its own, reached with CUDA_VISIBLE_DEVICES=MIG-<uuid>); a MIG-enabled GPU is never offered
whole. MIG devices are found at start-up, like the GPUs.

NVML is initialised once per daemon life and shut down once. Handles are re-acquired every
snapshot, so a GPU that fell off the bus and came back is seen again. Every failure becomes a
snapshot with `available=False`, or for a process list that can't be read, `processes_known=
False` with an `error` saying why; nothing raises into the scheduler.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Mapping

from .base import GpuIdentity, GpuProcess, GpuSnapshot, NoDriverError, owner_of, resolve_keys
from .nvml_processes import ProcessReader

log = logging.getLogger(__name__)

NO_DRIVER_MESSAGE = ("no NVIDIA driver was found on this machine (NVML could not be loaded); "
                     "to try gpu-compete without GPUs, pass --simulate 4x24")

# NVML reports "not available" as an all-ones unsigned value; anything this large is not a size.
_NOT_AVAILABLE_FLOOR = 2**63
_MIG_ENABLED = 1  # NVML_DEVICE_MIG_ENABLE


@dataclass(frozen=True)
class _Unit:
    index: int  # the physical GPU's NVML index
    mig: int | None  # MIG device index under it, or None for the whole GPU
    uuid: str  # "GPU-..." or "MIG-..."
    name: str


class NvmlWarning(UserWarning):
    """A GPU's health changed for the worse (lost, no permission, no process list)."""


class NvmlProbe:
    """GpuProbe over NVML. `pynvml_module` lets tests pass the bindings over a fake driver."""

    def __init__(self, scope: str | None = "all", pynvml_module: ModuleType | Any = None,
                 environ: Mapping[str, str] | None = None) -> None:
        if pynvml_module is None:
            try:
                import pynvml as pynvml_module
            except ImportError as exc:  # nvidia-ml-py missing or broken: no way to reach a driver
                raise NoDriverError(NO_DRIVER_MESSAGE) from exc
        self._nvml = pynvml_module
        self._closed = False
        self._code_lost = self._codes("GPU_IS_LOST", "RESET_REQUIRED")
        self._code_not_supported = self._codes("NOT_SUPPORTED")
        # Answers to the v2 memory call that mean "this driver only speaks v1".
        self._code_memory_v1 = self._codes("FUNCTION_NOT_FOUND", "NOT_SUPPORTED", "ARGUMENT_VERSION_MISMATCH")
        # Answers to the MIG mode call from a GPU (or driver) that has no MIG: they never change.
        self._code_no_mig = self._codes("NOT_SUPPORTED", "FUNCTION_NOT_FOUND")
        # Answers for a MIG device index with no MIG device behind it.
        self._code_no_device = self._codes("NOT_FOUND", "INVALID_ARGUMENT")

        try:
            self._nvml.nvmlInit()
        except (self._nvml.NVMLError, OSError) as exc:
            if self._code(exc) in self._codes("LIBRARY_NOT_FOUND", "DRIVER_NOT_LOADED") or isinstance(exc, OSError):
                raise NoDriverError(NO_DRIVER_MESSAGE) from exc
            raise NoDriverError(f"NVML could not start: {_reason(exc)}") from exc

        try:
            count = int(self._nvml.nvmlDeviceGetCount())
        except self._nvml.NVMLError as exc:
            self.close()
            raise NoDriverError(f"NVML started but could not count the GPUs: {_reason(exc)}") from exc
        self._units: dict[str, _Unit] = {}
        self._handles: dict[int, Any] = {}
        self._no_mig: set[int] = set()  # GPUs that answered "no MIG here"
        for index in range(count):
            self._identify(index)
        identities = [GpuIdentity(u.index, u.uuid, u.mig) for u in self._units.values()]
        try:
            self.keys: list[str] = resolve_keys(scope, identities, dict(environ) if environ is not None else None)
        except Exception:
            self.close()  # the ScopeError is the user's to fix; don't leave NVML initialised behind it
            raise
        self.indices: list[int] = sorted({self._units[k].index for k in self.keys})

        self.groups = self._topology(self.indices)
        self._handles.clear()
        self._memory_v1: set[str] = set()  # units whose driver refused the v2 memory call
        self._processes = ProcessReader(self._nvml)
        self._last_error: dict[str, str | None] = {}

    # --- the probe protocol --------------------------------------------------------------

    def snapshot(self) -> list[GpuSnapshot]:
        out = []
        for key in self.keys:
            try:
                snap = self._read(key)
            except Exception as exc:  # lost, no permission, unknown, or a bug: never the caller's problem
                snap = self._unavailable(key, _reason(exc))
            self._note(snap)
            out.append(snap)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # shutting down a dying driver must not mask why we are closing
            pass

    # --- one unit ------------------------------------------------------------------------

    def _read(self, key: str) -> GpuSnapshot:
        unit = self._units[key]
        handle = self._nvml.nvmlDeviceGetHandleByIndex(unit.index)
        if unit.mig is None:
            if not unit.uuid:
                self._identify(unit.index)  # it failed at start-up; it answers now
                unit = self._units[key]
            if self._mig_enabled(unit.index, handle):
                return self._unavailable(key, "in MIG mode: its MIG devices are found when gpu-compete starts; "
                                              "restart it to schedule them")
            return self._read_device(unit, key, handle, str(unit.index))
        try:
            device = self._nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, unit.mig)
            uuid = _text(self._nvml.nvmlDeviceGetUUID(device))
        except self._nvml.NVMLError as exc:
            if self._code(exc) not in self._code_no_device:
                raise
            uuid, device = "", None
        if uuid != unit.uuid:  # destroyed, or its slot reused: the name we were given means nothing now
            return self._unavailable(key, f"MIG device {unit.uuid} is gone (MIG reconfigured); "
                                          "restart gpu-compete to schedule the new MIG devices")
        return self._read_device(unit, key, device, unit.uuid)

    def _read_device(self, unit: _Unit, key: str, handle: Any, cuda_visible: str) -> GpuSnapshot:
        total, used, free = self._memory(key, handle)
        try:
            utilization: int | None = int(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except self._nvml.NVMLError as exc:
            if self._code(exc) in self._code_lost:
                raise
            utilization = None  # unsupported (as on every MIG device): shown as "?"
        try:
            listed = self._processes.read(handle)
        except Exception as exc:
            if self._code(exc) in self._code_lost:
                raise
            # No permission, not supported, unknown, garbled: nobody can say which processes are
            # here, so the snapshot says so instead of saying "none" (memory is still good).
            return GpuSnapshot(unit.index, unit.uuid, unit.name, total, used, free, utilization, (), True,
                               f"process list unavailable: {_reason(exc)}", processes_known=False,
                               key=key, cuda_visible=cuda_visible, group=self.groups.get(unit.index))
        processes = tuple(GpuProcess(pid, _size(b), owner_of(pid)) for pid, b in listed.items())
        return GpuSnapshot(unit.index, unit.uuid, unit.name, total, used, free, utilization, processes,
                           key=key, cuda_visible=cuda_visible, group=self.groups.get(unit.index))

    def _topology(self, indices: list[int]) -> dict[int, str]:
        """Which GPUs are close, read once: GPUs joined by PCIe switches only (a common
        ancestor of NVML_TOPOLOGY_SINGLE or MULTIPLE, below any host bridge) form one group,
        "pcie<lowest index>"; where the driver can't say (NotSupported, an old driver without
        the call), the NUMA node, "numa<N>"; else nothing (all one group). A gpus=N task
        prefers N GPUs of one group."""
        nvml = self._nvml
        handles = self._handles
        if len(indices) < 2 or any(i not in handles for i in indices):
            return {}
        try:
            limit = getattr(nvml, "NVML_TOPOLOGY_MULTIPLE", 20)
            parent = {i: i for i in indices}

            def root(i: int) -> int:
                while parent[i] != i:
                    i = parent[i]
                return i

            for a in indices:
                for b in indices:
                    if a < b and int(nvml.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b])) <= limit:
                        parent[max(root(a), root(b))] = min(root(a), root(b))
            return {i: f"pcie{root(i)}" for i in indices}
        except Exception:  # noqa: BLE001 - no topology is a value, never a failure of the probe
            pass
        try:
            return {i: f"numa{int(nvml.nvmlDeviceGetNumaNodeId(handles[i]))}" for i in indices}
        except Exception:  # noqa: BLE001
            return {}

    def _unavailable(self, key: str, error: str) -> GpuSnapshot:
        unit = self._units[key]
        return GpuSnapshot(unit.index, unit.uuid, unit.name, None, None, None, available=False, error=error,
                           key=key, cuda_visible=unit.uuid if unit.mig is not None else str(unit.index))

    def _identify(self, index: int) -> None:
        """Record GPU `index` (and its MIG devices) under their keys; kept so a GPU whose calls
        fail later is still named."""
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            self._handles[index] = handle  # for reading the topology once, at start-up
            self._units[str(index)] = _Unit(index, None, _text(nvml.nvmlDeviceGetUUID(handle)),
                                            _text(nvml.nvmlDeviceGetName(handle)))
        except Exception:  # a GPU lost at start-up keeps its index; snapshot reports it unavailable
            self._units.setdefault(str(index), _Unit(index, None, "", ""))
            return
        try:
            if not self._mig_enabled(index, handle):
                return
            slots = int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))
        except Exception as exc:  # the GPU stays a whole unit; reading it will say what is wrong
            log.warning("GPU %d: could not read its MIG devices: %s", index, _reason(exc))
            return
        parent = self._units[str(index)]
        for mig in range(slots):
            try:
                device = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, mig)
                uuid, name = _text(nvml.nvmlDeviceGetUUID(device)), _text(nvml.nvmlDeviceGetName(device))
            except nvml.NVMLError as exc:
                if self._code(exc) in self._code_no_device:
                    continue  # an empty slot
                log.warning("GPU %d: could not read MIG device %d: %s", index, mig, _reason(exc))
                continue
            if "MIG" not in name:  # real drivers already say "... MIG 3g.20gb"
                name = f"{parent.name} MIG device {mig}"
            self._units[f"{index}:{mig}"] = _Unit(index, mig, uuid, name)

    def _mig_enabled(self, index: int, handle: Any) -> bool:
        if index in self._no_mig:
            return False
        try:
            current, _pending = self._nvml.nvmlDeviceGetMigMode(handle)
        except self._nvml.NVMLError as exc:
            if self._code(exc) not in self._code_no_mig:
                raise
            self._no_mig.add(index)
            return False
        return int(current) == _MIG_ENABLED

    def _memory(self, key: str, handle: Any) -> tuple[int | None, int | None, int | None]:
        nvml = self._nvml
        if key not in self._memory_v1:
            try:
                # v2 reports `used` without the driver's reserved memory, which v1 counts as used.
                return _sizes(nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2))
            except (TypeError, AttributeError):  # nvidia-ml-py too old to know v2
                self._memory_v1.add(key)
            except nvml.NVMLError as exc:
                if self._code(exc) not in self._code_memory_v1:
                    raise
                self._memory_v1.add(key)
        try:
            return _sizes(nvml.nvmlDeviceGetMemoryInfo(handle))
        except nvml.NVMLError as exc:
            if self._code(exc) in self._code_not_supported:
                return None, None, None
            raise

    # --- helpers -------------------------------------------------------------------------

    def _note(self, snap: GpuSnapshot) -> None:
        """Warn when a unit's error state changes, not every round it stays the same."""
        before = self._last_error.get(snap.key)
        if snap.error == before:
            return
        self._last_error[snap.key] = snap.error
        if snap.error is not None:
            warnings.warn(f"GPU {snap.key} ({snap.uuid or 'uuid unknown'}): {snap.error}", NvmlWarning, stacklevel=3)
        else:
            log.info("GPU %s (%s) answers normally again (was: %s)", snap.key, snap.uuid, before)

    def _codes(self, *names: str) -> frozenset[int]:
        return frozenset(getattr(self._nvml, f"NVML_ERROR_{n}") for n in names if hasattr(self._nvml, f"NVML_ERROR_{n}"))

    def _code(self, exc: BaseException) -> int | None:
        return getattr(exc, "value", None) if isinstance(exc, self._nvml.NVMLError) else None


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _size(value: Any) -> int | None:
    """Bytes, or None where NVML does not say (None, or its all-ones "not available" value)."""
    if value is None:
        return None
    value = int(value)
    return None if value >= _NOT_AVAILABLE_FLOOR or value < 0 else value


def _sizes(info: Any) -> tuple[int | None, int | None, int | None]:
    return _size(info.total), _size(info.used), _size(info.free)


def _reason(exc: BaseException) -> str:
    """NVML's own words ("GPU is lost"); for anything else, the exception type too."""
    try:
        text = str(exc)
    except Exception:  # pynvml's __str__ may ask the library, which may be gone
        text = ""
    if hasattr(exc, "value") and text:  # an NVMLError
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
