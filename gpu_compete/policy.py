"""Pure scheduling decisions: which task goes to which GPU this round, and what a failure costs.

Everything here is a function of values passed in (queues, GPU views, `now`, an RNG); no
clock, no IO, no randomness of its own, so it is tested without sleeping.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Container, Iterable, Mapping, NamedTuple, Sequence

from .gpus.base import GpuSnapshot
from .tasks import GIB, Queue, Task, TaskState

PICKS = ("longest", "random")


# --- queues ----------------------------------------------------------------------------------

def head(queue: Queue) -> Task | None:
    """The task a queue is on: its first one not completed (None when all are)."""
    return queue.head()


def queue_status(queue: Queue, queues: dict[str, Queue] | None = None) -> str:
    """DONE, BLOCKED (its head failed for good, or waits with `after=` for a queue that is
    blocked), WAITING (its head waits with `after=` for a queue not done yet), BUSY (running,
    or waiting for a retry), IDLE. Without `queues`, `after=` is not looked at."""
    task = head(queue)
    if task is None:
        return "DONE"
    if task.state is TaskState.FAILED:
        return "BLOCKED"
    if task.state is TaskState.PENDING and task.spec.after and queues is not None:
        state, _ = after_state(task, queues)
        if state != "ready":
            return state.upper()
    return "IDLE" if task.state is TaskState.PENDING else "BUSY"


def after_state(task: Task, queues: dict[str, Queue]) -> tuple[str, str]:
    """("ready" | "waiting" | "blocked", why) for a task's `after=`: ready once every queue it
    names is done; blocked as soon as one of them is blocked (it could never be done). The
    parser refuses cycles, so following `after=` always ends."""
    waiting = []
    for name in task.spec.after:
        queue = queues.get(name)
        if queue is None:
            continue  # the parser refuses unknown queues; a live reload may drop one: not a wait
        status = queue_status(queue, queues)
        if status == "BLOCKED":
            return "blocked", f"after={name}: queue {name} is blocked"
        if status != "DONE":
            waiting.append(name)
    if waiting:
        return "waiting", "waiting for queue " + " and ".join(waiting) + " to be done (after=)"
    return "ready", ""


class Candidate(NamedTuple):
    """A head that may start now (a tuple: thousands are made every round)."""

    uni_id: str
    queue: str
    vram_bytes: int  # on each of its GPUs; raised after an oom
    remaining: int  # tasks not yet completed in its queue, this one included
    gpus: int = 1
    priority: int = 0


def candidates(queues: dict[str, Queue], now: float) -> list[Candidate]:
    """Heads that may start now: pending ones whose `after=` queues are done, and failed ones
    whose retry time has come. O(queues), whatever the number of tasks behind each head."""
    out = []
    for name, queue in queues.items():
        task = queue.head()
        if task is None:
            continue
        due = task.state is TaskState.PENDING or (task.state is TaskState.RETRY and task.retry_at <= now)
        if task.state is TaskState.PENDING and task.spec.after and after_state(task, queues)[0] != "ready":
            continue  # only the start is gated: a retry was ready when its first attempt began
        if due:
            out.append(Candidate(task.spec.uni_id, name, task.need_bytes, queue.remaining(), task.spec.gpus,
                                 task.spec.priority))
    return out


# --- GPUs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpuView:
    """What the planner needs of one GPU this round."""

    key: str  # the scheduling unit: "3", or "3:1" for a MIG device
    free_bytes: int | None  # NVML's free memory less what unconfirmed launches still hold
    available: bool = True
    user_busy: bool = False  # a process of the current user is on it (as NVML shows it now)
    leased: bool = False  # a launch here has not shown up in NVML yet
    own_tasks: int = 0  # tasks of this daemon running here
    rank: int = 0  # position in the probe's order (NVML index order): ties go to the lowest
    # False when NVML would not list this GPU's processes: a process of ours may be there
    # unseen, so exclusive mode can't call it free (its memory is still read, and trusted).
    processes_known: bool = True
    group: str | None = None  # topology: GPUs of one group (NUMA node, PCIe switch) are close


@dataclass(frozen=True)
class Placement:
    """A task of ours that is on a GPU, as the planner sees it."""

    gpu: str
    vram_bytes: int
    leased: bool  # launched, not yet visible in NVML, and --settle has not passed


def lease_active(task: Task, now: float, settle: float) -> bool:
    return (task.state is TaskState.RUNNING and not task.confirmed and task.launched_at is not None
            and now - task.launched_at < settle)


def build_views(snapshots: Iterable[GpuSnapshot], placements: Iterable[Placement], user: str,
                ignored: Container[int] = (), topology: Mapping[str, str] | None = None) -> list[GpuView]:
    """GPU views from a snapshot and our own tasks' placements.

    A leased launch's VRAM is subtracted from free memory because NVML can't see it yet; once
    its process shows up in NVML (or --settle passes) it is not subtracted again.

    `ignored` pids belong to tasks of ours that have ended: NVML may list them for a moment
    after they exit. They make no GPU busy and their memory counts as free, so the next task
    starts at once instead of a poll later.
    """
    by_gpu: dict[str, list[Placement]] = {}
    for p in placements:
        by_gpu.setdefault(p.gpu, []).append(p)
    views = []
    for rank, snap in enumerate(snapshots):
        here = by_gpu.get(snap.key, ())
        held = sum(p.vram_bytes for p in here if p.leased)
        free = None if snap.free_bytes is None else snap.free_bytes - held
        mine = snap.user_processes(user)
        if ignored and snap.processes:
            ghosts = [p for p in snap.processes if p.pid in ignored]
            if ghosts:
                mine = tuple(p for p in mine if p.pid not in ignored)
                free = _without_ghosts(snap, free, ghosts, ignored)
        views.append(GpuView(snap.key, free, snap.available, bool(mine), any(p.leased for p in here),
                             len(here), rank, snap.processes_known, (topology or {}).get(snap.key)))
    return views


def _without_ghosts(snap: GpuSnapshot, free: int | None, ghosts: list, ignored: Container[int]) -> int | None:
    """Free memory with the ghosts' memory given back, but never more than the total less what
    every other listed process holds (a driver may already have dropped a ghost's memory from
    `used`, and a used figure capped at the total hides how much). Unknown sizes: no change."""
    others = [p.used_bytes for p in snap.processes if p.pid not in ignored]
    if free is None or snap.total_bytes is None or None in others or any(p.used_bytes is None for p in ghosts):
        return free
    ceiling = snap.total_bytes - sum(others)
    return max(free, min(free + sum(p.used_bytes for p in ghosts), ceiling))


def fits(gpu: GpuView, vram_bytes: int, exclusive: bool) -> bool:
    if not gpu.available:
        return False
    if exclusive and (gpu.user_busy or gpu.leased or gpu.own_tasks or not gpu.processes_known):
        return False
    if gpu.free_bytes is None:  # memory unknown: only a task that needs none can go there
        return vram_bytes == 0
    return gpu.free_bytes >= vram_bytes


def _preference(exclusive: bool):
    if exclusive:
        return lambda g: (math.inf if g.free_bytes is None else g.free_bytes, g.rank)
    return lambda g: (-(g.free_bytes or 0), g.rank)


def choose_gpu(vram_bytes: int, gpus: Sequence[GpuView], exclusive: bool) -> GpuView | None:
    """Among GPUs that fit: exclusive mode takes the one with the least free memory that still
    fits (best fit), keeping roomy GPUs for tasks that need them; shared mode takes the one with
    the most free memory, spreading tasks so they contend less and have room to grow.
    Ties go to the lowest index, so a plan is reproducible."""
    fitting = [g for g in gpus if fits(g, vram_bytes, exclusive)]
    if not fitting:
        return None
    return min(fitting, key=_preference(exclusive))


def choose_gpus(vram_bytes: int, count: int, gpus: Sequence[GpuView], exclusive: bool) -> list[GpuView] | None:
    """`count` GPUs that each fit, or None. With a choice, GPUs of one topology group (NUMA
    node / PCIe switch, as the probe reports it) come first: the group that can hold the whole
    task and whose best `count` GPUs rank best by `choose_gpu`'s rule. Only when no group can
    hold it are GPUs taken across groups. GPUs without a group form one group together."""
    if count == 1:
        one = choose_gpu(vram_bytes, gpus, exclusive)
        return None if one is None else [one]
    key = _preference(exclusive)
    fitting = sorted((g for g in gpus if fits(g, vram_bytes, exclusive)), key=key)
    if len(fitting) < count:
        return None
    groups: dict[str | None, list[GpuView]] = {}
    for g in fitting:
        groups.setdefault(g.group, []).append(g)
    whole = [members[:count] for members in groups.values() if len(members) >= count]
    if whole:
        return min(whole, key=lambda chosen: [key(g) for g in chosen])
    return fitting[:count]


def order(cands: Sequence[Candidate], rng: random.Random, pick: str = "longest") -> list[Candidate]:
    """Shuffle; with `longest`, then a stable sort by tasks remaining, most first, so equal
    queues stay in random order but long queues never wait at the end of a batch. Last a
    stable sort by priority, highest first: equal priorities keep the `pick` order."""
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {PICKS}, not {pick!r}")
    shuffled = list(cands)
    rng.shuffle(shuffled)
    if pick == "longest":
        shuffled.sort(key=lambda c: -c.remaining)
    if any(c.priority for c in shuffled):
        shuffled.sort(key=lambda c: -c.priority)
    return shuffled


@dataclass(frozen=True)
class Launch:
    uni_id: str
    queue: str
    gpu: str  # the first (or only) GPU
    gpus: tuple[str, ...] = ()  # every GPU of the task, `gpu` first

    def __post_init__(self) -> None:
        if not self.gpus:
            object.__setattr__(self, "gpus", (self.gpu,))


def plan_round(cands: Sequence[Candidate], gpus: Sequence[GpuView], rng: random.Random,
               exclusive: bool = True, pick: str = "longest") -> list[Launch]:
    """Assign candidates one at a time; each assignment updates the view the next one sees.

    Only GPUs that could take some task are kept, and the loop ends once none can take the
    smallest candidate, so a round costs about O(candidates + assignments x GPUs).
    """
    ordered = order(cands, rng, pick)
    if not ordered:
        return []
    smallest = min(c.vram_bytes for c in ordered)
    views = {g.key: g for g in gpus if fits(g, smallest, exclusive)}
    launches = []
    for cand in ordered:
        if not views:
            break
        chosen = choose_gpus(cand.vram_bytes, cand.gpus, list(views.values()), exclusive)
        if chosen is None:
            continue
        launches.append(Launch(cand.uni_id, cand.queue, chosen[0].key, tuple(g.key for g in chosen)))
        for gpu in chosen:
            free = None if gpu.free_bytes is None else gpu.free_bytes - cand.vram_bytes
            after = dataclasses.replace(gpu, free_bytes=free, leased=True, own_tasks=gpu.own_tasks + 1)
            if fits(after, smallest, exclusive):
                views[gpu.key] = after
            else:
                del views[gpu.key]
    return launches


def why_unplaceable(vram_bytes: int, count: int, totals: Sequence[int | None]) -> str | None:
    """Why a task fits no GPU in scope even when all are idle (`totals`: each available GPU's
    memory), or None when it could fit some day."""
    gb = _gb(vram_bytes)
    if count > len(totals):
        have = f"there {'is' if len(totals) == 1 else 'are'} {len(totals)} in scope"
        return f"needs {count} GPUs; {have}"
    roomy = [t for t in totals if t is None or t >= vram_bytes]
    if len(roomy) >= count:
        return None
    largest = max((t for t in totals if t is not None), default=0)
    if count == 1:
        return f"needs {gb} GB; the largest GPU has {_gb(largest)} GB"
    return f"needs {count} GPUs with {gb} GB each; {len(roomy)} GPU{'s' if len(roomy) != 1 else ''} in scope " \
           f"{'have' if len(roomy) != 1 else 'has'} that much (the largest has {_gb(largest)} GB)"


def _gb(size: int) -> str:
    return f"{size / GIB:.1f}".removesuffix(".0")


# --- failures --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryDecision:
    retry_count: int  # failures so far, this one included
    action: str  # "retry" (next round), "backoff" (at `at`), "give_up"
    at: float


@dataclass(frozen=True)
class RetryPolicy:
    burst: int = 3  # failures in a row before a backoff
    backoff_s: float = 600.0
    max_retries: int | None = None  # None: never give up

    def __post_init__(self) -> None:
        if not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError("retry burst must be an integer of at least 1")
        if not (isinstance(self.backoff_s, (int, float)) and math.isfinite(self.backoff_s) and self.backoff_s >= 0):
            raise ValueError("backoff must be a finite number of seconds, 0 or more")
        if self.max_retries is not None and (not isinstance(self.max_retries, int) or self.max_retries < 0):
            raise ValueError("max retries must be an integer of at least 0")

    def after_failure(self, retry_count: int, now: float, *, max_retries: int | None = None,
                      permanent: bool = False) -> RetryDecision:
        """`retry_count` is the count before this failure; `max_retries`: the task's own
        `retries=` (else this policy's); `permanent`: a failure retrying can only repeat
        (classify.PERMANENT, unless --retry-permanent), which gives up at once."""
        count = retry_count + 1
        limit = self.max_retries if max_retries is None else max_retries
        if permanent or (limit is not None and count > limit):
            return RetryDecision(count, "give_up", now)
        if count % self.burst == 0:
            return RetryDecision(count, "backoff", now + self.backoff_s)
        return RetryDecision(count, "retry", now)


def vram_after_oom(declared_gb: float, needed_gb: float | None, peak_gb: float | None, growth: float) -> float:
    """What the next attempt of a task that ran out of memory asks for: max(declared, last
    peak x growth). Without a peak (it died before NVML saw it) the current need grows by the
    factor. It never asks for less than before."""
    current = max(declared_gb, needed_gb or 0.0)
    basis = peak_gb if peak_gb else current
    return round(max(current, basis * growth), 2)
