"""NvmlProbe against a fake pynvml module: no GPU and no NVIDIA library is needed (or touched)."""

from __future__ import annotations

import os
import sys
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

import psutil
import pytest

from gpu_compete.gpus.base import UNKNOWN_USER, NoDriverError, ScopeError, current_user
from gpu_compete.gpus.nvml import NvmlProbe, NvmlWarning

# --- a small fake of nvidia-ml-py -------------------------------------------------------------

LIBRARY_NOT_FOUND, DRIVER_NOT_LOADED, NOT_SUPPORTED, NO_PERMISSION = 12, 9, 3, 4
FUNCTION_NOT_FOUND, GPU_IS_LOST, ARGUMENT_VERSION_MISMATCH, UNKNOWN = 13, 15, 25, 999
CODES = {
    "NVML_ERROR_LIBRARY_NOT_FOUND": LIBRARY_NOT_FOUND, "NVML_ERROR_DRIVER_NOT_LOADED": DRIVER_NOT_LOADED,
    "NVML_ERROR_NOT_SUPPORTED": NOT_SUPPORTED, "NVML_ERROR_NO_PERMISSION": NO_PERMISSION,
    "NVML_ERROR_FUNCTION_NOT_FOUND": FUNCTION_NOT_FOUND, "NVML_ERROR_GPU_IS_LOST": GPU_IS_LOST,
    "NVML_ERROR_ARGUMENT_VERSION_MISMATCH": ARGUMENT_VERSION_MISMATCH, "NVML_ERROR_UNKNOWN": UNKNOWN,
    "NVML_ERROR_RESET_REQUIRED": 16,
}
STRINGS = {LIBRARY_NOT_FOUND: "NVML Shared Library Not Found", DRIVER_NOT_LOADED: "Driver Not Loaded",
           NOT_SUPPORTED: "Not Supported", NO_PERMISSION: "Insufficient Permissions",
           FUNCTION_NOT_FOUND: "Function Not Found", GPU_IS_LOST: "GPU is lost", UNKNOWN: "Unknown Error"}
MEMORY_V2 = 0x02000028
NOT_AVAILABLE = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE read as an unsigned long long
GIB = 2**30
PROCESS_CALLS = ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2",
                 "nvmlDeviceGetComputeRunningProcesses")


class NVMLError(Exception):
    """Like pynvml's: carries the NVML code in `.value`; one subclass per code."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return STRINGS.get(self.value, f"NVML error {self.value}")


ERRORS = {code: type(f"NVMLError_{code}", (NVMLError,), {}) for code in CODES.values()}


def nvml_error(code: int) -> NVMLError:
    return ERRORS[code](code)


@dataclass
class FakeGpu:
    uuid: str
    name: str | bytes = "NVIDIA H100"
    total: int = 80 * GIB
    used: int = 10 * GIB
    reserved: int = GIB  # v1 counts this as used, v2 does not
    util: int = 42
    processes: list = field(default_factory=list)
    fail: dict = field(default_factory=dict)  # call ("handle", "memory_v2", "memory_v1", "util", "uuid",
    #                                          or a process-call name) -> NVML code it raises; editable live


class FakeNvml:
    """Builds a module object shaped like pynvml over a list of FakeGpu, counting every call."""

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None, count_error: int | None = None,
                 missing: tuple[str, ...] = (), old_memory_call: bool = False) -> None:
        self.gpus, self.calls = gpus, Counter()
        self.init_error, self.count_error = init_error, count_error
        self.missing = set(missing)  # symbols the driver lacks: the binding answers FunctionNotFound
        m = types.ModuleType("fake_pynvml")
        m.NVMLError = NVMLError
        for name, code in CODES.items():
            setattr(m, name, code)
        m.nvmlMemory_v2 = MEMORY_V2
        m.nvmlInit, m.nvmlShutdown = self.init, self.shutdown
        m.nvmlDeviceGetCount, m.nvmlDeviceGetHandleByIndex = self.count, self.handle
        m.nvmlDeviceGetUUID, m.nvmlDeviceGetName = self.uuid, self.name
        m.nvmlDeviceGetUtilizationRates = self.util
        m.nvmlDeviceGetMemoryInfo = self.memory_v1_only if old_memory_call else self.memory
        for call in PROCESS_CALLS:
            setattr(m, call, self.process_call(call))
        self.module = m

    def _call(self, what: str, index: int | None = None) -> None:
        self.calls[what] += 1
        if what in self.missing:
            raise nvml_error(FUNCTION_NOT_FOUND)
        if index is not None and what in self.gpus[index].fail:
            raise nvml_error(self.gpus[index].fail[what])

    def init(self) -> None:
        self._call("init")
        if self.init_error is not None:
            raise nvml_error(self.init_error)

    def shutdown(self) -> None:
        self._call("shutdown")

    def count(self) -> int:
        self._call("count")
        if self.count_error is not None:
            raise nvml_error(self.count_error)
        return len(self.gpus)

    def handle(self, index: int) -> int:
        self._call("handle", index)
        return index  # a handle is opaque to the probe; the index will do

    def uuid(self, h: int) -> bytes:
        self._call("uuid", h)
        return self.gpus[h].uuid.encode()  # old bindings return bytes

    def name(self, h: int) -> str | bytes:
        self._call("name", h)
        return self.gpus[h].name

    def util(self, h: int) -> SimpleNamespace:
        self._call("util", h)
        return SimpleNamespace(gpu=self.gpus[h].util, memory=0)

    def memory(self, h: int, version: int | None = None) -> SimpleNamespace:
        g = self.gpus[h]
        if version:
            assert version == MEMORY_V2
            self._call("memory_v2", h)
            return SimpleNamespace(total=g.total, reserved=g.reserved, used=g.used, free=g.total - g.used - g.reserved)
        self._call("memory_v1", h)
        return SimpleNamespace(total=g.total, used=g.used + g.reserved, free=g.total - g.used - g.reserved)

    def memory_v1_only(self, h: int) -> SimpleNamespace:  # nvidia-ml-py before the `version` argument
        return self.memory(h)

    def process_call(self, call: str):
        def processes(h: int) -> list[SimpleNamespace]:
            self._call(call, h)
            return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.gpus[h].processes]
        return processes


def three_gpus() -> list[FakeGpu]:
    return [FakeGpu("GPU-aaaa1111-0000"), FakeGpu("GPU-bbbb2222-0000"), FakeGpu("GPU-cccc3333-0000")]


def probe_over(fake: FakeNvml, scope: str | None = "all", environ: dict | None = None) -> NvmlProbe:
    return NvmlProbe(scope=scope, pynvml_module=fake.module, environ={} if environ is None else environ)


def missing_pid() -> int:
    pid = 2**22 + 12345
    while psutil.pid_exists(pid):
        pid += 1
    return pid


# --- no driver ----------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [LIBRARY_NOT_FOUND, DRIVER_NOT_LOADED])
def test_no_library_or_driver_is_one_plain_sentence(code):
    """A missing NVML library or unloaded driver is a NoDriverError that points at --simulate."""
    with pytest.raises(NoDriverError) as info:
        probe_over(FakeNvml(three_gpus(), init_error=code))
    message = str(info.value)
    assert "no NVIDIA driver" in message and "--simulate 4x24" in message and "\n" not in message


def test_missing_pynvml_module_is_no_driver(monkeypatch):
    """If nvidia-ml-py cannot be imported at all, the same NoDriverError comes out, not an ImportError."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(NoDriverError, match="--simulate"):
        NvmlProbe(environ={})


def test_other_init_errors_carry_the_nvml_message():
    """An init failure other than "no driver" is still a NoDriverError, with NVML's own reason."""
    with pytest.raises(NoDriverError, match="Insufficient Permissions"):
        probe_over(FakeNvml(three_gpus(), init_error=NO_PERMISSION))


def test_count_failure_after_init_shuts_nvml_down():
    """If NVML starts but cannot count GPUs, the probe says so and leaves NVML shut down."""
    fake = FakeNvml(three_gpus(), count_error=UNKNOWN)
    with pytest.raises(NoDriverError, match="Unknown Error"):
        probe_over(fake)
    assert fake.calls["shutdown"] == 1


# --- healthy reading ------------------------------------------------------------------------------

def test_healthy_snapshot_reads_v2_memory_util_and_decodes_bytes():
    """A healthy GPU reports v2 memory (used without reserved), utilization, and str uuid/name."""
    gpus = three_gpus()
    gpus[1].name = b"NVIDIA A100"
    snaps = probe_over(FakeNvml(gpus)).snapshot()
    assert [s.index for s in snaps] == [0, 1, 2]
    s = snaps[1]
    assert (s.uuid, s.name, s.available, s.error) == ("GPU-bbbb2222-0000", "NVIDIA A100", True, None)
    assert (s.total_bytes, s.used_bytes, s.free_bytes, s.utilization) == (80 * GIB, 10 * GIB, 69 * GIB, 42)


# --- lost and unsupported -------------------------------------------------------------------------

@pytest.mark.parametrize("call", ["handle", "memory_v2"])
@pytest.mark.parametrize("code", [GPU_IS_LOST, NO_PERMISSION, UNKNOWN])
def test_lost_gpu_among_good_ones_and_its_return(call, code):
    """A failing GPU is an unavailable snapshot with a reason, the others read fine, and it comes back."""
    fake = FakeNvml(three_gpus())
    probe = probe_over(fake)
    fake.gpus[1].fail[call] = code
    with pytest.warns(NvmlWarning):
        snaps = probe.snapshot()
    lost = snaps[1]
    assert (lost.available, lost.uuid, lost.total_bytes, lost.processes) == (False, "GPU-bbbb2222-0000", None, ())
    assert lost.error == STRINGS[code]
    assert all(s.available and s.error is None for s in (snaps[0], snaps[2]))
    del fake.gpus[1].fail[call]
    back = probe.snapshot()[1]
    assert back.available and back.error is None and back.total_bytes == 80 * GIB


def test_unexpected_exception_is_an_unavailable_gpu_not_a_crash():
    """A non-NVML exception inside one GPU's reading is contained in that GPU's snapshot."""
    fake = FakeNvml(three_gpus())
    fake.module.nvmlDeviceGetUtilizationRates = lambda h: 1 / 0 if h == 2 else SimpleNamespace(gpu=5)
    with pytest.warns(NvmlWarning):
        snaps = probe_over(fake).snapshot()
    assert snaps[2].available is False and "ZeroDivisionError" in snaps[2].error
    assert snaps[0].available and snaps[0].utilization == 5


def test_gpu_lost_during_process_call_is_unavailable():
    """GpuIsLost from any call (here the process list) marks the GPU unavailable, not just process-less."""
    fake = FakeNvml(three_gpus())
    fake.gpus[0].fail["nvmlDeviceGetComputeRunningProcesses_v3"] = GPU_IS_LOST
    with pytest.warns(NvmlWarning):
        snap = probe_over(fake).snapshot()[0]
    assert snap.available is False and snap.error == "GPU is lost"


def test_gpu_lost_at_startup_keeps_its_index_and_gets_its_uuid_later():
    """A GPU that fails during enumeration stays in scope, unavailable, and is named once it answers."""
    fake = FakeNvml(three_gpus())
    fake.gpus[2].fail["uuid"] = GPU_IS_LOST
    probe = probe_over(fake)
    assert probe.indices == [0, 1, 2]
    del fake.gpus[2].fail["uuid"]
    snap = probe.snapshot()[2]
    assert snap.available and snap.uuid == "GPU-cccc3333-0000" and snap.name == "NVIDIA H100"


def test_not_supported_memory_util_and_processes():
    """NotSupported memory (both versions), utilization and process list give None / () but stay available."""
    fake = FakeNvml(three_gpus())
    g = fake.gpus[0]
    g.fail.update({"memory_v2": NOT_SUPPORTED, "memory_v1": NOT_SUPPORTED, "util": NOT_SUPPORTED})
    for call in PROCESS_CALLS:
        g.fail[call] = NOT_SUPPORTED
    g.processes = [(os.getpid(), GIB)]
    with pytest.warns(NvmlWarning, match="process list unavailable"):
        snap = probe_over(fake).snapshot()[0]
    assert snap.available is True
    assert (snap.total_bytes, snap.used_bytes, snap.free_bytes, snap.utilization) == (None, None, None, None)
    assert snap.processes == () and snap.error == "process list unavailable"


# --- fallbacks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [FUNCTION_NOT_FOUND, NOT_SUPPORTED, ARGUMENT_VERSION_MISMATCH])
def test_memory_v2_falls_back_to_v1_and_remembers(code):
    """When v2 memory is refused, v1 is used (reserved counted as used) and v2 is not asked again."""
    fake = FakeNvml(three_gpus())
    fake.gpus[0].fail["memory_v2"] = code
    probe = probe_over(fake, scope="0")
    for _ in range(3):
        snap = probe.snapshot()[0]
        assert snap.available and snap.used_bytes == 11 * GIB and snap.error is None
    assert fake.calls["memory_v2"] == 1 and fake.calls["memory_v1"] == 3


@pytest.mark.parametrize("drop_v2_constant", [False, True])
def test_old_binding_without_memory_versions_uses_v1(drop_v2_constant):
    """An nvidia-ml-py without the `version` argument (or nvmlMemory_v2) still reads memory via v1."""
    fake = FakeNvml(three_gpus(), old_memory_call=not drop_v2_constant)
    if drop_v2_constant:
        del fake.module.nvmlMemory_v2
    probe = probe_over(fake, scope="0")
    assert [probe.snapshot()[0].used_bytes for _ in range(2)] == [11 * GIB, 11 * GIB]
    assert fake.calls["memory_v1"] == 2


def test_process_call_falls_back_v3_v2_plain_and_remembers():
    """Process calls the driver lacks are skipped in order v3, v2, plain, and not retried later."""
    v3, v2, plain = PROCESS_CALLS
    fake = FakeNvml(three_gpus(), missing=(v3, v2))
    fake.gpus[0].processes = [(os.getpid(), 2 * GIB)]
    probe = probe_over(fake)
    for _ in range(2):
        snaps = probe.snapshot()
        assert snaps[0].processes[0].pid == os.getpid() and all(s.error is None for s in snaps)
    assert (fake.calls[v3], fake.calls[v2], fake.calls[plain]) == (1, 1, 6)


def test_process_call_missing_from_binding_uses_the_next():
    """A binding without the _v3 attribute at all goes straight to _v2."""
    v3, v2, plain = PROCESS_CALLS
    fake = FakeNvml(three_gpus())
    delattr(fake.module, v3)
    probe_over(fake, scope="0").snapshot()
    assert (fake.calls[v2], fake.calls[plain]) == (1, 0)


# --- processes ----------------------------------------------------------------------------------

def test_process_owners_own_other_and_invisible_pids():
    """Owners come from psutil: us for our pid, whoever owns pid 1, and "unknown" for an invisible pid."""
    try:
        init_owner = psutil.Process(1).username()
    except (psutil.Error, KeyError):
        init_owner = UNKNOWN_USER
    ghost = missing_pid()
    fake = FakeNvml(three_gpus())
    fake.gpus[0].processes = [(os.getpid(), GIB), (1, 2 * GIB), (ghost, 3 * GIB)]
    by_pid = {p.pid: p for p in probe_over(fake).snapshot()[0].processes}
    assert by_pid[os.getpid()].user == current_user()
    assert by_pid[1].user == init_owner
    assert by_pid[ghost].user == UNKNOWN_USER and by_pid[ghost].used_bytes == 3 * GIB


def test_unknown_process_memory_is_none_not_zero():
    """usedGpuMemory None or the NVML not-available sentinel is used_bytes None; a real 0 stays 0."""
    fake = FakeNvml(three_gpus())
    fake.gpus[0].processes = [(os.getpid(), None), (1, NOT_AVAILABLE), (missing_pid(), 0)]
    used = [p.used_bytes for p in probe_over(fake).snapshot()[0].processes]
    assert used == [None, None, 0]


def test_duplicate_pids_are_listed_once():
    """A pid NVML lists twice on one GPU appears once in the snapshot."""
    fake = FakeNvml(three_gpus())
    fake.gpus[0].processes = [(os.getpid(), GIB), (os.getpid(), GIB)]
    assert [p.pid for p in probe_over(fake).snapshot()[0].processes] == [os.getpid()]


# --- scope ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scope, environ, expected", [
    ("all", {}, [0, 1, 2]),
    (None, {}, [0, 1, 2]),
    ("0,2", {}, [0, 2]),
    ("GPU-bbbb2222-0000", {}, [1]),
    ("GPU-cccc", {}, [2]),
    ("all", {"CUDA_VISIBLE_DEVICES": "1,2"}, [1, 2]),
    ("all", {"CUDA_VISIBLE_DEVICES": "GPU-aaaa"}, [0]),
    ("1", {"CUDA_VISIBLE_DEVICES": "0"}, [1]),
])
def test_scope_picks_gpus(scope, environ, expected):
    """--gpus (indices, UUIDs, prefixes) and CUDA_VISIBLE_DEVICES choose which GPUs are snapshotted."""
    probe = probe_over(FakeNvml(three_gpus()), scope=scope, environ=environ)
    assert probe.indices == expected
    assert [s.index for s in probe.snapshot()] == expected


@pytest.mark.parametrize("scope, environ", [("5", {}), ("GPU-zzzz", {}), ("all", {"CUDA_VISIBLE_DEVICES": ""}),
                                            ("all", {"CUDA_VISIBLE_DEVICES": "7"})])
def test_bad_scope_is_a_scope_error_and_shuts_nvml_down(scope, environ):
    """A GPU that does not exist (or an empty CUDA_VISIBLE_DEVICES) is a ScopeError, with NVML shut down."""
    fake = FakeNvml(three_gpus())
    with pytest.raises(ScopeError):
        probe_over(fake, scope=scope, environ=environ)
    assert fake.calls["shutdown"] == 1


# --- life cycle and warnings ---------------------------------------------------------------------

def test_init_once_and_shutdown_once():
    """nvmlInit runs once however many snapshots follow, and close() shuts down once even when repeated."""
    fake = FakeNvml(three_gpus())
    probe = probe_over(fake)
    for _ in range(4):
        probe.snapshot()
    assert fake.calls["init"] == 1 and fake.calls["shutdown"] == 0
    assert fake.calls["handle"] == 3 + 4 * 3  # enumeration, then re-acquired every snapshot
    probe.close()
    probe.close()
    assert fake.calls["shutdown"] == 1


def test_close_ignores_shutdown_errors():
    """A failing nvmlShutdown does not raise out of close()."""
    fake = FakeNvml(three_gpus())
    probe = probe_over(fake)
    fake.module.nvmlShutdown = lambda: (_ for _ in ()).throw(nvml_error(UNKNOWN))
    probe.close()


def test_warnings_once_per_state_change():
    """A lost GPU warns when it is lost (and again if it is lost again), not on every snapshot."""
    fake = FakeNvml(three_gpus())
    probe = probe_over(fake)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fake.gpus[1].fail["handle"] = GPU_IS_LOST
        for _ in range(3):
            probe.snapshot()
        assert len(caught) == 1 and issubclass(caught[0].category, NvmlWarning)
        assert "GPU 1" in str(caught[0].message) and "GPU is lost" in str(caught[0].message)
        fake.gpus[1].fail["handle"] = NO_PERMISSION  # a different failure is a new state
        probe.snapshot()
        del fake.gpus[1].fail["handle"]
        for _ in range(2):
            probe.snapshot()
        assert len(caught) == 2
        fake.gpus[1].fail["handle"] = GPU_IS_LOST
        probe.snapshot()
        probe.snapshot()
    assert len(caught) == 3


def test_topology_groups_gpus_under_one_pcie_switch():
    """GPUs joined by PCIe switches only share a group; across a host bridge they don't."""
    fake = FakeNvml([FakeGpu(f"GPU-{i}") for i in range(4)])
    levels = {(0, 2): 20, (1, 3): 10}  # MULTIPLE, SINGLE; every other pair crosses the CPU
    fake.module.nvmlDeviceGetTopologyCommonAncestor = lambda a, b: levels.get((min(a, b), max(a, b)), 40)
    probe = probe_over(fake)
    assert [s.group for s in probe.snapshot()] == ["pcie0", "pcie1", "pcie0", "pcie1"]


def test_topology_falls_back_to_the_numa_node_then_to_nothing():
    """Without the ancestor call the NUMA node groups GPUs; without either, no groups at all."""
    fake = FakeNvml([FakeGpu(f"GPU-{i}") for i in range(3)])
    fake.module.nvmlDeviceGetNumaNodeId = lambda h: [0, 1, 0][h]
    assert [s.group for s in probe_over(fake).snapshot()] == ["numa0", "numa1", "numa0"]
    assert [s.group for s in probe_over(FakeNvml([FakeGpu(f"GPU-{i}") for i in range(3)])).snapshot()] == [None] * 3
