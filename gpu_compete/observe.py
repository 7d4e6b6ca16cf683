"""What the daemon's rounds say to the outside: events for `--on-event` hooks, and figures
for the view (`status.json`, read by `watch` and the metrics server) that one round alone
can't give: queues' past task durations, recent failures, and GPU-seconds idle while work
waited.

The daemon touches this in four places: `planning()` before it plans, `annotate()` when it
builds a view, `round()` once a round, `close()` at the end. Events are found by comparing
views and reading the history's new lines, not by calls scattered through the daemon.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import journal
from .hooks import Hooks
from .report import parse_time

RECENT_FAILURES = 5


# --- GPU-seconds idle while work waited: a pure function over rounds ----------------------------

@dataclass(frozen=True)
class Round:
    t: float  # monotonic time of the round
    before: frozenset[str] = frozenset()  # GPUs that could take a waiting task when it began
    after: frozenset[str] = frozenset()  # GPUs that still could once its launches were made


def idle_increment(prev: Round | None, cur: Round, freed: Mapping[str, float] | None = None) -> float:
    """GPU-seconds, between two rounds, that a GPU able to take a waiting task sat idle.

    A GPU the previous round left able (nothing launched there, work waiting) was idle for the
    whole interval. A GPU that became able during the interval counts from the moment it did:
    the end of our task there (`freed`, monotonic, from the history), or else (another user's
    process left, unseen until this round) half the interval, the expected value.
    """
    if prev is None:
        return 0.0
    dt = max(0.0, cur.t - prev.t)
    total = dt * len(prev.after)
    for gpu in cur.before - prev.after:
        at = (freed or {}).get(gpu)
        total += min(dt, max(0.0, cur.t - at)) if at is not None else dt / 2
    return total


# --- the observer --------------------------------------------------------------------------------

@dataclass
class Observer:
    history: Path
    hooks: Hooks | None = None
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    durations: dict[str, list[float]] = field(default_factory=dict)  # queue -> successful attempts' seconds
    failures: deque = field(default_factory=lambda: deque(maxlen=RECENT_FAILURES))
    idle_seconds: float = 0.0
    _tail: journal.Tail | None = None
    _prev: Round | None = None
    _before: frozenset[str] = frozenset()
    _running: dict[tuple[str, Any], dict[str, Any]] | None = None

    def start(self) -> None:
        """Read the history once for past durations and failures; follow it from its end."""
        self._tail = journal.Tail(self.history)
        self._ingest(self._tail.new_entries(), fire=False)

    def planning(self, gpus: Iterable[str]) -> None:
        """GPUs that can take some waiting task now, before this round launches anything."""
        self._before = frozenset(gpus)

    def annotate(self, view: dict[str, Any]) -> dict[str, Any]:
        """Add what the observer knows to a view the daemon built."""
        for q in view.get("queues", ()):
            past = self.durations.get(q["queue"])
            q["mean_task_s"] = round(sum(past) / len(past), 1) if past else None
            left = q["total"] - q["done"]
            if past and left:
                elapsed = q.get("elapsed_s") or 0.0
                q["eta_s"] = round(max(0.0, q["mean_task_s"] * left - elapsed), 1)
            else:
                q["eta_s"] = 0.0 if not left else None
        view["recent_failures"] = list(self.failures)
        view["idle_while_waiting_gpu_seconds"] = round(self.idle_seconds, 3)
        return view

    def round(self, view: dict[str, Any]) -> None:
        """Once a round, with its view: new history lines, events, the idle counter, hooks."""
        if self._tail is None:
            self.start()
        now, wall = self.clock(), self.wall()
        entries = self._tail.new_entries() if self._tail else []
        freed = {}
        for e in entries:
            end = parse_time(e.get("end"))
            if e.get("gpu") is not None and end is not None:
                freed[str(e["gpu"])] = now - max(0.0, wall - end)
        cur = Round(now, self._before, frozenset(view.get("gpus_free_for_waiting", ())))
        self.idle_seconds += idle_increment(self._prev, cur, freed)
        self._prev, self._before = cur, frozenset()
        self._ingest(entries, fire=True)  # ends before starts: a GPU's next task follows its last
        # By (uni_id, attempt): a failed task relaunched within the same round starts again.
        running = {(q["current"], q.get("attempt")): q for q in view.get("queues", ())
                   if q.get("current_state") == "running" and q.get("current")}
        if self.hooks is not None:
            first = self._running is None
            for key, q in running.items():
                if key not in (self._running or {}) and not (first and q.get("adopted")):
                    self.hooks.fire("task_start", uni_id=key[0], queue=q["queue"], gpu=q.get("gpu"), state="running")
        self._running = running
        if self.hooks is not None:
            self.hooks.reap()

    def _ingest(self, entries: list[dict[str, Any]], fire: bool) -> None:
        for e in entries:
            uid, state = e.get("uni_id"), e.get("state")
            if not isinstance(uid, str):
                continue
            fields = {"uni_id": uid, "queue": e.get("queue"), "gpu": e.get("gpu"), "state": state,
                      "error_type": e.get("error_type"), "exit_status": e.get("exit_status")}
            if state == "normal_exit":
                start, end = parse_time(e.get("start")), parse_time(e.get("end"))
                if start is not None and end is not None and e.get("queue") is not None:
                    self.durations.setdefault(str(e["queue"]), []).append(max(0.0, end - start))
                if fire and self.hooks is not None:
                    self.hooks.fire("task_end", **fields)
            elif state == "abnormal_exit":
                self.failures.appendleft({k: e.get(k) for k in ("uni_id", "queue", "gpu", "attempt", "error_type",
                                                                "end", "gave_up")})
                if fire and self.hooks is not None:
                    self.hooks.fire("task_failed", **fields)
                    if e.get("gave_up"):
                        self.hooks.fire("gave_up", **fields)

    def publish(self, view: dict[str, Any], ending: int | None = None) -> None:
        """The round's view (`round`), or the last one with the run's exit code (`close`)."""
        if ending is None:
            self.round(view)
        else:
            self.close(view, ending)

    def close(self, view: dict[str, Any], exit_code: int) -> None:
        """The daemon is ending: fire `all_done` if every queue is done or blocked, and give
        running hooks their time."""
        self.round(view)
        if self.hooks is None:
            return
        if exit_code in (0, 1):
            self.hooks.fire("all_done", state="completed" if exit_code == 0 else "failed", exit_status=exit_code)
        self.hooks.close()
