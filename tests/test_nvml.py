"""NvmlProbe over the real nvidia-ml-py bindings and a fake driver (nvml_fake): no GPU and no
NVIDIA library is needed (or touched)."""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

import psutil
import pytest

from gpu_compete.gpus.base import UNKNOWN_USER, NoDriverError, ScopeError, current_user
from gpu_compete.gpus.nvml import NvmlProbe, NvmlWarning

from .nvml_fake import (ARGUMENT_VERSION_MISMATCH, DETAIL, DRIVER_NOT_LOADED, FUNCTION_NOT_FOUND, GIB,
                        GPU_IS_LOST, NO_PERMISSION, NOT_AVAILABLE, NOT_SUPPORTED, STRINGS, UNKNOWN, FakeGpu,
                        FakeNvml, fakes)

__all__ = ["FakeGpu", "FakeNvml", "GPU_IS_LOST", "NOT_SUPPORTED", "PROCESS_CALLS", "fakes"]

# The fake driver lives in nvml_fake; these names stay importable from here (test_faults uses them).
PROCESS_CALLS = (DETAIL, "nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2",
                 "nvmlDeviceGetComputeRunningProcesses")


def three_gpus() -> list[FakeGpu]:
    return [FakeGpu("GPU-aaaa1111-0000"), FakeGpu("GPU-bbbb2222-0000"), FakeGpu("GPU-cccc3333-0000")]


def probe_over(fake: FakeNvml, scope: str | None = "all", environ: dict | None = None) -> NvmlProbe:
    return NvmlProbe(scope=scope, pynvml_module=fake.module, environ={} if environ is None else environ)


def missing_pid() -> int:
    """A pid no process has here, still under Linux's pid limit (above it, NVML's list is garbled)."""
    pid = 4_190_000
    while psutil.pid_exists(pid):
        pid += 1
    return pid


# --- no driver ----------------------------------------------------------------------------------

def test_no_library_is_one_plain_sentence(fakes):
    """Without libnvidia-ml.so.1 (the real binding's CDLL fails), a NoDriverError points at --simulate."""
    with pytest.raises(NoDriverError) as info:
        probe_over(fakes(three_gpus(), no_library=True))
    message = str(info.value)
    assert "no NVIDIA driver" in message and "--simulate 4x24" in message and "\n" not in message


def test_driver_not_loaded_is_one_plain_sentence(fakes):
    """A library whose driver is not loaded gives the same NoDriverError."""
    with pytest.raises(NoDriverError, match="no NVIDIA driver.*--simulate 4x24"):
        probe_over(fakes(three_gpus(), init_error=DRIVER_NOT_LOADED))


def test_missing_pynvml_module_is_no_driver(monkeypatch):
    """If nvidia-ml-py cannot be imported at all, the same NoDriverError comes out, not an ImportError."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(NoDriverError, match="--simulate"):
        NvmlProbe(environ={})


def test_other_init_errors_carry_the_nvml_message(fakes):
    """An init failure other than "no driver" is still a NoDriverError, with NVML's own reason."""
    with pytest.raises(NoDriverError, match="Insufficient Permissions"):
        probe_over(fakes(three_gpus(), init_error=NO_PERMISSION))


def test_count_failure_after_init_shuts_nvml_down(fakes):
    """If NVML starts but cannot count GPUs, the probe says so and leaves NVML shut down."""
    fake = fakes(three_gpus(), count_error=UNKNOWN)
    with pytest.raises(NoDriverError, match="Unknown Error"):
        probe_over(fake)
    assert fake.calls["nvmlShutdown"] == 1


# --- healthy reading ------------------------------------------------------------------------------

def test_healthy_snapshot_reads_v2_memory_util_and_names(fakes):
    """A healthy GPU reports v2 memory (used without reserved), utilization, str uuid/name, its key."""
    gpus = three_gpus()
    gpus[1].name = "NVIDIA A100"
    snaps = probe_over(fakes(gpus)).snapshot()
    assert [s.index for s in snaps] == [0, 1, 2] and [s.key for s in snaps] == ["0", "1", "2"]
    s = snaps[1]
    assert (s.uuid, s.name, s.available, s.error) == ("GPU-bbbb2222-0000", "NVIDIA A100", True, None)
    assert (s.total_bytes, s.used_bytes, s.free_bytes, s.utilization) == (80 * GIB, 10 * GIB, 69 * GIB, 42)
    assert s.cuda_visible == "1" and s.processes_known


# --- lost and unsupported -------------------------------------------------------------------------

@pytest.mark.parametrize("call", ["handle", "memory_v2"])
@pytest.mark.parametrize("code", [GPU_IS_LOST, NO_PERMISSION, UNKNOWN])
def test_lost_gpu_among_good_ones_and_its_return(fakes, call, code):
    """A failing GPU is an unavailable snapshot with a reason, the others read fine, and it comes back."""
    fake = fakes(three_gpus())
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


def test_unexpected_exception_is_an_unavailable_gpu_not_a_crash(fakes):
    """A non-NVML exception inside one GPU's reading is contained in that GPU's snapshot."""
    fake = fakes(three_gpus())
    real = fake.module.nvmlDeviceGetUtilizationRates

    def buggy(handle):  # stands for a bug anywhere between the probe and the driver
        return 1 / 0 if ctypes.cast(handle, ctypes.c_void_p).value == 0x3000 else real(handle)
    fake.module.nvmlDeviceGetUtilizationRates = buggy
    with pytest.warns(NvmlWarning):
        snaps = probe_over(fake).snapshot()
    assert snaps[2].available is False and "ZeroDivisionError" in snaps[2].error
    assert snaps[0].available and snaps[0].utilization == 42


def test_gpu_lost_during_process_call_is_unavailable(fakes):
    """GpuIsLost from any call (here the process list) marks the GPU unavailable, not just process-less."""
    fake = fakes(three_gpus())
    fake.gpus[0].fail[DETAIL] = GPU_IS_LOST
    with pytest.warns(NvmlWarning):
        snap = probe_over(fake).snapshot()[0]
    assert snap.available is False and snap.error == "GPU is lost"


def test_gpu_lost_at_startup_keeps_its_index_and_gets_its_uuid_later(fakes):
    """A GPU that fails during enumeration stays in scope, unavailable, and is named once it answers."""
    fake = fakes(three_gpus())
    fake.gpus[2].fail["uuid"] = GPU_IS_LOST
    probe = probe_over(fake)
    assert probe.indices == [0, 1, 2]
    del fake.gpus[2].fail["uuid"]
    snap = probe.snapshot()[2]
    assert snap.available and snap.uuid == "GPU-cccc3333-0000" and snap.name == "NVIDIA H100 80GB HBM3"


def test_not_supported_memory_util_and_processes(fakes):
    """NotSupported memory (both versions) and utilization give None but stay available; a compute
    process list that is NotSupported is unknown (not empty), and says why."""
    fake = fakes(three_gpus())
    g = fake.gpus[0]
    g.fail.update({"memory_v2": NOT_SUPPORTED, "memory_v1": NOT_SUPPORTED, "util": NOT_SUPPORTED,
                   "processes:compute": NOT_SUPPORTED})
    g.processes = [(os.getpid(), GIB)]
    with pytest.warns(NvmlWarning, match="process list unavailable: Not Supported"):
        snap = probe_over(fake).snapshot()[0]
    assert snap.available is True
    assert (snap.total_bytes, snap.used_bytes, snap.free_bytes, snap.utilization) == (None, None, None, None)
    assert snap.processes == () and snap.processes_known is False
    assert snap.error == "process list unavailable: Not Supported"


# --- fallbacks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [FUNCTION_NOT_FOUND, NOT_SUPPORTED, ARGUMENT_VERSION_MISMATCH])
def test_memory_v2_falls_back_to_v1_and_remembers(fakes, code):
    """When v2 memory is refused, v1 is used (reserved counted as used) and v2 is not asked again."""
    fake = fakes(three_gpus())
    fake.gpus[0].fail["memory_v2"] = code
    probe = probe_over(fake, scope="0")
    for _ in range(3):
        snap = probe.snapshot()[0]
        assert snap.available and snap.used_bytes == 11 * GIB and snap.error is None
    assert fake.calls["nvmlDeviceGetMemoryInfo_v2"] == 1 and fake.calls["nvmlDeviceGetMemoryInfo"] == 3


@pytest.mark.parametrize("drop_v2_constant", [False, True])
def test_old_binding_without_memory_versions_uses_v1(fakes, drop_v2_constant):
    """An nvidia-ml-py without the `version` argument (or nvmlMemory_v2) still reads memory via v1."""
    fake = fakes(three_gpus())
    if drop_v2_constant:
        del fake.module.nvmlMemory_v2
    else:
        real = fake.module.nvmlDeviceGetMemoryInfo
        fake.module.nvmlDeviceGetMemoryInfo = lambda handle: real(handle)  # the old signature
    probe = probe_over(fake, scope="0")
    assert [probe.snapshot()[0].used_bytes for _ in range(2)] == [11 * GIB, 11 * GIB]
    assert fake.calls["nvmlDeviceGetMemoryInfo"] == 2 and fake.calls["nvmlDeviceGetMemoryInfo_v2"] == 0


# --- processes ----------------------------------------------------------------------------------

def test_process_owners_own_other_and_invisible_pids(fakes):
    """Owners come from psutil: us for our pid, whoever owns pid 1, and "unknown" for an invisible pid."""
    try:
        init_owner = psutil.Process(1).username()
    except (psutil.Error, KeyError):
        init_owner = UNKNOWN_USER
    ghost = missing_pid()
    fake = fakes(three_gpus())
    fake.gpus[0].processes = [(os.getpid(), GIB), (1, 2 * GIB), (ghost, 3 * GIB)]
    by_pid = {p.pid: p for p in probe_over(fake).snapshot()[0].processes}
    assert by_pid[os.getpid()].user == current_user()
    assert by_pid[1].user == init_owner
    assert by_pid[ghost].user == UNKNOWN_USER and by_pid[ghost].used_bytes == 3 * GIB


def test_unknown_process_memory_is_none_not_zero(fakes):
    """usedGpuMemory of NVML's not-available value is used_bytes None; a real 0 stays 0."""
    fake = fakes(three_gpus())
    fake.gpus[0].processes = [(os.getpid(), NOT_AVAILABLE), (1, NOT_AVAILABLE), (missing_pid(), 0)]
    used = [p.used_bytes for p in probe_over(fake).snapshot()[0].processes]
    assert used == [None, None, 0]


def test_duplicate_pids_are_listed_once(fakes):
    """A pid NVML lists twice on one GPU appears once in the snapshot, with the larger figure."""
    fake = fakes(three_gpus())
    fake.gpus[0].processes = [(os.getpid(), GIB), (os.getpid(), 2 * GIB)]
    assert [(p.pid, p.used_bytes) for p in probe_over(fake).snapshot()[0].processes] == [(os.getpid(), 2 * GIB)]


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
def test_scope_picks_gpus(fakes, scope, environ, expected):
    """--gpus (indices, UUIDs, prefixes) and CUDA_VISIBLE_DEVICES choose which GPUs are snapshotted."""
    probe = probe_over(fakes(three_gpus()), scope=scope, environ=environ)
    assert probe.indices == expected and probe.keys == [str(i) for i in expected]
    assert [s.index for s in probe.snapshot()] == expected


@pytest.mark.parametrize("scope, environ", [("5", {}), ("GPU-zzzz", {}), ("all", {"CUDA_VISIBLE_DEVICES": ""}),
                                            ("all", {"CUDA_VISIBLE_DEVICES": "7"})])
def test_bad_scope_is_a_scope_error_and_shuts_nvml_down(fakes, scope, environ):
    """A GPU that does not exist (or an empty CUDA_VISIBLE_DEVICES) is a ScopeError, with NVML shut down."""
    fake = fakes(three_gpus())
    with pytest.raises(ScopeError):
        probe_over(fake, scope=scope, environ=environ)
    assert fake.calls["nvmlShutdown"] == 1


# --- life cycle and warnings ---------------------------------------------------------------------

def test_init_once_and_shutdown_once(fakes):
    """nvmlInit runs once however many snapshots follow, and close() shuts down once even when repeated."""
    fake = fakes(three_gpus())
    probe = probe_over(fake)
    for _ in range(4):
        probe.snapshot()
    assert fake.calls["nvmlInitWithFlags"] == 1 and fake.calls["nvmlShutdown"] == 0
    assert fake.calls["nvmlDeviceGetHandleByIndex_v2"] == 3 + 4 * 3  # enumeration, then every snapshot
    probe.close()
    probe.close()
    assert fake.calls["nvmlShutdown"] == 1


def test_close_ignores_shutdown_errors(fakes):
    """A failing nvmlShutdown does not raise out of close()."""
    fake = fakes(three_gpus())
    probe = probe_over(fake)
    fake.shutdown_error = UNKNOWN
    probe.close()
    assert fake.calls["nvmlShutdown"] == 1


def test_warnings_once_per_state_change(fakes):
    """A lost GPU warns when it is lost (and again if it is lost again), not on every snapshot."""
    fake = fakes(three_gpus())
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


def _gpu_of(handle) -> int:
    """The fake driver's handle for GPU i is 0x1000 * (i + 1)."""
    return ctypes.cast(handle, ctypes.c_void_p).value // 0x1000 - 1


def test_topology_groups_gpus_under_one_pcie_switch(fakes):
    """GPUs joined by PCIe switches only share a group; across a host bridge they don't."""
    fake = fakes([FakeGpu(f"GPU-{i}") for i in range(4)])
    levels = {(0, 2): 20, (1, 3): 10}  # MULTIPLE, SINGLE; every other pair crosses the CPU (40)
    fake.module.nvmlDeviceGetTopologyCommonAncestor = \
        lambda a, b: levels.get(tuple(sorted((_gpu_of(a), _gpu_of(b)))), 40)
    assert [s.group for s in probe_over(fake).snapshot()] == ["pcie0", "pcie1", "pcie0", "pcie1"]


def test_topology_falls_back_to_the_numa_node_then_to_nothing(fakes):
    """Where the driver lacks the ancestor call the NUMA node groups GPUs; lacking both, no groups."""
    fake = fakes([FakeGpu(f"GPU-{i}") for i in range(3)])
    fake.module.nvmlDeviceGetNumaNodeId = lambda h: [0, 1, 0][_gpu_of(h)]
    assert [s.group for s in probe_over(fake).snapshot()] == ["numa0", "numa1", "numa0"]
    plain = fakes([FakeGpu(f"GPU-{i}") for i in range(3)])
    assert [s.group for s in probe_over(plain).snapshot()] == [None] * 3
