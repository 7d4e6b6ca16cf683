"""Pure policy for what tasks say they need: multi-GPU fit and exclusivity with topology,
priority order, `after=` readiness and blocking, per-task retries, OOM growth and permanent
failures. Injected RNG and clock; nothing sleeps."""

from __future__ import annotations

import random

from gpu_compete.policy import (Candidate, GpuView, RetryPolicy, after_state, candidates, choose_gpus, order,
                                plan_round, queue_status, vram_after_oom, why_unplaceable)
from gpu_compete.tasks import GIB, Queue, Task, TaskSpec, TaskState


def spec(queue: str, position: int = 1, vram: float = 1.0, **opts) -> TaskSpec:
    return TaskSpec(queue=queue, position=position, commands=(f"run {queue}.{position}",), vram_gb=vram, line=1,
                    **opts)


def gpu(index: int, free_gb: float, **kw) -> GpuView:
    return GpuView(str(index), int(free_gb * GIB), rank=index, **kw)


# --- multi-GPU -------------------------------------------------------------------------------

def test_gpus_2_takes_two_gpus_that_each_fit():
    """A gpus=2 task gets two GPUs, each with its VRAM free; a GPU too small is never one of them."""
    views = [gpu(0, 10), gpu(1, 30), gpu(2, 30)]
    plan = plan_round([Candidate("t", "1", 20 * GIB, 1, gpus=2)], views, random.Random(0))
    assert [launch.gpus for launch in plan] == [("1", "2")]
    assert plan[0].gpu == "1"


def test_gpus_n_waits_when_too_few_fit():
    """With only one GPU that fits, a gpus=2 task is not placed (nothing half-placed)."""
    views = [gpu(0, 10), gpu(1, 30)]
    assert plan_round([Candidate("t", "1", 20 * GIB, 1, gpus=2)], views, random.Random(0)) == []


def test_gpus_n_exclusive_needs_every_gpu_idle():
    """In exclusive mode each of the N GPUs must hold none of our processes, leases or tasks."""
    views = [gpu(0, 80, user_busy=True), gpu(1, 80), gpu(2, 80, own_tasks=1), gpu(3, 80)]
    plan = plan_round([Candidate("t", "1", GIB, 1, gpus=2)], views, random.Random(0), exclusive=True)
    assert plan[0].gpus == ("1", "3")
    plan = plan_round([Candidate("t", "1", GIB, 1, gpus=3)], views, random.Random(0), exclusive=True)
    assert plan == []
    # Shared mode only asks for memory.
    plan = plan_round([Candidate("t", "1", GIB, 1, gpus=3)], views, random.Random(0), exclusive=False)
    assert len(plan[0].gpus) == 3


def test_gpus_placed_are_not_given_to_the_next_candidate():
    """GPUs taken by a gpus=2 task this round are leased: exclusive mode gives them to nobody else."""
    views = [gpu(i, 24) for i in range(3)]
    cands = [Candidate("big", "1", GIB, 1, gpus=2, priority=1), Candidate("small", "2", GIB, 1)]
    plan = plan_round(cands, views, random.Random(0), exclusive=True)
    used = [g for launch in plan for g in launch.gpus]
    assert len(plan) == 2 and len(used) == len(set(used)) == 3


def test_close_gpus_are_preferred():
    """With a choice, both GPUs come from one topology group, even when another pair ranks lower."""
    views = [gpu(0, 24, group="numa0"), gpu(1, 24, group="numa1"), gpu(2, 24, group="numa0"),
             gpu(3, 24, group="numa1")]
    assert [g.key for g in choose_gpus(GIB, 2, views, exclusive=True)] == ["0", "2"]
    views[0] = gpu(0, 24, group="numa0", leased=True)
    assert [g.key for g in choose_gpus(GIB, 2, views, exclusive=True)] == ["1", "3"]


def test_gpus_span_groups_only_when_no_group_holds_the_task():
    """When no group has N GPUs free, the task still runs across groups."""
    views = [gpu(0, 24, group="a"), gpu(1, 24, group="b"), gpu(2, 24, group="c")]
    assert [g.key for g in choose_gpus(GIB, 2, views, exclusive=True)] == ["0", "1"]


def test_best_fit_within_the_group_in_exclusive_mode():
    """Exclusive mode picks the group whose GPUs are the tightest fit, keeping roomy ones free."""
    views = [gpu(0, 80, group="a"), gpu(1, 80, group="a"), gpu(2, 24, group="b"), gpu(3, 24, group="b")]
    assert [g.key for g in choose_gpus(20 * GIB, 2, views, exclusive=True)] == ["2", "3"]
    assert [g.key for g in choose_gpus(20 * GIB, 2, views, exclusive=False)] == ["0", "1"]


def test_more_gpus_than_exist_is_said():
    """A task that needs more GPUs than exist, or more big GPUs than exist, says so plainly."""
    assert why_unplaceable(GIB, 4, [24 * GIB] * 2) == "needs 4 GPUs; there are 2 in scope"
    assert why_unplaceable(40 * GIB, 2, [24 * GIB, 80 * GIB]) == \
        "needs 2 GPUs with 40 GB each; 1 GPU in scope has that much (the largest has 80 GB)"
    assert why_unplaceable(90 * GIB, 1, [24 * GIB, 80 * GIB]) == "needs 90 GB; the largest GPU has 80 GB"
    assert why_unplaceable(20 * GIB, 2, [24 * GIB, 80 * GIB]) is None


# --- priority --------------------------------------------------------------------------------

def test_higher_priority_is_placed_first():
    """Among idle heads the highest priority gets the only GPU, whatever the shuffle."""
    for seed in range(20):
        cands = [Candidate(f"t{i}", str(i), GIB, 5, priority=0) for i in range(5)]
        cands.append(Candidate("urgent", "u", GIB, 1, priority=3))
        plan = plan_round(cands, [gpu(0, 24)], random.Random(seed))
        assert [launch.uni_id for launch in plan] == ["urgent"]


def test_equal_priorities_keep_the_pick_order():
    """Priority sorts stably: within one priority, `longest` still puts long queues first,
    and the order is the one without priorities."""
    cands = [Candidate("a", "a", GIB, 1, priority=1), Candidate("b", "b", GIB, 4, priority=1),
             Candidate("c", "c", GIB, 9, priority=0), Candidate("d", "d", GIB, 2, priority=1)]
    assert [c.uni_id for c in order(cands, random.Random(0), "longest")] == ["b", "d", "a", "c"]
    plain = [c._replace(priority=0) for c in cands]
    for seed in range(5):
        assert [c.uni_id for c in order(plain, random.Random(seed), "random")] == \
            [c.uni_id for c in order([c._replace(priority=7) for c in cands], random.Random(seed), "random")]


def test_priority_does_not_reserve():
    """A high-priority task that fits nowhere does not stop a lower one that fits."""
    cands = [Candidate("big", "1", 40 * GIB, 1, priority=9), Candidate("small", "2", GIB, 1)]
    assert [launch.uni_id for launch in plan_round(cands, [gpu(0, 24)], random.Random(0))] == ["small"]


# --- after= ----------------------------------------------------------------------------------

def queues_after() -> dict[str, Queue]:
    return {"prep": Queue([Task(spec("prep", 1)), Task(spec("prep", 2))]),
            "train": Queue([Task(spec("train", 1, after=("prep",)))]),
            "eval": Queue([Task(spec("eval", 1, after=("train", "prep")))])}


def test_after_waits_until_the_queues_are_done():
    """A head with after= is no candidate until every queue it names has completed every task."""
    qs = queues_after()
    assert [c.queue for c in candidates(qs, 0.0)] == ["prep"]
    assert queue_status(qs["train"], qs) == "WAITING"
    assert after_state(qs["eval"][0], qs) == ("waiting", "waiting for queue train and prep to be done (after=)")
    qs["prep"][0].state = TaskState.COMPLETED
    assert [c.queue for c in candidates(qs, 0.0)] == ["prep"]  # prep is not done until both are
    qs["prep"][1].state = TaskState.COMPLETED
    assert [c.queue for c in candidates(qs, 0.0)] == ["train"]
    qs["train"][0].state = TaskState.COMPLETED
    assert [c.queue for c in candidates(qs, 0.0)] == ["eval"]


def test_after_a_blocked_queue_is_blocked_with_why():
    """When a queue named in after= fails for good, the waiting task is blocked too, transitively."""
    qs = queues_after()
    qs["prep"][0].state = TaskState.FAILED
    assert queue_status(qs["train"], qs) == "BLOCKED"
    assert after_state(qs["train"][0], qs) == ("blocked", "after=prep: queue prep is blocked")
    assert queue_status(qs["eval"], qs) == "BLOCKED"  # through train and through prep
    assert candidates(qs, 0.0) == []


def test_after_only_gates_the_start():
    """A task already running or retrying is not held back by after= (it was ready when it began)."""
    qs = queues_after()
    qs["train"][0].state, qs["train"][0].retry_at = TaskState.RETRY, 5.0
    assert [c.queue for c in candidates(qs, 10.0)] == ["prep", "train"]


# --- retries, permanent failures, OOM growth -------------------------------------------------

def test_task_retries_override_the_default():
    """retries=N is the task's own --max-retries: 0 gives up at the first failure, 2 at the third."""
    policy = RetryPolicy(burst=3, backoff_s=60, max_retries=None)
    assert policy.after_failure(0, 0.0).action == "retry"
    assert policy.after_failure(0, 0.0, max_retries=0).action == "give_up"
    assert policy.after_failure(1, 0.0, max_retries=2).action == "retry"
    assert policy.after_failure(2, 0.0, max_retries=2).action == "give_up"
    assert RetryPolicy(max_retries=0).after_failure(0, 0.0, max_retries=5).action == "retry"


def test_permanent_failure_gives_up_at_once():
    """A permanent failure fails for good on its first occurrence, whatever retries allow."""
    decision = RetryPolicy(max_retries=None).after_failure(0, 7.0, max_retries=10, permanent=True)
    assert (decision.action, decision.retry_count, decision.at) == ("give_up", 1, 7.0)


def test_backoff_still_follows_the_clock():
    """The burst/backoff rule is unchanged: the third failure in a row backs off from `now`."""
    decision = RetryPolicy(burst=3, backoff_s=600).after_failure(2, 100.0, max_retries=9)
    assert (decision.action, decision.at) == ("backoff", 700.0)


def test_oom_growth():
    """After an oom the next attempt needs max(declared, last peak x growth), never less than before."""
    assert vram_after_oom(8, None, 14.2, 1.25) == 17.75
    assert vram_after_oom(20, None, 10, 1.25) == 20  # the peak was small: the declared need stands
    assert vram_after_oom(8, None, None, 1.25) == 10  # no peak seen: the need grows by the factor
    assert vram_after_oom(8, 17.75, 12, 1.25) == 17.75  # never less than the last raised need


def test_raised_need_is_what_the_candidate_asks():
    """A task whose need was raised after an oom is placed only where the raised need fits."""
    task = Task(spec("1", vram=8))
    task.vram_gb_needed = 17.75
    (cand,) = candidates({"1": Queue([task])}, 0.0)
    assert cand.vram_bytes == int(17.75 * GIB)
    assert plan_round([cand], [gpu(0, 16)], random.Random(0)) == []
    assert plan_round([cand], [gpu(0, 16), gpu(1, 24)], random.Random(0))[0].gpu == "1"
