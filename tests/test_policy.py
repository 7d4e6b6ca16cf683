"""The scheduling policy as pure functions: injected clock and RNG, no sleeping."""

from __future__ import annotations

import random
import statistics

import pytest

from gpu_compete.gpus.base import GpuProcess, GpuSnapshot
from gpu_compete.policy import (Candidate, GpuView, Placement, RetryPolicy, build_views, candidates, choose_gpu,
                                fits, head, lease_active, order, plan_round, queue_status)
from gpu_compete.tasks import GIB, Queue, Task, TaskSpec, TaskState


def spec(queue: str, position: int, vram: float = 1.0) -> TaskSpec:
    return TaskSpec(queue=queue, position=position, commands=(f"run {queue}.{position}",), vram_gb=vram, line=1)


def queue_of(name: str, n: int, vram: float = 1.0) -> Queue:
    return Queue(Task(spec(name, i + 1, vram)) for i in range(n))


def gpu(index: int, free_gb: float, **kw) -> GpuView:
    return GpuView(str(index), int(free_gb * GIB), rank=index, **kw)


# --- queues ----------------------------------------------------------------------------------

def test_only_the_head_of_each_queue_is_a_candidate():
    """A queue offers its first unfinished task and nothing behind it."""
    q1, q2 = queue_of("1", 3), queue_of("2", 2)
    q1[0].state = TaskState.COMPLETED
    cands = candidates({"1": q1, "2": q2}, now=0.0)
    assert [c.uni_id for c in cands] == [q1[1].uni_id, q2[0].uni_id]
    assert [c.remaining for c in cands] == [2, 2]


def test_a_running_or_waiting_head_keeps_its_queue_busy():
    """A queue whose head runs or waits for a retry offers nothing, so order within it holds."""
    q = queue_of("1", 2)
    q[0].state = TaskState.RUNNING
    assert candidates({"1": q}, 0.0) == [] and queue_status(q) == "BUSY"
    q[0].state, q[0].retry_at = TaskState.RETRY, 100.0
    assert candidates({"1": q}, 99.9) == [] and queue_status(q) == "BUSY"
    assert [c.uni_id for c in candidates({"1": q}, 100.0)] == [q[0].uni_id]


def test_a_failed_head_blocks_its_queue_but_not_others():
    """After giving up, the rest of that queue is blocked while other queues go on."""
    q1, q2 = queue_of("1", 3), queue_of("2", 1)
    q1[0].state = TaskState.FAILED
    assert queue_status(q1) == "BLOCKED"
    assert [c.queue for c in candidates({"1": q1, "2": q2}, 0.0)] == ["2"]


def test_queue_status_done_and_idle():
    """All completed is DONE; a pending head is IDLE; head() skips completed tasks."""
    q = queue_of("1", 2)
    assert queue_status(q) == "IDLE" and head(q) is q[0]
    for t in q:
        t.state = TaskState.COMPLETED
    assert queue_status(q) == "DONE" and head(q) is None


# --- GPU fit and exclusivity -------------------------------------------------------------------

def test_vram_fit_is_inclusive_and_unknown_memory_takes_only_zero_vram_tasks():
    """A task fits when free >= its VRAM; a GPU whose memory is unknown fits only 0 GB tasks."""
    assert fits(gpu(0, 10), 10 * GIB, exclusive=True)
    assert not fits(gpu(0, 9.99), 10 * GIB, exclusive=True)
    assert fits(GpuView(0, None), 0, True) and not fits(GpuView(0, None), 1, True)
    assert not fits(gpu(0, 80, available=False), 1, False)


def test_an_unreadable_process_list_is_busy_in_exclusive_mode_and_its_memory_counts_in_shared():
    """A snapshot whose process list could not be read is not free for an exclusive task, even
    with nothing listed; a shared task still goes there by its free memory."""
    blind = GpuSnapshot(0, "GPU-0", "A", 80 * GIB, 10 * GIB, 70 * GIB, processes_known=False,
                        error="process list unavailable: Insufficient Permissions")
    seen = GpuSnapshot(1, "GPU-1", "A", 80 * GIB, 70 * GIB, 10 * GIB)
    views = build_views([blind, seen], [], "me")
    assert [v.processes_known for v in views] == [False, True] and not views[0].user_busy
    assert not fits(views[0], GIB, exclusive=True) and fits(views[1], GIB, exclusive=True)
    assert fits(views[0], 70 * GIB, exclusive=False) and not fits(views[0], 71 * GIB, exclusive=False)
    cands = [Candidate("a", "1", GIB, 1), Candidate("b", "2", GIB, 1)]
    assert [launch.gpu for launch in plan_round(cands, views, random.Random(0), exclusive=True)] == ["1"]
    shared = plan_round(cands, views, random.Random(0), exclusive=False)
    assert sorted(launch.gpu for launch in shared) == ["0", "0"]  # the most free memory, both times


@pytest.mark.parametrize("flag", [{"user_busy": True}, {"leased": True}, {"own_tasks": 1}])
def test_exclusive_mode_skips_gpus_with_our_processes_leases_or_tasks(flag):
    """In exclusive mode a GPU with our process, a lease or one of our tasks is never chosen."""
    assert not fits(gpu(0, 80, **flag), GIB, exclusive=True)
    assert fits(gpu(0, 80, **flag), GIB, exclusive=False)


def test_exclusive_picks_best_fit_and_shared_picks_most_free():
    """Exclusive keeps roomy GPUs for big tasks (best fit); shared spreads load (most free)."""
    views = [gpu(0, 40), gpu(1, 12), gpu(2, 80), gpu(3, 12)]
    assert choose_gpu(10 * GIB, views, exclusive=True).key == "1"  # smallest that fits, lowest index on ties
    assert choose_gpu(10 * GIB, views, exclusive=False).key == "2"
    assert choose_gpu(90 * GIB, views, exclusive=False) is None


def test_plan_never_double_books_a_gpu_in_exclusive_mode():
    """Each exclusive assignment removes its GPU from the view the next assignment sees."""
    rng = random.Random(1)
    cands = [Candidate(f"t{i}", str(i), GIB, 1) for i in range(10)]
    plan = plan_round(cands, [gpu(i, 24) for i in range(4)], rng, exclusive=True)
    assert len(plan) == 4 and len({l.gpu for l in plan}) == 4


def test_shared_plan_subtracts_each_assignment_from_free_memory():
    """In shared mode tasks pack onto a GPU only while their VRAM adds up to what is free."""
    cands = [Candidate(f"t{i}", str(i), 10 * GIB, 1) for i in range(5)]
    plan = plan_round(cands, [gpu(0, 24), gpu(1, 15)], random.Random(0), exclusive=False)
    per_gpu = {g: sum(1 for l in plan if l.gpu == g) for g in ("0", "1")}
    assert per_gpu == {"0": 2, "1": 1}


def test_a_task_too_big_for_now_does_not_block_smaller_ones():
    """Assignment is one at a time: a head that fits nowhere is skipped, the rest still start."""
    cands = [Candidate("big", "1", 50 * GIB, 5), Candidate("small", "2", GIB, 1)]
    plan = plan_round(cands, [gpu(0, 24)], random.Random(0))
    assert [l.uni_id for l in plan] == ["small"]


# --- order -----------------------------------------------------------------------------------

def test_longest_pick_puts_long_queues_first_and_keeps_ties_random():
    """`longest` sorts by remaining tasks; equal queues keep the seeded shuffle's order."""
    cands = [Candidate(f"t{i}", str(i), GIB, 3 if i in (2, 7) else 1) for i in range(10)]
    firsts = set()
    for seed in range(30):
        ordered = order(cands, random.Random(seed), "longest")
        assert {c.uni_id for c in ordered[:2]} == {"t2", "t7"}
        firsts.add(ordered[2].uni_id)
    assert len(firsts) > 3  # ties really are shuffled


def test_order_is_reproducible_for_a_seed_and_random_pick_is_a_plain_shuffle():
    """The same seed gives the same order; `random` ignores queue length."""
    cands = [Candidate(f"t{i}", str(i), GIB, i) for i in range(8)]
    a = order(cands, random.Random(42), "random")
    assert a == order(cands, random.Random(42), "random")
    assert [c.remaining for c in a] != sorted((c.remaining for c in a), reverse=True)
    with pytest.raises(ValueError):
        order(cands, random.Random(0), "fastest")


def _makespan(pick: str, seed: int, queues: int = 16, per_queue: int = 3, gpus: int = 8) -> float:
    """Event simulation of unit-length tasks using plan_round for every decision."""
    rng = random.Random(seed)
    remaining = {str(q): per_queue for q in range(queues)}
    free_at = [0.0] * gpus
    busy_until: dict[str, float] = {}
    now = 0.0
    while any(remaining.values()):
        cands = [Candidate(f"{q}-{per_queue - n}", q, GIB, n) for q, n in remaining.items()
                 if n and busy_until.get(q, 0.0) <= now]
        views = [gpu(i, 24, own_tasks=int(free_at[i] > now)) for i in range(gpus)]
        for launch in plan_round(cands, views, rng, pick=pick):
            free_at[int(launch.gpu)] = busy_until[launch.queue] = now + 1.0
            remaining[launch.queue] -= 1
        now = min(t for t in free_at + list(busy_until.values()) if t > now)
    return max(free_at)


def test_longest_pick_reaches_the_ideal_makespan_where_random_does_not():
    """16 queues × 3 unit tasks on 8 GPUs: ideal 6; `longest` always 6, `random` worse on average."""
    longest = [_makespan("longest", s) for s in range(40)]
    rand = [_makespan("random", s) for s in range(40)]
    assert max(longest) == 6.0
    assert statistics.mean(rand) > 6.5


# --- leases and views --------------------------------------------------------------------------

def test_a_lease_holds_until_confirmed_or_settled():
    """A launch leases its GPU until its process shows up in NVML or --settle passes."""
    task = Task(spec("1", 1), state=TaskState.RUNNING, gpu="0", launched_at=100.0)
    assert lease_active(task, 110.0, settle=30.0)
    assert not lease_active(task, 130.0, settle=30.0)
    task.confirmed = True
    assert not lease_active(task, 110.0, settle=30.0)


def test_leased_vram_is_subtracted_once_and_not_after_confirmation():
    """Shared mode: an unconfirmed launch's VRAM is taken off free memory; a confirmed one's isn't."""
    snap = GpuSnapshot(0, "u", "g", 24 * GIB, 4 * GIB, 20 * GIB)
    leased = build_views([snap], [Placement("0", 10 * GIB, leased=True)], "me")[0]
    confirmed = build_views([snap], [Placement("0", 10 * GIB, leased=False)], "me")[0]
    assert leased.free_bytes == 10 * GIB and leased.leased
    assert confirmed.free_bytes == 20 * GIB and not confirmed.leased and confirmed.own_tasks == 1


def test_views_mark_gpus_with_the_users_processes():
    """A process of the current user makes a GPU busy for exclusive mode; others' don't."""
    mine = GpuSnapshot(0, "u0", "g", 24 * GIB, GIB, 23 * GIB, processes=(GpuProcess(7, GIB, "me"),))
    theirs = GpuSnapshot(1, "u1", "g", 24 * GIB, GIB, 23 * GIB, processes=(GpuProcess(8, GIB, "unknown"),))
    views = build_views([mine, theirs], [], "me")
    assert [v.user_busy for v in views] == [True, False]


def test_processes_of_an_ended_task_are_not_counted():
    """NVML may list an ended task's process for a moment: ignored, it neither makes its GPU
    busy nor holds its memory, so the next task can start at once."""
    snap = GpuSnapshot(0, "u0", "g", 24 * GIB, 10 * GIB, 14 * GIB, processes=(GpuProcess(7, 10 * GIB, "me"),))
    before = build_views([snap], [], "me")[0]
    after = build_views([snap], [], "me", ignored={7})[0]
    assert before.user_busy and before.free_bytes == 14 * GIB
    assert not after.user_busy and after.free_bytes == 24 * GIB
    other = build_views([snap], [], "me", ignored={8})[0]
    assert other == before
    # An exited process's owner can't be read any more ("unknown"): it is a ghost all the same.
    gone = GpuSnapshot(0, "u0", "g", 24 * GIB, 10 * GIB, 14 * GIB, processes=(GpuProcess(7, 10 * GIB, "unknown"),))
    assert build_views([gone], [], "me", ignored={7})[0].free_bytes == 24 * GIB
    # NVML capped `used` at the total: a ghost's memory is given back only up to what the
    # other processes leave, never more.
    crowded = GpuSnapshot(0, "u0", "g", 24 * GIB, 24 * GIB, 0, processes=(
        GpuProcess(7, 16 * GIB, "me"), GpuProcess(9, 16 * GIB, "me")))
    assert build_views([crowded], [], "me", ignored={7})[0].free_bytes == 8 * GIB


# --- retries -----------------------------------------------------------------------------------

def test_backoff_after_every_burst_of_failures():
    """With burst 3, failures 3, 6, 9 back off; the others retry at once."""
    policy = RetryPolicy(burst=3, backoff_s=600)
    actions = []
    for count in range(9):
        decision = policy.after_failure(count, now=1000.0)
        assert decision.retry_count == count + 1
        actions.append((decision.action, decision.at))
    assert actions[2] == ("backoff", 1600.0) and actions[5] == ("backoff", 1600.0) and actions[8][0] == "backoff"
    assert all(a == ("retry", 1000.0) for i, a in enumerate(actions) if (i + 1) % 3)


def test_max_retries_gives_up_after_that_many_retries():
    """max_retries=2: two failures are retried, the third gives up; 0 gives up at once."""
    policy = RetryPolicy(burst=10, max_retries=2)
    assert [policy.after_failure(c, 0.0).action for c in range(3)] == ["retry", "retry", "give_up"]
    assert RetryPolicy(max_retries=0).after_failure(0, 0.0).action == "give_up"


@pytest.mark.parametrize("kwargs", [{"burst": 0}, {"backoff_s": -1}, {"backoff_s": float("nan")},
                                    {"max_retries": -1}])
def test_retry_policy_rejects_nonsense(kwargs):
    """A burst below 1, a negative or non-finite backoff and negative max retries are refused."""
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)
