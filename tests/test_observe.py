"""The observer: GPU-seconds idle while work waited (pure, over rounds) and events found from views and history."""

from __future__ import annotations

import time

from gpu_compete import journal
from gpu_compete.observe import Observer, Round, idle_increment


class FakeHooks:
    def __init__(self):
        self.fired = []
        self.reaped = 0
        self.closed = False

    def fire(self, event, **fields):
        self.fired.append((event, fields.get("uni_id"), fields))

    def reap(self):
        self.reaped += 1

    def close(self, wait=None):
        self.closed = True


def test_idle_increment_counts_gpus_left_able_for_the_whole_interval():
    """A GPU that a round left able to take waiting work counts the whole time until the next round."""
    prev = Round(10.0, frozenset({"0"}), frozenset({"0", "1"}))
    assert idle_increment(prev, Round(13.0, frozenset({"0", "1"}))) == 6.0
    assert idle_increment(None, Round(13.0, frozenset({"0"}))) == 0.0


def test_idle_increment_counts_a_newly_able_gpu_from_when_it_freed():
    """A GPU that became able between rounds counts from our task's end there, else half the interval."""
    prev = Round(10.0, frozenset(), frozenset())
    cur = Round(14.0, frozenset({"0", "1"}), frozenset())
    assert idle_increment(prev, cur, {"0": 13.5}) == 0.5 + 2.0
    assert idle_increment(prev, cur, {"0": 2.0, "1": 14.0}) == 4.0  # an end before the interval caps at dt
    assert idle_increment(prev, Round(14.0)) == 0.0  # nothing waited: nothing counts


def test_idle_accumulates_over_rounds_with_an_injected_clock(tmp_path):
    """Over rounds driven by a fake clock, the observer adds up exactly what idle_increment gives."""
    clock = [100.0]
    obs = Observer(tmp_path / "history.jsonl", None, clock=lambda: clock[0], wall=lambda: 1e9 + clock[0])
    view = {"queues": [], "gpus_free_for_waiting": ["0"]}
    obs.round(view)  # left GPU 0 able
    clock[0] = 102.0
    obs.planning(["0"])
    obs.round({"queues": [], "gpus_free_for_waiting": []})  # launched there at last
    clock[0] = 107.0
    obs.round({"queues": [], "gpus_free_for_waiting": []})
    assert obs.idle_seconds == 2.0
    assert obs.annotate({"queues": []})["idle_while_waiting_gpu_seconds"] == 2.0


def iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def test_events_from_views_and_history_lines(tmp_path):
    """task_start fires when a task shows running, task_end/task_failed/gave_up from new history lines, ends before starts."""
    history = tmp_path / "history.jsonl"
    journal.append(history, {"uni_id": "old", "state": "normal_exit", "queue": "1", "start": iso(1e9), "end": iso(1e9 + 60)})
    hooks = FakeHooks()
    obs = Observer(history, hooks)  # type: ignore[arg-type]
    running = {"queue": "1", "current": "q1-2-a", "current_state": "running", "gpu": "0", "adopted": False,
               "done": 1, "total": 3, "elapsed_s": 10.0}
    obs.round({"queues": [running]})
    assert [e[:2] for e in hooks.fired] == [("task_start", "q1-2-a")]  # the old line fires nothing
    obs.round({"queues": [running]})
    assert len(hooks.fired) == 1  # still running: no new event
    journal.append(history, {"uni_id": "q1-2-a", "state": "normal_exit", "queue": "1", "gpu": 0, "exit_status": 0,
                             "start": iso(1e9), "end": iso(1e9 + 30)})
    journal.append(history, {"uni_id": "q2-1-b", "state": "abnormal_exit", "queue": "2", "gpu": 1,
                             "error_type": "oom", "gave_up": True, "end": iso(1e9 + 30)})
    nxt = dict(running, current="q1-3-c")
    obs.round({"queues": [nxt]})
    assert [e[:2] for e in hooks.fired[1:]] == [("task_end", "q1-2-a"), ("task_failed", "q2-1-b"),
                                                ("gave_up", "q2-1-b"), ("task_start", "q1-3-c")]
    assert hooks.fired[1][2]["exit_status"] == 0 and hooks.fired[2][2]["error_type"] == "oom"
    view = obs.annotate({"queues": [dict(nxt, done=2)]})
    assert view["queues"][0]["mean_task_s"] == 45.0 and view["queues"][0]["eta_s"] == 35.0  # 45 s left - 10 s run
    assert view["recent_failures"][0]["uni_id"] == "q2-1-b"
    obs.close({"queues": []}, 0)
    assert hooks.fired[-1][0] == "all_done" and hooks.fired[-1][2]["state"] == "completed" and hooks.closed


def test_a_retry_relaunched_in_the_same_round_starts_again(tmp_path):
    """A task that failed and was relaunched within one round (same uni_id, next attempt) fires task_start again."""
    hooks = FakeHooks()
    obs = Observer(tmp_path / "h.jsonl", hooks)  # type: ignore[arg-type]
    q = {"queue": "1", "current": "x", "current_state": "running", "attempt": 1}
    obs.round({"queues": [q]})
    obs.round({"queues": [dict(q, attempt=2)]})
    assert [e[0] for e in hooks.fired] == ["task_start", "task_start"]


def test_adopted_tasks_fire_no_start_at_the_first_round(tmp_path):
    """A task a restarted daemon adopts was started before: no task_start for it."""
    hooks = FakeHooks()
    obs = Observer(tmp_path / "h.jsonl", hooks)  # type: ignore[arg-type]
    obs.round({"queues": [{"queue": "1", "current": "x", "current_state": "running", "adopted": True}]})
    assert hooks.fired == []


def test_stopped_daemon_fires_no_all_done(tmp_path):
    """all_done means every queue is done or blocked; a drained or killed daemon doesn't say it."""
    hooks = FakeHooks()
    obs = Observer(tmp_path / "h.jsonl", hooks)  # type: ignore[arg-type]
    obs.close({"queues": []}, 130)
    assert hooks.fired == [] and hooks.closed
