"""MIG devices as scheduling units, scope by MIG UUID, and NVML pids from another pid namespace."""

from __future__ import annotations

import os

import psutil
import pytest

from gpu_compete.gpus.base import (UNKNOWN_USER, GpuIdentity, GpuProcess, GpuSnapshot, ScopeError, current_user,
                                   listed_pids_visible, owner_of, pid_namespace_mismatch, resolve_keys,
                                   resolve_scope, without_owners)
from gpu_compete.gpus.nvml import NvmlProbe, NvmlWarning
from gpu_compete.policy import build_views, fits

from .nvml_fake import GIB, GPU_IS_LOST, R418, FakeDevice, FakeGpu, fakes

__all__ = ["fakes"]

ME = current_user()
A100 = "NVIDIA A100-SXM4-40GB"
SLICE_UUIDS = ["MIG-11111111-aaaa-5000-8000-000000000000", "MIG-22222222-bbbb-5000-8000-000000000000",
               "MIG-33333333-cccc-5000-8000-000000000000"]


def mig_a100(processes: tuple = ((), (), ())) -> FakeGpu:
    """A MIG-enabled A100 whose whole reading says 37 GB free, sliced 20/10/5 GB."""
    profiles = [("3g.20gb", 20), ("2g.10gb", 10), ("1g.5gb", 5)]
    slices = [FakeDevice(uuid, f"{A100} MIG {profile}", gb * GIB, 0, 0, None, list(procs))
              for uuid, (profile, gb), procs in zip(SLICE_UUIDS, profiles, processes)]
    return FakeGpu("GPU-a100a100-0000-4000-8000-000000000000", A100, 40 * GIB, 2 * GIB, GIB,
                   mig=slices, mig_enabled=True)


def machine() -> list[FakeGpu]:
    return [mig_a100(), FakeGpu("GPU-h100h100-0000-4000-8000-000000000000")]


def probe_over(fake, scope: str = "all", environ: dict | None = None) -> NvmlProbe:
    return NvmlProbe(scope=scope, pynvml_module=fake.module, environ=environ or {})


# --- MIG devices as units -----------------------------------------------------------------------

def test_a_mig_gpu_is_offered_as_its_slices_never_whole(fakes):
    """Each MIG device is a snapshot with its own memory, key "0:M", the MIG UUID to launch with and a
    name saying the slice; the A100 itself (37 GB free) is not offered; a plain GPU is unchanged."""
    snaps = probe_over(fakes(machine())).snapshot()
    assert [s.key for s in snaps] == ["0:0", "0:1", "0:2", "1"]
    assert [s.index for s in snaps] == [0, 0, 0, 1]
    assert [s.cuda_visible for s in snaps] == SLICE_UUIDS + ["1"]
    assert [s.uuid for s in snaps[:3]] == SLICE_UUIDS
    assert [s.free_bytes for s in snaps[:3]] == [20 * GIB, 10 * GIB, 5 * GIB]
    assert all("MIG" in s.name for s in snaps[:3]) and snaps[3].name == "NVIDIA H100 80GB HBM3"
    assert all(s.available and s.processes_known and s.utilization is None for s in snaps[:3])
    assert 37 * GIB not in {s.free_bytes for s in snaps}


def test_each_slice_has_its_own_processes(fakes):
    """A process of ours on slice 1 makes that slice busy in exclusive mode, not its siblings."""
    gpus = [mig_a100(((), [(os.getpid(), GIB)], ()))]
    snaps = probe_over(fakes(gpus)).snapshot()
    assert [[p.pid for p in s.processes] for s in snaps] == [[], [os.getpid()], []]
    assert [fits(v, GIB, exclusive=True) for v in build_views(snaps, [], ME)] == [True, False, True]


def test_mig_names_without_the_slice_get_one(fakes):
    """Where the driver names a MIG device like its GPU, the name still says which slice it is."""
    gpu = mig_a100()
    gpu.mig[2].name = A100
    assert probe_over(fakes([gpu])).snapshot()[2].name == f"{A100} MIG device 2"


def test_an_empty_mig_slot_is_skipped(fakes):
    """MIG device indices can have gaps (NotFound): the others are still units, under their own index."""
    gpu = mig_a100()
    gpu.mig[1] = None
    assert probe_over(fakes([gpu])).keys == ["0:0", "0:2"]


def test_a_mig_device_destroyed_after_start_is_unavailable(fakes):
    """A MIG device that is gone (or whose slot now holds another) is unavailable, saying to restart."""
    fake = fakes(machine())
    probe = probe_over(fake)
    fake.gpus[0].mig[1] = None
    fake.gpus[0].mig[2].uuid = "MIG-44444444-dddd-5000-8000-000000000000"
    with pytest.warns(NvmlWarning) as caught:
        snaps = probe.snapshot()
    assert [str(w.message).split(" (")[0] for w in caught] == ["GPU 0:1", "GPU 0:2"]
    assert "MIG-22222222-bbbb-5000-8000-000000000000 is gone" in str(caught[0].message)
    assert [s.available for s in snaps] == [True, False, False, True]
    assert snaps[1].cuda_visible == SLICE_UUIDS[1] and "restart" in snaps[1].error


def test_a_mig_gpu_without_mig_devices_is_not_offered(fakes):
    """MIG mode with no MIG device yet: the GPU is unavailable (its slices are read at start-up),
    never offered whole."""
    gpu = mig_a100()
    gpu.mig = [None, None, None]
    with pytest.warns(NvmlWarning, match="in MIG mode"):
        snap = probe_over(fakes([gpu])).snapshot()[0]
    assert (snap.key, snap.available, snap.free_bytes) == ("0", False, None)


def test_a_gpu_lost_takes_its_slices_with_it(fakes):
    """When the parent GPU is lost, every one of its MIG devices is unavailable."""
    fake = fakes(machine())
    probe = probe_over(fake)
    fake.gpus[0].fail["handle"] = GPU_IS_LOST
    with pytest.warns(NvmlWarning):
        snaps = probe.snapshot()
    assert [(s.key, s.available) for s in snaps] == [("0:0", False), ("0:1", False), ("0:2", False), ("1", True)]


def test_mig_mode_is_not_asked_again_of_gpus_without_mig(fakes):
    """A GPU that said NotSupported to the MIG mode call is not asked every round; an old driver
    without the call at all reads its GPUs whole."""
    fake = fakes([FakeGpu("GPU-a")])
    probe = probe_over(fake)
    for _ in range(3):
        probe.snapshot()
    assert fake.calls["nvmlDeviceGetMigMode"] == 1
    assert [s.key for s in probe_over(fakes([FakeGpu("GPU-a")], driver=R418)).snapshot()] == ["0"]


# --- scope ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scope, environ, keys", [
    ("all", {}, ["0:0", "0:1", "0:2", "1"]),
    ("0", {}, ["0:0", "0:1", "0:2"]),
    ("GPU-a100", {}, ["0:0", "0:1", "0:2"]),
    (SLICE_UUIDS[1], {}, ["0:1"]),
    ("MIG-3333", {}, ["0:2"]),
    ("1,0:2", {}, ["0:2", "1"]),
    ("all", {"CUDA_VISIBLE_DEVICES": SLICE_UUIDS[0]}, ["0:0"]),
    ("all", {"CUDA_VISIBLE_DEVICES": "1"}, ["1"]),
])
def test_gpus_accepts_mig_uuids_and_a_parent_means_all_its_slices(fakes, scope, environ, keys):
    """--gpus (and CUDA_VISIBLE_DEVICES) take MIG UUIDs, prefixes and keys; a MIG GPU's index or
    UUID selects all of its MIG devices."""
    probe = probe_over(fakes(machine()), scope, environ)
    assert probe.keys == keys and [s.key for s in probe.snapshot()] == keys
    assert probe.indices == sorted({int(k.split(":")[0]) for k in keys})


@pytest.mark.parametrize("scope", ["MIG-9999", "MIG-", "0:7", "2"])
def test_unknown_or_ambiguous_mig_names_are_scope_errors(fakes, scope):
    """A MIG UUID no device has, a prefix several match, or a slot that is empty is refused."""
    with pytest.raises(ScopeError):
        probe_over(fakes(machine()), scope)


def test_resolve_scope_is_unchanged_for_whole_gpus():
    """Without MIG, keys are the indices as strings and resolve_scope still returns the indices."""
    gpus = [GpuIdentity(0, "GPU-a"), GpuIdentity(1, "GPU-b"), GpuIdentity(2, "GPU-c")]
    assert resolve_keys("2,0,GPU-b,0", gpus, {}) == ["0", "1", "2"]
    assert resolve_scope("2,0", gpus, {}) == [0, 2]
    mig = gpus + [GpuIdentity(1, "MIG-x", 0), GpuIdentity(1, "MIG-y", 1)]
    assert resolve_keys(None, mig, {}) == ["0", "1:0", "1:1", "2"] and resolve_scope("MIG-y", mig, {}) == [1]


# --- pid namespaces ------------------------------------------------------------------------------

def host_pid() -> int:
    """A pid that means nothing here, as a host pid seen from inside a container does."""
    pid = 4_180_000
    while psutil.pid_exists(pid):
        pid += 1
    return pid


def snap(key: str, *pids: int, known: bool = True) -> GpuSnapshot:
    processes = tuple(GpuProcess(p, 1, owner_of(p)) for p in pids)
    return GpuSnapshot(int(key), f"GPU-{key}", "X", 10, 0, 10, processes=processes, processes_known=known)


def test_a_container_is_recognised_by_nvml_pids_that_are_not_ours_nor_visible(fakes):
    """Over the fake: NVML lists a host pid where our task runs; no pid is ours or visible here,
    so the namespaces differ; owners stay "unknown" rather than guessed."""
    task, host = os.getpid(), host_pid()
    fake = fakes([FakeGpu("GPU-a", processes=[(host, GIB)]), FakeGpu("GPU-b")])
    snaps = probe_over(fake).snapshot()
    assert [p.user for p in snaps[0].processes] == [UNKNOWN_USER]
    assert listed_pids_visible(snaps) is False
    assert pid_namespace_mismatch(snaps, {"0": {task}}) is True


def test_no_container_when_our_pid_is_listed_or_any_listed_pid_is_visible():
    """Our own pid listed, or any NVML pid visible here, means one namespace; so does a round with
    nothing to judge by (no task of ours, no process listed, or an unreadable list)."""
    ours, host = os.getpid(), host_pid()
    assert not pid_namespace_mismatch([snap("0", host, ours)], {"0": {ours}})
    assert not pid_namespace_mismatch([snap("0", host), snap("1", ours)], {"0": {12345}})
    assert not pid_namespace_mismatch([snap("0", host, 1)], {"0": {ours}})  # pid 1 is visible everywhere
    assert not pid_namespace_mismatch([snap("0", host)], {})
    assert not pid_namespace_mismatch([snap("0"), snap("1", host)], {"0": {ours}})
    assert not pid_namespace_mismatch([snap("0", known=False), snap("1", host)], {"0": {ours}})
    assert pid_namespace_mismatch([snap("0", host), snap("1", host)], {"0": {ours}, "1": set()})
    assert listed_pids_visible([snap("0")]) is None and listed_pids_visible([snap("0", host, 1)]) is True


def test_without_owners_forgets_every_owner():
    """Once the namespaces differ, every owner becomes "unknown"; nothing else changes."""
    before = [snap("0", os.getpid(), 1)]
    after = without_owners(before)
    assert [p.user for p in after[0].processes] == [UNKNOWN_USER, UNKNOWN_USER]
    assert [p.pid for p in after[0].processes] == [os.getpid(), 1] and before[0].processes[0].user == ME
