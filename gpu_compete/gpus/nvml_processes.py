"""A device's processes through NVML, read the way this driver writes them.

Drivers differ in how they list processes, and nvidia-ml-py's bindings get two of them wrong,
so the C functions are called here directly (through the bindings' own symbol lookup):

- R550 and newer export `nvmlDeviceGetRunningProcessDetailList`: one versioned call per kind
  (compute, graphics, MPS). Its binding assigns None to a ctypes field when a process's memory
  is "not available", which raises TypeError, so it is called directly too.
- R535 (and R545) kept the name `..._v3` but write 32-byte entries (they added
  usedGpuCcProtectedMemory) where the bindings read 24: every entry after the first is
  garbage. Known, as nvitop knows it (PR #79), by the driver exporting
  `nvmlDeviceGetConfComputeMemSizeInfo` (new in R535) but not the detail list (new in R550).
- R510 to R530, and R550+'s `_v3`: 24-byte entries. Before R510, `_v2` (from 450.66).
- Before 450.66 only the unversioned call exists, with 16-byte (pid, memory) entries. The
  bindings' unversioned function calls `_v3` and, lacking it, raises NVMLLibraryMismatchError
  (not an NVMLError); choosing the dialect by symbol means that call is never made.

A pid of 0 or above Linux's pid limit cannot hold a GPU context: such an entry means the
layout was misread (a driver this module does not know), and the list is refused as garbled
rather than read as "none of yours".
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_PID_MAX_LIMIT = 4 * 1024 * 1024  # Linux's PID_MAX_LIMIT: no pid is larger on any Linux
_NOT_AVAILABLE = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE as an unsigned long long
_ATTEMPTS = 3  # size query and read again when processes start between the two calls


class _EntryV1(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


class _EntryV2(ctypes.Structure):
    _fields_ = _EntryV1._fields_ + [("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


class _EntryV3(ctypes.Structure):  # R535's `_v3` entries, and the detail list's
    _fields_ = _EntryV2._fields_ + [("usedGpuCcProtectedMemory", ctypes.c_ulonglong)]


class _DetailList(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint), ("mode", ctypes.c_uint), ("numProcArrayEntries", ctypes.c_uint),
                ("procArray", ctypes.POINTER(_EntryV3))]


_DETAIL_LIST_V1 = ctypes.sizeof(_DetailList) | (1 << 24)  # NVML_STRUCT_VERSION(ProcessDetailList, 1)
_DETAIL_SYMBOL = "nvmlDeviceGetRunningProcessDetailList"

# (kind, C function family, detail-list mode)
KINDS = (("compute", "nvmlDeviceGetComputeRunningProcesses", 0),
         ("graphics", "nvmlDeviceGetGraphicsRunningProcesses", 1),
         ("mps", "nvmlDeviceGetMPSComputeRunningProcesses", 2))


@dataclass(frozen=True)
class Dialect:
    name: str
    suffix: str  # appended to a KINDS family name; unused by the detail list
    entry: type[ctypes.Structure] | None  # None: the detail list


DETAIL = Dialect("detail list (R550+)", "", None)
V3_R535 = Dialect("_v3 with 32-byte entries (R535/R545)", "_v3", _EntryV3)
V3 = Dialect("_v3", "_v3", _EntryV2)
V2 = Dialect("_v2 (450.66+)", "_v2", _EntryV2)
V1 = Dialect("unversioned, 16-byte entries (before 450.66)", "", _EntryV1)


class GarbledProcessList(Exception):
    """The driver's entries were not in the layout they were read with."""


class ProcessReader:
    """Lists the processes on a device handle (a GPU's or a MIG device's): compute, graphics
    and MPS, merged per pid. Raises NVMLError where NVML refuses, GarbledProcessList where
    its answer makes no sense; the caller decides what an unreadable list means."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self.dialect: Dialect | None = None
        self._absent: set[str] = set()  # kinds this driver has no call for

    def read(self, handle: Any) -> dict[int, int | None]:
        """{pid: bytes used, None where NVML does not say}."""
        nvml = self._nvml
        dialect = self._dialect()
        merged: dict[int, int | None] = {}
        for kind, family, mode in KINDS:
            if kind in self._absent:
                continue
            try:
                entries = self._detail(handle, mode) if dialect is DETAIL else self._array(family + dialect.suffix,
                                                                                          handle, dialect.entry)
            except nvml.NVMLError as exc:
                if kind != "compute" and exc.value == nvml.NVML_ERROR_FUNCTION_NOT_FOUND:
                    self._absent.add(kind)  # an older driver without the graphics or MPS call
                    log.info("this NVIDIA driver cannot list %s processes", kind)
                    continue
                if kind != "compute" and exc.value == nvml.NVML_ERROR_NOT_SUPPORTED:
                    continue  # the device cannot hold that kind of context (MIG has no graphics)
                raise  # a compute list that can't be read, or no permission: unknown, not empty
            for pid, raw in entries:
                used = None if raw == _NOT_AVAILABLE else raw
                if not 0 < pid <= _PID_MAX_LIMIT:
                    raise GarbledProcessList(f"the driver listed pid {pid} ({dialect.name} layout misread?)")
                # A process with contexts of two kinds (or listed twice) is reported with its whole
                # use on the device each time: keep the larger figure, never the sum.
                before = merged.get(pid)
                merged[pid] = used if before is None else before if used is None else max(before, used)
        return merged

    def _dialect(self) -> Dialect:
        if self.dialect is None:
            self.dialect = self._choose()
            log.info("NVML process lists: %s", self.dialect.name)
        return self.dialect

    def _choose(self) -> Dialect:
        if self._has(_DETAIL_SYMBOL):
            return DETAIL
        if self._has("nvmlDeviceGetComputeRunningProcesses_v3"):
            return V3_R535 if self._has("nvmlDeviceGetConfComputeMemSizeInfo") else V3
        if self._has("nvmlDeviceGetComputeRunningProcesses_v2"):
            return V2
        return V1

    def _has(self, symbol: str) -> bool:
        try:
            self._nvml._nvmlGetFunctionPointer(symbol)
        except self._nvml.NVMLError as exc:
            if exc.value == self._nvml.NVML_ERROR_FUNCTION_NOT_FOUND:
                return False
            raise
        return True

    def _array(self, symbol: str, handle: Any, entry: type[ctypes.Structure]) -> list[tuple[int, int]]:
        """The `(device, *count, entries)` calls: ask the size, then read into room for twice
        that (processes may start in between, and an R535 driver writing 32-byte entries then
        stays inside the buffer whatever it believes)."""
        nvml = self._nvml
        fn = nvml._nvmlGetFunctionPointer(symbol)
        count = ctypes.c_uint(0)
        array = None
        for _ in range(_ATTEMPTS):
            ret = fn(handle, ctypes.byref(count), array)
            if ret == nvml.NVML_SUCCESS:
                return [] if array is None else [(int(e.pid), int(e.usedGpuMemory)) for e in array[:count.value]]
            if ret != nvml.NVML_ERROR_INSUFFICIENT_SIZE:
                raise nvml.NVMLError(ret)
            capacity = count.value * 2 + 5
            array = (entry * capacity)()
            count.value = capacity
        raise nvml.NVMLError(nvml.NVML_ERROR_INSUFFICIENT_SIZE)

    def _detail(self, handle: Any, mode: int) -> list[tuple[int, int]]:
        nvml = self._nvml
        fn = nvml._nvmlGetFunctionPointer(_DETAIL_SYMBOL)
        request = _DetailList(version=_DETAIL_LIST_V1, mode=mode, numProcArrayEntries=0)
        array = None
        for _ in range(_ATTEMPTS):
            ret = fn(handle, ctypes.byref(request))
            if ret == nvml.NVML_SUCCESS:
                if array is None:
                    return []
                return [(int(e.pid), int(e.usedGpuMemory)) for e in array[:request.numProcArrayEntries]]
            if ret != nvml.NVML_ERROR_INSUFFICIENT_SIZE:
                raise nvml.NVMLError(ret)
            capacity = request.numProcArrayEntries * 2 + 5
            array = (_EntryV3 * capacity)()
            request.procArray = ctypes.cast(array, ctypes.POINTER(_EntryV3))
            request.numProcArrayEntries = capacity
        raise nvml.NVMLError(nvml.NVML_ERROR_INSUFFICIENT_SIZE)
