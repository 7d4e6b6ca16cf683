"""The NVML probe across driver generations and process-list failures, over the real
nvidia-ml-py bindings and a fake driver at the level of NVML's C functions (nvml_fake)."""

from __future__ import annotations

import os
import warnings

import psutil
import pytest

from gpu_compete.gpus.base import UNKNOWN_USER, current_user
from gpu_compete.gpus.nvml import NvmlProbe, NvmlWarning
from gpu_compete.gpus.nvml_processes import DETAIL as DETAIL_DIALECT
from gpu_compete.gpus.nvml_processes import V1, V2, V3, V3_R535
from gpu_compete.policy import build_views, fits

from .nvml_fake import (DETAIL, DRIVERS, GIB, GPU_IS_LOST, NO_PERMISSION, NOT_AVAILABLE, NOT_SUPPORTED, R418,
                        R450, R510, R535, R550, UNKNOWN, Driver, FakeGpu, InfoV3, fakes)

__all__ = ["fakes"]

ME = current_user()


def _stranger() -> int:
    """A pid no process has here (so no owner: not ours, whoever runs the tests), under Linux's
    pid limit."""
    pid = 4_190_000
    while psutil.pid_exists(pid):
        pid += 1
    return pid


OTHER = _stranger()


def probe_over(fake, scope: str = "all") -> NvmlProbe:
    return NvmlProbe(scope=scope, pynvml_module=fake.module, environ={})


def free_for_me(snap) -> bool:
    """What `gpu-compete gpus` prints: would an exclusive 1 GB task go there?"""
    return fits(build_views([snap], [], ME)[0], GIB, exclusive=True)


def ours_second() -> list:
    """Someone else's process listed first, ours second: the order R535 corrupts."""
    return [(OTHER, 3 * GIB), (os.getpid(), 5 * GIB)]


# --- driver generations -------------------------------------------------------------------------

@pytest.mark.parametrize("driver, dialect", [(R418, V1), (R450, V2), (R510, V3), (R535, V3_R535),
                                             (R550, DETAIL_DIALECT)], ids=lambda d: getattr(d, "version", ""))
def test_every_generation_lists_each_process_with_its_memory(fakes, driver, dialect):
    """On each driver generation the probe picks that driver's process call and layout, and our
    process listed second keeps its pid and memory, so our GPU is not "free for me"."""
    fake = fakes([FakeGpu("GPU-a", processes=ours_second())], driver=driver)
    probe = probe_over(fake)
    snap = probe.snapshot()[0]
    assert probe._processes.dialect is dialect
    assert [(p.pid, p.used_bytes) for p in snap.processes] == [(OTHER, 3 * GIB), (os.getpid(), 5 * GIB)]
    assert snap.user_processes(ME) and snap.processes_known and not free_for_me(snap)


def test_r535_corrupts_the_bindings_read_but_not_ours(fakes):
    """The fake writes R535's 32-byte entries: nvidia-ml-py's own _v3 call then reads our pid as 0
    (the reported bug, reproduced), while the probe reads it right and keeps the GPU busy."""
    fake = fakes([FakeGpu("GPU-a", processes=ours_second())], driver=R535)
    bindings = fake.module
    bindings.nvmlInit()
    handle = bindings.nvmlDeviceGetHandleByIndex(0)
    misread = [p.pid for p in bindings.nvmlDeviceGetComputeRunningProcesses_v3(handle)]
    assert misread == [OTHER, 0]
    snap = probe_over(fake).snapshot()[0]
    assert os.getpid() in {p.pid for p in snap.processes} and not free_for_me(snap)


def test_before_450_the_unversioned_binding_raises_and_the_probe_reads_v1(fakes):
    """A pre-450.66 driver has only the unversioned call: the binding's unversioned function raises
    NVMLLibraryMismatchError (not an NVMLError), and the probe reads the 16-byte v1 entries itself."""
    fake = fakes([FakeGpu("GPU-a", processes=ours_second())], driver=R418)
    bindings = fake.module
    bindings.nvmlInit()
    with pytest.raises(bindings.NVMLLibraryMismatchError):
        bindings.nvmlDeviceGetComputeRunningProcesses(bindings.nvmlDeviceGetHandleByIndex(0))
    assert not issubclass(bindings.NVMLLibraryMismatchError, bindings.NVMLError)
    snap = probe_over(fake).snapshot()[0]
    assert [p.pid for p in snap.processes] == [OTHER, os.getpid()]
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses"] == 2  # size query, then the read


def test_a_layout_nobody_recognised_is_refused_not_read_as_free(fakes):
    """A driver writing 32-byte _v3 entries without R535's tell-tale symbol is misread; the
    impossible pid that results makes the list unknown (busy), not a list without us."""
    odd = Driver("999.0", ("", "_v2", "_v3"), InfoV3, memory_v2=True)
    fake = fakes([FakeGpu("GPU-a", processes=ours_second())], driver=odd)
    with pytest.warns(NvmlWarning, match="pid 0"):
        snap = probe_over(fake).snapshot()[0]
    assert snap.processes_known is False and snap.available and snap.free_bytes == 69 * GIB
    assert not free_for_me(snap)


def test_the_dialect_is_chosen_once(fakes):
    """The driver's symbols are looked up on the first read only, not every round."""
    fake = fakes([FakeGpu("GPU-a"), FakeGpu("GPU-b")], driver=R535)
    lookups = []
    real = fake.module._nvmlGetFunctionPointer
    fake.module._nvmlGetFunctionPointer = lambda name: (lookups.append(name), real(name))[1]
    probe = probe_over(fake)
    probe.snapshot()
    first = lookups.count(DETAIL) + lookups.count("nvmlDeviceGetConfComputeMemSizeInfo")
    for _ in range(3):
        probe.snapshot()
    assert first == 2 and lookups.count(DETAIL) + lookups.count("nvmlDeviceGetConfComputeMemSizeInfo") == 2


def test_detail_list_memory_not_available_is_none(fakes):
    """A process whose memory the driver can't say is None (unknown), through the detail list,
    whose nvidia-ml-py binding raises TypeError in that case."""
    fake = fakes([FakeGpu("GPU-a", processes=[(os.getpid(), NOT_AVAILABLE)])], driver=R550)
    bindings = fake.module
    bindings.nvmlInit()
    with pytest.raises(TypeError):
        bindings.nvmlDeviceGetRunningProcessDetailList(bindings.nvmlDeviceGetHandleByIndex(0),
                                                       bindings.nvmlProcessDetailList_v1, 0)
    snap = probe_over(fake).snapshot()[0]
    assert [(p.pid, p.used_bytes) for p in snap.processes] == [(os.getpid(), None)]


@pytest.mark.parametrize("driver", [R510, R550], ids=["v3", "detail"])
def test_processes_starting_between_size_query_and_read(fakes, driver):
    """When more processes start between NVML's size answer and the read than the room left for
    them, the probe asks again and lists them all."""
    gpu = FakeGpu("GPU-a", processes=[(OTHER, GIB)])
    fake = fakes([gpu], driver=driver)
    probe = probe_over(fake)

    def crowd(device, kind):
        if kind == "compute":
            device.processes += [(os.getpid(), GIB)] + [(OTHER + 1 + i, GIB) for i in range(20)]
    fake.before_read = crowd
    snap = probe.snapshot()[0]
    assert len(snap.processes) == 22 and os.getpid() in {p.pid for p in snap.processes}


# --- kinds of process ---------------------------------------------------------------------------

@pytest.mark.parametrize("driver", DRIVERS, ids=lambda d: d.version)
@pytest.mark.parametrize("kind", ["graphics", "mps"])
def test_a_graphics_or_mps_process_of_ours_makes_the_gpu_busy(fakes, driver, kind):
    """A 6 GB graphics context (or an MPS client) of ours counts like a compute process."""
    fake = fakes([FakeGpu("GPU-a", processes=[(os.getpid(), 6 * GIB, kind)])], driver=driver)
    snap = probe_over(fake).snapshot()[0]
    assert [(p.pid, p.used_bytes, p.user) for p in snap.processes] == [(os.getpid(), 6 * GIB, ME)]
    assert not free_for_me(snap)


def test_a_process_in_two_lists_is_one_process_with_the_larger_figure(fakes):
    """NVML reports a process's whole use in each list it is in: merged, the figure is not summed."""
    procs = [(os.getpid(), 4 * GIB, "compute"), (os.getpid(), 4 * GIB, "graphics"), (OTHER, NOT_AVAILABLE, "mps"),
             (OTHER, 2 * GIB, "compute")]
    fake = fakes([FakeGpu("GPU-a", processes=procs)])
    snap = probe_over(fake).snapshot()[0]
    assert sorted((p.pid, p.used_bytes) for p in snap.processes) == sorted([(os.getpid(), 4 * GIB), (OTHER, 2 * GIB)])


def test_graphics_not_supported_is_no_graphics_but_compute_not_supported_is_unknown(fakes):
    """A device that can't hold graphics contexts says NotSupported for them (MIG does): that list
    is empty. The compute list failing the same way leaves nothing known."""
    fake = fakes([FakeGpu("GPU-a", processes=[(OTHER, GIB)]), FakeGpu("GPU-b", processes=[(OTHER, GIB)])])
    fake.gpus[0].fail["processes:graphics"] = NOT_SUPPORTED
    fake.gpus[1].fail["processes:compute"] = NOT_SUPPORTED
    with pytest.warns(NvmlWarning):
        a, b = probe_over(fake).snapshot()
    assert a.processes_known and [p.pid for p in a.processes] == [OTHER] and free_for_me(a)
    assert b.processes_known is False and not free_for_me(b)


def test_a_driver_without_graphics_and_mps_calls_lists_compute_and_stops_asking(fakes):
    """Where the driver lacks the graphics and MPS calls, compute processes are still listed and the
    missing calls are not looked up again every round."""
    missing = tuple(f"nvmlDevice{f}RunningProcesses{s}" for f in ("GetGraphics", "GetMPSCompute")
                    for s in ("", "_v2", "_v3"))
    fake = fakes([FakeGpu("GPU-a", processes=ours_second())], driver=R510, missing=missing)
    probe = probe_over(fake)
    lookups = []
    real = fake.module._nvmlGetFunctionPointer
    fake.module._nvmlGetFunctionPointer = lambda name: (lookups.append(name), real(name))[1]
    for _ in range(3):
        snap = probe.snapshot()[0]
        assert snap.processes_known and len(snap.processes) == 2
    assert "nvmlDeviceGetGraphicsRunningProcesses_v3" in lookups
    assert lookups.count("nvmlDeviceGetGraphicsRunningProcesses_v3") == 1


# --- unreadable process lists -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["compute", "graphics", "mps"])
@pytest.mark.parametrize("code, why", [(NO_PERMISSION, "Insufficient Permissions"), (UNKNOWN, "Unknown Error")])
def test_an_unreadable_list_is_unknown_busy_in_exclusive_and_its_memory_still_counts(fakes, kind, code, why):
    """No permission or an unknown error on any kind of list: processes_known is False, the error
    says why, exclusive mode keeps off, and the memory reading is still there for shared mode."""
    fake = fakes([FakeGpu("GPU-a")])
    fake.gpus[0].fail[f"processes:{kind}"] = code
    with pytest.warns(NvmlWarning, match=f"GPU 0 .*process list unavailable: {why}"):
        snap = probe_over(fake).snapshot()[0]
    assert (snap.available, snap.processes_known, snap.processes) == (True, False, ())
    assert snap.error == f"process list unavailable: {why}"
    view = build_views([snap], [], ME)[0]
    assert not fits(view, GIB, exclusive=True) and fits(view, 69 * GIB, exclusive=False)


def test_one_warning_per_change_of_process_list_state(fakes):
    """An unreadable list warns once while it stays unreadable, and again when the reason changes."""
    fake = fakes([FakeGpu("GPU-a")])
    probe = probe_over(fake)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fake.gpus[0].fail[DETAIL] = NO_PERMISSION
        for _ in range(3):
            probe.snapshot()
        fake.gpus[0].fail[DETAIL] = NOT_SUPPORTED
        probe.snapshot()
        probe.snapshot()
        del fake.gpus[0].fail[DETAIL]
        assert probe.snapshot()[0].processes_known
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        "process list unavailable: Insufficient Permissions", "process list unavailable: Not Supported"]


# --- lost, memory ---------------------------------------------------------------------------------

@pytest.mark.parametrize("call", ["handle", "memory_v2", "util", DETAIL])
def test_a_gpu_lost_mid_run_is_unavailable_then_back(fakes, call):
    """GpuIsLost from any call in a later round makes that GPU unavailable, never free; the other
    GPU reads on, and the lost one is seen again when it answers."""
    fake = fakes([FakeGpu("GPU-a"), FakeGpu("GPU-b")])
    probe = probe_over(fake)
    assert all(s.available for s in probe.snapshot())
    fake.gpus[0].fail[call] = GPU_IS_LOST
    with pytest.warns(NvmlWarning, match="GPU 0 .*GPU is lost"):
        lost, fine = probe.snapshot()
    assert (lost.available, lost.error, lost.free_bytes) == (False, "GPU is lost", None) and fine.available
    assert not fits(build_views([lost], [], ME)[0], 0, exclusive=False)
    del fake.gpus[0].fail[call]
    assert probe.snapshot()[0].available


def test_a_driver_without_memory_v2_reads_v1(fakes):
    """Before R510 there is no nvmlDeviceGetMemoryInfo_v2: v1 is read (reserved counted as used)."""
    fake = fakes([FakeGpu("GPU-a")], driver=R450)
    probe = probe_over(fake)
    assert [probe.snapshot()[0].used_bytes for _ in range(2)] == [11 * GIB, 11 * GIB]
    assert fake.calls["nvmlDeviceGetMemoryInfo"] == 2


# --- gpustat's own scenarios (wookayin/gpustat test_gpustat.py), over this probe -----------------

MB = 2**20
GPUSTAT_PIDS = {48448, 153223, 192453, 194826}


def gpustat_gpus(erratic: list | None = None) -> list[FakeGpu]:
    """gpustat's three mocked GPUs: two with two processes each (48448 also holds a graphics
    context), and a third whose utilization and process lists are Not Supported, or which lists
    pids that exist nowhere (`erratic`)."""
    gpus = [FakeGpu("GPU-10fb0fbd-2696-43f3-467f-d280d906a107", "GeForce GTX TITAN 0", 12883853312, 8000 * MB, 0, 76,
                    [(48448, 4000 * MB), (153223, 4000 * MB), (48448, 4000 * MB, "graphics")]),
            FakeGpu("GPU-d1df4664-bb44-189c-7ad0-ab86c8cb30e2", "GeForce GTX TITAN 1", 12781551616, 9000 * MB, 0, 0,
                    [(192453, 3000 * MB), (194826, 6000 * MB)]),
            FakeGpu("GPU-50205d95-57b6-f541-2bcb-86c09afed564", "GeForce RTX 2", 12781551616, 0, 0, None,
                    erratic or [])]
    if erratic is None:
        gpus[2].fail.update({"processes:compute": NOT_SUPPORTED, "processes:graphics": NOT_SUPPORTED})
    return gpus


@pytest.mark.parametrize("driver", [R418, R450, R510, R535, R550], ids=lambda d: d.version)
def test_gpustat_basic_scenario(fakes, driver):
    """gpustat's basic scenario on each generation: memory, utilization (?? where unsupported),
    processes merged across compute and graphics, and (Not Supported) as unknown, not empty."""
    with pytest.warns(NvmlWarning, match="GPU 2 .*Not Supported"):
        snaps = probe_over(fakes(gpustat_gpus(), driver=driver)).snapshot()
    assert [s.name for s in snaps] == ["GeForce GTX TITAN 0", "GeForce GTX TITAN 1", "GeForce RTX 2"]
    assert [(s.used_bytes, s.total_bytes, s.utilization) for s in snaps] == [
        (8000 * MB, 12883853312, 76), (9000 * MB, 12781551616, 0), (0, 12781551616, None)]
    assert [(p.pid, p.used_bytes) for p in snaps[0].processes] == [(48448, 4000 * MB), (153223, 4000 * MB)]
    assert [(p.pid, p.used_bytes) for p in snaps[1].processes] == [(192453, 3000 * MB), (194826, 6000 * MB)]
    assert snaps[2].processes_known is False and snaps[2].error == "process list unavailable: Not Supported"


def test_gpustat_141_memory_v1_counts_reserved_so_v2_is_read(fakes):
    """gpustat #141: from R510 v1 memory counts the driver's reserved memory as used; v2 does not."""
    gpus = gpustat_gpus()
    for g in gpus:
        g.reserved = 99 * MB
    with pytest.warns(NvmlWarning):
        snaps = probe_over(fakes(gpus, driver=R510)).snapshot()
    assert [s.used_bytes for s in snaps] == [8000 * MB, 9000 * MB, 0]


def test_gpustat_nonexistent_pids_are_listed_as_unknown_owner(fakes, monkeypatch):
    """gpustat #16/#18/#95: pids NVML lists that don't exist here (one of them making psutil raise
    FileNotFoundError) are shown with owner "unknown"; the GPU is still read."""
    ghosts = [pid for pid in (99999, 99995) if not psutil.pid_exists(pid)]
    if len(ghosts) < 2:
        pytest.skip("gpustat's ghost pids exist on this machine")
    real = psutil.Process

    def process(pid=None):
        if pid == 99995:
            raise FileNotFoundError("/proc/99995/stat")
        return real(pid)
    monkeypatch.setattr(psutil, "Process", process)
    snaps = probe_over(fakes(gpustat_gpus(erratic=[(99999, 9999 * MB), (99995, 9995 * MB)]))).snapshot()
    assert snaps[2].available and snaps[2].processes_known and snaps[2].error is None
    assert [(p.pid, p.user) for p in snaps[2].processes] == [(99999, UNKNOWN_USER), (99995, UNKNOWN_USER)]


@pytest.mark.parametrize("code, message", [(GPU_IS_LOST, "GPU is lost"), (UNKNOWN, "Unknown Error")])
def test_gpustat_failing_one_gpu(fakes, code, message):
    """gpustat #125/#81: GPU 2's handle fails; it is unavailable with NVML's message and the
    other two read normally."""
    gpus = gpustat_gpus()
    gpus[2].fail["handle"] = code
    with pytest.warns(NvmlWarning, match=message):
        snaps = probe_over(fakes(gpus)).snapshot()
    assert (snaps[2].available, snaps[2].error, snaps[2].total_bytes) == (False, message, None)
    assert snaps[2].uuid == ""  # never answered, so never named
    assert all(s.available and s.error is None for s in snaps[:2])
    assert {p.pid for s in snaps for p in s.processes} == GPUSTAT_PIDS
