"""The NVML probe: reads each GPU in scope through nvidia-ml-py (`pynvml`).

NVML is initialised once per daemon life and shut down once. Handles are re-acquired every
snapshot, so a GPU that fell off the bus and came back is seen again. Every per-GPU failure
becomes a snapshot with `available=False` (or, for a missing process list, an `error` on an
otherwise available GPU); nothing raises into the scheduler.
"""

from __future__ import annotations

import logging
import warnings
from types import ModuleType
from typing import Any, Mapping

from .base import GpuIdentity, GpuProcess, GpuSnapshot, NoDriverError, owner_of, resolve_scope

log = logging.getLogger(__name__)

NO_DRIVER_MESSAGE = ("no NVIDIA driver was found on this machine (NVML could not be loaded); "
                     "to try gpu-compete without GPUs, pass --simulate 4x24")

# NVML reports "not available" as an all-ones unsigned value; anything this large is not a size.
_NOT_AVAILABLE_FLOOR = 2**63

# Newest first: an older driver lacks the newer symbols and answers FunctionNotFound.
_PROCESS_CALLS = ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2",
                  "nvmlDeviceGetComputeRunningProcesses")


class NvmlWarning(UserWarning):
    """A GPU's health changed for the worse (lost, no permission, no process list)."""


class NvmlProbe:
    """GpuProbe over NVML. `pynvml_module` lets tests pass a fake module."""

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
        self._code_no_function = self._codes("FUNCTION_NOT_FOUND")
        # Answers to the v2 memory call that mean "this driver only speaks v1".
        self._code_memory_v1 = self._codes("FUNCTION_NOT_FOUND", "NOT_SUPPORTED", "ARGUMENT_VERSION_MISMATCH")

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
        self._uuids: dict[int, str] = {}
        self._names: dict[int, str] = {}
        for index in range(count):
            self._identify(index)
        identities = [GpuIdentity(i, self._uuids[i]) for i in range(count)]
        try:
            self.indices: list[int] = resolve_scope(scope, identities, dict(environ) if environ is not None else None)
        except Exception:
            self.close()  # the ScopeError is the user's to fix; don't leave NVML initialised behind it
            raise

        self.groups = self._topology(self.indices)
        self._memory_v1: set[int] = set()  # GPUs whose driver refused the v2 memory call
        self._process_calls = [name for name in _PROCESS_CALLS if hasattr(self._nvml, name)]
        self._last_error: dict[int, str | None] = {}

    # --- the probe protocol --------------------------------------------------------------

    def snapshot(self) -> list[GpuSnapshot]:
        out = []
        for index in self.indices:
            try:
                snap = self._read(index)
            except Exception as exc:  # lost, no permission, unknown, or a bug: never the caller's problem
                snap = GpuSnapshot(index, self._uuids.get(index, ""), self._names.get(index, ""),
                                   None, None, None, available=False, error=_reason(exc))
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

    # --- one GPU -------------------------------------------------------------------------

    def _read(self, index: int) -> GpuSnapshot:
        handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
        if not self._uuids.get(index):
            self._identify(index)  # it failed at start-up; it answers now
        total, used, free = self._memory(index, handle)
        try:
            utilization: int | None = int(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except self._nvml.NVMLError as exc:
            if self._code(exc) in self._code_lost:
                raise
            utilization = None
        error = None
        try:
            processes = self._processes(handle)
        except Exception as exc:
            if self._code(exc) in self._code_lost:
                raise
            processes, error = (), "process list unavailable"
        return GpuSnapshot(index, self._uuids[index], self._names[index], total, used, free,
                           utilization, processes, available=True, error=error, group=self.groups.get(index))

    def _topology(self, indices: list[int]) -> dict[int, str]:
        """Which GPUs are close, read once: GPUs joined by PCIe switches only (a common
        ancestor of NVML_TOPOLOGY_SINGLE or MULTIPLE, below any host bridge) form one group,
        "pcie<lowest index>"; where the driver can't say (NotSupported, an old driver without
        the call), the NUMA node, "numa<N>"; else nothing (all one group). A gpus=N task
        prefers N GPUs of one group."""
        nvml = self._nvml
        ancestor, numa = (hasattr(nvml, n) for n in ("nvmlDeviceGetTopologyCommonAncestor", "nvmlDeviceGetNumaNodeId"))
        if len(indices) < 2 or not (ancestor or numa):
            return {}
        try:
            if not ancestor:
                raise AttributeError("nvmlDeviceGetTopologyCommonAncestor")
            handles = {i: nvml.nvmlDeviceGetHandleByIndex(i) for i in indices}
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
            return {i: f"numa{int(nvml.nvmlDeviceGetNumaNodeId(nvml.nvmlDeviceGetHandleByIndex(i)))}"
                    for i in indices}
        except Exception:  # noqa: BLE001
            return {}

    def _identify(self, index: int) -> None:
        """Record index -> uuid/name; kept so a GPU whose calls fail later is still named."""
        try:
            handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            self._uuids[index] = _text(self._nvml.nvmlDeviceGetUUID(handle))
            self._names[index] = _text(self._nvml.nvmlDeviceGetName(handle))
        except Exception:  # a GPU lost at start-up keeps its index; snapshot reports it unavailable
            self._uuids.setdefault(index, "")
            self._names.setdefault(index, "")

    def _memory(self, index: int, handle: Any) -> tuple[int | None, int | None, int | None]:
        nvml = self._nvml
        if index not in self._memory_v1:
            try:
                # v2 reports `used` without the driver's reserved memory, which v1 counts as used.
                return _sizes(nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2))
            except (TypeError, AttributeError):  # nvidia-ml-py too old to know v2
                self._memory_v1.add(index)
            except nvml.NVMLError as exc:
                if self._code(exc) not in self._code_memory_v1:
                    raise
                self._memory_v1.add(index)
        try:
            return _sizes(nvml.nvmlDeviceGetMemoryInfo(handle))
        except nvml.NVMLError as exc:
            if self._code(exc) in self._code_not_supported:
                return None, None, None
            raise

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        if not self._process_calls:
            raise RuntimeError("this NVML has no call that lists compute processes")
        while True:
            try:
                entries = getattr(self._nvml, self._process_calls[0])(handle)
                break
            except self._nvml.NVMLError as exc:
                # A missing symbol is missing for every GPU: drop that call for good, try the next.
                if self._code(exc) not in self._code_no_function or len(self._process_calls) == 1:
                    raise
                self._process_calls.pop(0)
        seen: dict[int, GpuProcess] = {}
        for entry in entries:
            pid = int(entry.pid)
            if pid not in seen:  # MIG and some drivers list a pid more than once
                seen[pid] = GpuProcess(pid, _size(getattr(entry, "usedGpuMemory", None)), owner_of(pid))
        return tuple(seen.values())

    # --- helpers -------------------------------------------------------------------------

    def _note(self, snap: GpuSnapshot) -> None:
        """Warn when a GPU's error state changes, not every round it stays the same."""
        before = self._last_error.get(snap.index)
        if snap.error == before:
            return
        self._last_error[snap.index] = snap.error
        if snap.error is not None:
            warnings.warn(f"GPU {snap.index} ({snap.uuid or 'uuid unknown'}): {snap.error}", NvmlWarning, stacklevel=3)
        else:
            log.info("GPU %d (%s) answers normally again (was: %s)", snap.index, snap.uuid, before)

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
