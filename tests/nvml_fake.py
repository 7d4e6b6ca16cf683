"""A fake NVIDIA driver under the real nvidia-ml-py bindings.

`FakeNvml(gpus, driver=R550).module` is a fresh copy of the installed `pynvml` module (its own
source run again, so its library handle and caches are its own) whose `nvmlLib` is a fake
library: each NVML C function is a `ctypes.CFUNCTYPE` callback that writes into the memory the
bindings (or the probe) pass by pointer, in the layout the chosen driver generation writes,
and returns NVML's own return codes. A symbol the driver lacks is missing from the library,
so the bindings answer FunctionNotFound exactly as they do on a real old driver.

Layouts and codes are written out here from nvml.h rather than taken from the bindings, so the
fake checks the bindings instead of agreeing with them by construction.
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import sys
import traceback
from collections import Counter
from ctypes import c_uint, c_ulonglong, c_void_p
from dataclasses import dataclass, field
from typing import Callable

import pynvml
import pytest

GIB, MIB = 2**30, 2**20
NOT_AVAILABLE = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE as an unsigned long long

# Return codes (nvml.h).
SUCCESS, UNINITIALIZED, INVALID_ARGUMENT, NOT_SUPPORTED, NO_PERMISSION = 0, 1, 2, 3, 4
NOT_FOUND, INSUFFICIENT_SIZE, DRIVER_NOT_LOADED, LIBRARY_NOT_FOUND, FUNCTION_NOT_FOUND = 6, 7, 9, 12, 13
GPU_IS_LOST, RESET_REQUIRED, ARGUMENT_VERSION_MISMATCH, UNKNOWN = 15, 16, 25, 999
STRINGS = {NOT_SUPPORTED: "Not Supported", NO_PERMISSION: "Insufficient Permissions", NOT_FOUND: "Not Found",
           FUNCTION_NOT_FOUND: "Function Not Found", GPU_IS_LOST: "GPU is lost", UNKNOWN: "Unknown Error",
           LIBRARY_NOT_FOUND: "NVML Shared Library Not Found", DRIVER_NOT_LOADED: "Driver Not Loaded"}


# --- C layouts, as the driver writes them ------------------------------------------------------

class InfoV1(ctypes.Structure):  # nvmlProcessInfo_v1_t: the unversioned calls
    _fields_ = [("pid", c_uint), ("usedGpuMemory", c_ulonglong)]


class InfoV2(ctypes.Structure):  # nvmlProcessInfo_v2_t: _v2, and _v3 before R535 and from R550
    _fields_ = InfoV1._fields_ + [("gpuInstanceId", c_uint), ("computeInstanceId", c_uint)]


class InfoV3(ctypes.Structure):  # nvmlProcessInfo_v3_t / nvmlProcessDetail_v1_t: R535's _v3, detail list
    _fields_ = InfoV2._fields_ + [("usedGpuCcProtectedMemory", c_ulonglong)]


class DetailList(ctypes.Structure):  # nvmlProcessDetailList_v1_t
    _fields_ = [("version", c_uint), ("mode", c_uint), ("numProcArrayEntries", c_uint), ("procArray", c_void_p)]


class MemoryV1(ctypes.Structure):
    _fields_ = [("total", c_ulonglong), ("free", c_ulonglong), ("used", c_ulonglong)]


class MemoryV2(ctypes.Structure):
    _fields_ = [("version", c_uint), ("total", c_ulonglong), ("reserved", c_ulonglong), ("free", c_ulonglong),
                ("used", c_ulonglong)]


class Utilization(ctypes.Structure):
    _fields_ = [("gpu", c_uint), ("memory", c_uint)]


MEMORY_V2 = ctypes.sizeof(MemoryV2) | (2 << 24)
DETAIL_LIST_V1 = ctypes.sizeof(DetailList) | (1 << 24)
assert (ctypes.sizeof(InfoV1), ctypes.sizeof(InfoV2), ctypes.sizeof(InfoV3)) == (16, 24, 32)

FAMILIES = {"nvmlDeviceGetComputeRunningProcesses": "compute", "nvmlDeviceGetGraphicsRunningProcesses": "graphics",
            "nvmlDeviceGetMPSComputeRunningProcesses": "mps"}
MODES = {0: "compute", 1: "graphics", 2: "mps"}
DETAIL = "nvmlDeviceGetRunningProcessDetailList"


# --- driver generations ------------------------------------------------------------------------

@dataclass(frozen=True)
class Driver:
    version: str
    suffixes: tuple[str, ...]  # process-call versions it exports ("" is the unversioned v1 call)
    v3_entry: type[ctypes.Structure] = InfoV2  # what its _v3 calls write
    memory_v2: bool = False
    mig: bool = False
    conf_compute: bool = False  # exports nvmlDeviceGetConfComputeMemSizeInfo (R535+)
    detail_list: bool = False

    def exports(self) -> set[str]:
        names = {"nvmlInitWithFlags", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount_v2",
                 "nvmlDeviceGetHandleByIndex_v2", "nvmlDeviceGetName", "nvmlDeviceGetUUID",
                 "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo"}
        names |= {family + suffix for family in FAMILIES for suffix in self.suffixes}
        if self.memory_v2:
            names.add("nvmlDeviceGetMemoryInfo_v2")
        if self.mig:
            names |= {"nvmlDeviceGetMigMode", "nvmlDeviceGetMaxMigDeviceCount", "nvmlDeviceGetMigDeviceHandleByIndex"}
        if self.conf_compute:
            names.add("nvmlDeviceGetConfComputeMemSizeInfo")
        if self.detail_list:
            names.add(DETAIL)
        return names


R418 = Driver("418.87.01", ("",))
R450 = Driver("450.66", ("", "_v2"), mig=True)
R510 = Driver("510.39.01", ("", "_v2", "_v3"), memory_v2=True, mig=True)
R535 = Driver("535.54.03", ("", "_v2", "_v3"), InfoV3, memory_v2=True, mig=True, conf_compute=True)
R550 = Driver("550.54.15", ("", "_v2", "_v3"), InfoV2, memory_v2=True, mig=True, conf_compute=True, detail_list=True)
DRIVERS = (R418, R450, R510, R535, R550)


# --- devices -----------------------------------------------------------------------------------

@dataclass
class FakeDevice:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * GIB
    used: int = 10 * GIB
    reserved: int = GIB  # v1 memory counts this as used, v2 does not
    util: int | None = 42  # None: NotSupported
    # (pid, bytes) or (pid, bytes, kind) with kind "compute", "graphics" or "mps"; bytes may be
    # NOT_AVAILABLE.
    processes: list = field(default_factory=list)
    # What a call answers instead of succeeding: C symbol, or an alias ("handle", "uuid", "name",
    # "memory_v1", "memory_v2", "util", "processes:compute|graphics|mps") -> NVML code. Live.
    fail: dict = field(default_factory=dict)

    def listed(self, kind: str) -> list[tuple[int, int]]:
        return [(p[0], p[1]) for p in self.processes if (p[2] if len(p) > 2 else "compute") == kind]


@dataclass
class FakeGpu(FakeDevice):
    mig: list[FakeDevice | None] | None = None  # None: no MIG on this GPU; a list: its MIG slots
    mig_enabled: bool = False


ALIASES = {"nvmlDeviceGetHandleByIndex_v2": "handle", "nvmlDeviceGetUUID": "uuid", "nvmlDeviceGetName": "name",
           "nvmlDeviceGetMemoryInfo": "memory_v1", "nvmlDeviceGetMemoryInfo_v2": "memory_v2",
           "nvmlDeviceGetUtilizationRates": "util"}

_copies = itertools.count()


def fresh_bindings() -> object:
    """The installed pynvml module, run again under a name of its own."""
    name = f"pynvml_under_fake_driver_{next(_copies)}"
    spec = importlib.util.spec_from_file_location(name, pynvml.__file__)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # it looks itself up there while it defines its error classes
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


class FakeNvml:
    """A driver over `gpus`; `module` is the bindings to hand the probe. `calls` counts each C
    call by symbol; `errors` collects exceptions raised inside the fake (a callback can't raise
    through C, so each becomes NVML_ERROR_UNKNOWN and is recorded here for the test to check)."""

    def __init__(self, gpus: list[FakeGpu], driver: Driver = R550, init_error: int | None = None,
                 count_error: int | None = None, missing: tuple[str, ...] = (), no_library: bool = False) -> None:
        self.gpus, self.driver = gpus, driver
        self.init_error, self.count_error = init_error, count_error
        self.shutdown_error: int | None = None
        self.calls: Counter = Counter()
        self.errors: list[str] = []
        self.before_read: Callable[[FakeDevice, str], None] | None = None  # runs between size query and read
        self.module = fresh_bindings()
        if no_library:
            self.module.CDLL = _no_library  # what a machine without libnvidia-ml.so.1 answers
            return
        self.lib = _Library()
        for symbol in sorted(driver.exports() - set(missing)):
            setattr(self.lib, symbol, self._export(symbol))
        self.module.nvmlLib = self.lib

    def unexport(self, symbol: str) -> None:
        """The driver loses `symbol` (for a binding that has not looked it up yet)."""
        delattr(self.lib, symbol)

    # --- plumbing --------------------------------------------------------------------------

    def _export(self, symbol: str):
        argtypes, impl = self._signature(symbol)

        def entry(*args):
            self.calls[symbol] += 1
            try:
                return impl(*args)
            except Exception:
                self.errors.append(f"{symbol}: {traceback.format_exc()}")
                return UNKNOWN
        return ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)(entry)

    def _signature(self, symbol: str) -> tuple[tuple, Callable[..., int]]:
        if symbol in FAMILIES or any(symbol == f + s for f in FAMILIES for s in ("_v2", "_v3")):
            return (c_void_p, c_void_p, c_void_p), lambda h, count, infos: self._processes(symbol, h, count, infos)
        return {
            "nvmlInitWithFlags": ((c_uint,), self._init),
            "nvmlShutdown": ((), lambda: self.shutdown_error or SUCCESS),
            "nvmlSystemGetDriverVersion": ((c_void_p, c_uint), lambda buf, size: _text(buf, size, self.driver.version)),
            "nvmlDeviceGetCount_v2": ((c_void_p,), self._count),
            "nvmlDeviceGetHandleByIndex_v2": ((c_uint, c_void_p), self._handle),
            "nvmlDeviceGetName": ((c_void_p, c_void_p, c_uint), lambda h, buf, n: self._string(symbol, h, buf, n)),
            "nvmlDeviceGetUUID": ((c_void_p, c_void_p, c_uint), lambda h, buf, n: self._string(symbol, h, buf, n)),
            "nvmlDeviceGetMemoryInfo": ((c_void_p, c_void_p), lambda h, out: self._memory(symbol, h, out)),
            "nvmlDeviceGetMemoryInfo_v2": ((c_void_p, c_void_p), lambda h, out: self._memory(symbol, h, out)),
            "nvmlDeviceGetUtilizationRates": ((c_void_p, c_void_p), self._util),
            "nvmlDeviceGetMigMode": ((c_void_p, c_void_p, c_void_p), self._mig_mode),
            "nvmlDeviceGetMaxMigDeviceCount": ((c_void_p, c_void_p), self._mig_count),
            "nvmlDeviceGetMigDeviceHandleByIndex": ((c_void_p, c_uint, c_void_p), self._mig_handle),
            "nvmlDeviceGetConfComputeMemSizeInfo": ((c_void_p, c_void_p), lambda h, out: NOT_SUPPORTED),
            DETAIL: ((c_void_p, c_void_p), self._detail),
        }[symbol]

    def _device(self, handle: int | None, symbol: str, kind: str | None = None) -> tuple[FakeDevice | None, int]:
        """The device behind `handle` and the code it must answer `symbol` with."""
        device = self._devices().get(handle or 0)
        if device is None:
            return None, INVALID_ARGUMENT
        for name in (symbol, ALIASES.get(symbol), kind and f"processes:{kind}"):
            if name in device.fail:
                return device, device.fail[name]
        return device, SUCCESS

    def _devices(self) -> dict[int, FakeDevice]:
        """Handles: GPU i is 0x1000 * (i + 1); its MIG slot m adds 0x10 * (m + 1)."""
        out: dict[int, FakeDevice] = {}
        for i, gpu in enumerate(self.gpus):
            out[0x1000 * (i + 1)] = gpu
            for m, mig in enumerate(gpu.mig or ()):
                if mig is not None and gpu.mig_enabled:
                    out[0x1000 * (i + 1) + 0x10 * (m + 1)] = mig
        return out

    # --- the C functions -------------------------------------------------------------------

    def _init(self, flags: int) -> int:
        return SUCCESS if self.init_error is None else self.init_error

    def _count(self, out: int) -> int:
        if self.count_error is not None:
            return self.count_error
        c_uint.from_address(out).value = len(self.gpus)
        return SUCCESS

    def _handle(self, index: int, out: int) -> int:
        if index >= len(self.gpus):
            return INVALID_ARGUMENT
        code = self.gpus[index].fail.get("handle", self.gpus[index].fail.get("nvmlDeviceGetHandleByIndex_v2"))
        if code is not None:
            return code
        c_void_p.from_address(out).value = 0x1000 * (index + 1)
        return SUCCESS

    def _string(self, symbol: str, handle: int, buf: int, size: int) -> int:
        device, code = self._device(handle, symbol)
        if code:
            return code
        return _text(buf, size, device.uuid if symbol == "nvmlDeviceGetUUID" else device.name)

    def _memory(self, symbol: str, handle: int, out: int) -> int:
        device, code = self._device(handle, symbol)
        if code:
            return code
        free = device.total - device.used - device.reserved
        if symbol == "nvmlDeviceGetMemoryInfo":
            info = MemoryV1.from_address(out)
            info.total, info.free, info.used = device.total, free, device.used + device.reserved
            return SUCCESS
        info = MemoryV2.from_address(out)
        if info.version != MEMORY_V2:
            return ARGUMENT_VERSION_MISMATCH
        info.total, info.reserved, info.free, info.used = device.total, device.reserved, free, device.used
        return SUCCESS

    def _util(self, handle: int, out: int) -> int:
        device, code = self._device(handle, "nvmlDeviceGetUtilizationRates")
        if code:
            return code
        if device.util is None or not isinstance(device, FakeGpu):  # MIG devices have no utilization
            return NOT_SUPPORTED
        Utilization.from_address(out).gpu = device.util
        return SUCCESS

    def _mig_mode(self, handle: int, current: int, pending: int) -> int:
        device, code = self._device(handle, "nvmlDeviceGetMigMode")
        if code:
            return code
        if not isinstance(device, FakeGpu) or device.mig is None:
            return NOT_SUPPORTED
        c_uint.from_address(current).value = c_uint.from_address(pending).value = int(device.mig_enabled)
        return SUCCESS

    def _mig_count(self, handle: int, out: int) -> int:
        device, code = self._device(handle, "nvmlDeviceGetMaxMigDeviceCount")
        if code:
            return code
        if not isinstance(device, FakeGpu) or device.mig is None:
            return NOT_SUPPORTED
        c_uint.from_address(out).value = len(device.mig)
        return SUCCESS

    def _mig_handle(self, handle: int, index: int, out: int) -> int:
        device, code = self._device(handle, "nvmlDeviceGetMigDeviceHandleByIndex")
        if code:
            return code
        if not isinstance(device, FakeGpu) or not device.mig_enabled or index >= len(device.mig or ()):
            return INVALID_ARGUMENT
        if device.mig[index] is None:
            return NOT_FOUND
        c_void_p.from_address(out).value = handle + 0x10 * (index + 1)
        return SUCCESS

    def _processes(self, symbol: str, handle: int, count: int, infos: int | None) -> int:
        family = symbol.removesuffix("_v2").removesuffix("_v3")
        kind = FAMILIES[family]
        device, code = self._device(handle, symbol, kind)
        if code:
            return code
        # What this driver writes, and the smallest entry any caller of that symbol allocates.
        layouts = {"": (InfoV1, 16), "_v2": (InfoV2, 24), "_v3": (self.driver.v3_entry, 24)}
        entry, smallest = layouts[symbol[len(family):]]
        capacity = c_uint.from_address(count)
        return self._write(device, kind, entry, smallest, capacity, infos)

    def _detail(self, handle: int, request: int) -> int:
        plist = DetailList.from_address(request)
        if plist.version != DETAIL_LIST_V1:
            return ARGUMENT_VERSION_MISMATCH
        if plist.mode not in MODES:
            return INVALID_ARGUMENT
        device, code = self._device(handle, DETAIL, MODES[plist.mode])
        if code:
            return code
        counter = c_uint.from_address(request + DetailList.numProcArrayEntries.offset)
        return self._write(device, MODES[plist.mode], InfoV3, 32, counter, plist.procArray)

    def _write(self, device: FakeDevice, kind: str, entry: type, smallest: int, capacity: c_uint,
               array: int | None) -> int:
        """NVML's contract: no processes -> SUCCESS and 0; too little room (or no array) ->
        INSUFFICIENT_SIZE and the count needed; else the entries and their count. Never writes
        more bytes than the smallest buffer any caller of this call allocates for that count."""
        listed = device.listed(kind)
        if not listed:
            capacity.value = 0
            return SUCCESS
        if array is None or capacity.value < len(listed):
            capacity.value = len(listed)
            return INSUFFICIENT_SIZE
        if self.before_read is not None:
            hook, self.before_read = self.before_read, None
            hook(device, kind)
            listed = device.listed(kind)
            if capacity.value < len(listed):
                capacity.value = len(listed)
                return INSUFFICIENT_SIZE
        size = ctypes.sizeof(entry)
        assert len(listed) * size <= capacity.value * smallest, "the driver would write past the caller's buffer"
        for i, (pid, used) in enumerate(listed):
            e = entry.from_address(array + i * size)
            e.pid, e.usedGpuMemory = pid, used
            if hasattr(e, "gpuInstanceId"):
                e.gpuInstanceId = e.computeInstanceId = 0xFFFFFFFF  # not MIG
        capacity.value = len(listed)
        return SUCCESS


class _Library:
    """Stands where the CDLL would: an attribute per exported C symbol."""


def _text(buf: int, size: int, value: str) -> int:
    data = value.encode() + b"\0"
    if len(data) > size:
        return INSUFFICIENT_SIZE
    ctypes.memmove(buf, data, len(data))
    return SUCCESS


def _no_library(name: str, *args, **kwargs):
    raise OSError(f"{name}: cannot open shared object file: No such file or directory")


@pytest.fixture
def fakes():
    """Makes FakeNvml drivers, and fails the test if any of them broke inside a C callback."""
    made: list[FakeNvml] = []

    def make(gpus: list[FakeGpu], **kwargs) -> FakeNvml:
        made.append(FakeNvml(gpus, **kwargs))
        return made[-1]
    yield make
    for fake in made:
        assert not fake.errors, fake.errors[0]
