"""Pure pieces beside the daemon: the host guards' decision, and attributing GPU processes to
running tasks for their peak VRAM (descent injected, no process table)."""

from __future__ import annotations

from gpu_compete.gpus.base import GpuProcess, GpuSnapshot
from gpu_compete.hostguard import HostGuard
from gpu_compete.tasks import GIB
from gpu_compete.vram import VramWatch


def test_no_guard_holds_nothing():
    """Without --min-free-ram/--min-free-disk nothing is held, whatever the host has."""
    assert not HostGuard().active
    assert HostGuard().holding(0, 0) is None


def test_guards_say_which_holds():
    """Each guard below its threshold is named with the value and the option."""
    guard = HostGuard(min_free_ram_gb=8, min_free_disk_gb=50)
    assert guard.holding(16 * GIB, 100 * GIB) is None
    assert guard.holding(4 * GIB, 100 * GIB) == "free RAM 4.0 GB < --min-free-ram 8 GB"
    assert guard.holding(4 * GIB, 10 * GIB) == ("free RAM 4.0 GB < --min-free-ram 8 GB; "
                                               "free disk 10.0 GB < --min-free-disk 50 GB")


def test_unreadable_values_hold_nothing():
    """A guard that cannot read the host does not stop every queue forever."""
    assert HostGuard(8, 50).holding(None, None) is None


def snap(key: str, *procs: tuple[int, float, str]) -> GpuSnapshot:
    return GpuSnapshot(int(key), "", "", 24 * GIB, 0, 24 * GIB,
                       processes=tuple(GpuProcess(pid, int(gb * GIB), user) for pid, gb, user in procs))


def test_vram_is_summed_per_task_per_gpu_over_its_tree():
    """Processes descending from a task's roots count for it on each of its GPUs; others don't."""
    parents = {101: 100, 102: 101, 201: 200, 300: 1}
    calls = []

    def descends(pid, roots):
        calls.append(pid)
        while pid > 1:
            if pid in roots:
                return True
            pid = parents.get(pid, 1)
        return False

    watch = VramWatch(descends, "me")
    tasks = {"a": (("0", "1"), {100}), "b": (("1",), {200})}
    snaps = [snap("0", (101, 3, "me"), (300, 7, "me"), (999, 9, "bob")),
             snap("1", (102, 4, "me"), (201, 2, "me"))]
    used = watch.sample(snaps, tasks)
    assert used == {"a": {"0": 3 * GIB, "1": 4 * GIB}, "b": {"1": 2 * GIB}}
    calls.clear()
    watch.sample(snaps, tasks)
    assert calls == []  # each pid is attributed once while it stays listed
    # A pid no longer listed is forgotten (it may come back as another process).
    watch.sample([snap("0"), snap("1")], tasks)
    assert watch.owner == {}


def test_an_oom_never_raises_the_need_past_the_largest_gpu():
    """A 20 GB task that ran out of memory at a 22 GB peak on 24 GB GPUs would need 27.5 GB and
    never run again: it asks for the largest GPU instead (a task declared larger keeps its need)."""
    from gpu_compete.tasks import Task, TaskSpec
    from gpu_compete.vram import learn_from_oom

    snaps = [GpuSnapshot(i, f"u{i}", "g", 24 * GIB, 0, 24 * GIB) for i in range(2)]
    task = Task(TaskSpec("1", 1, ("train",), 20, 1))
    task.peak_vram_bytes = 22 * GIB
    need = learn_from_oom(task, 1.25, snaps)
    assert 23.9 < need <= 24 and task.need_bytes <= 24 * GIB
    small = Task(TaskSpec("1", 2, ("eval",), 8, 1))
    small.peak_vram_bytes = 10 * GIB
    assert learn_from_oom(small, 1.25, snaps) == 12.5
    huge = Task(TaskSpec("1", 3, ("big",), 30, 1))
    assert learn_from_oom(huge, 1.25, snaps) == 37.5  # never fit: said, not hidden


def test_a_need_raised_while_no_gpu_was_seen_comes_down_before_planning():
    """A need raised past every GPU while no snapshot was at hand (an oom found at start-up, or a
    record restored) is brought down to the largest GPU once the GPUs are seen."""
    from gpu_compete.tasks import Task, TaskSpec
    from gpu_compete.vram import cap_need

    task = Task(TaskSpec("1", 1, ("train",), 20, 1))
    task.vram_gb_needed = 25.0
    assert not cap_need(task, []) and task.vram_gb_needed == 25.0
    snaps = [GpuSnapshot(0, "u0", "g", 24 * GIB, 0, 24 * GIB)]
    assert cap_need(task, snaps) and task.vram_gb_needed == 24.0
    assert not cap_need(task, snaps)
