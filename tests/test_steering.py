"""Applying a reload to the daemon's queues (in-process, no processes): what stays at a
queue's front, what is dropped, and what an added task remembers from the history."""

from __future__ import annotations

import json
from types import SimpleNamespace

from gpu_compete.commandfile import parse
from gpu_compete.steering import Steering
from gpu_compete.tasks import Queue, Task, TaskState, group_queues


def daemon(text, history):
    specs = parse(text).tasks
    queues = {q: Queue(Task(s) for s in ss) for q, ss in group_queues(specs).items()}
    return SimpleNamespace(queues=queues, tasks={t.uni_id: t for q in queues.values() for t in q},
                           history=SimpleNamespace(journaled=set()),
                           config=SimpleNamespace(fresh=False, history=history))


def blocks(*names, queue="1"):
    return "".join(f"echo {n}\n{queue},1\n\n" for n in names)


def names(queue):
    return [t.spec.commands[0].split()[1] for t in queue]


def test_tasks_in_progress_stay_at_the_front_and_the_rest_follow_the_file(tmp_path):
    """A running task and a failed one waiting to retry keep the front; pending tasks take the
    file's new order, an inserted one included."""
    d = daemon(blocks("a", "b", "c", "d"), tmp_path / "h")
    d.queues["1"][1].state = TaskState.RUNNING
    d.queues["1"][0].state = TaskState.COMPLETED
    steer = Steering(d)
    change = steer.apply(parse(blocks("x", "d", "a", "c", "b")).tasks)
    assert names(d.queues["1"]) == ["b", "x", "d", "a", "c"]
    assert d.queues["1"].head().spec.commands == ("echo b",)
    assert len(change.added) == 1 and change.removed_running == () and change.removed_pending == ()


def test_a_removed_running_task_runs_out_and_its_queue_waits_for_it(tmp_path):
    """A running task gone from the file stays its queue's head until it ends, then is dropped;
    a removed pending task is dropped at once."""
    d = daemon(blocks("a", "b", "c"), tmp_path / "h")
    running = d.queues["1"][0]
    running.state = TaskState.RUNNING
    steer = Steering(d)
    change = steer.apply(parse(blocks("c")).tasks)
    assert change.removed_running == (running.uni_id,) and len(change.removed_pending) == 1
    assert d.queues["1"].head() is running and names(d.queues["1"]) == ["a", "c"]
    running.state = TaskState.COMPLETED
    steer.killing = {}
    steer.after_collect(0.0)
    assert names(d.queues["1"]) == ["c"] and running.uni_id not in d.tasks


def test_an_added_task_remembers_completion_skip_and_give_up_from_the_history(tmp_path):
    """A block added back after it completed, was skipped or failed for good is not run again."""
    history = tmp_path / "h"
    d = daemon(blocks("a"), history)
    later = parse(blocks("a", "done", "skipped", "failed")).tasks
    d.history.journaled = {later[1].uni_id}
    history.write_text(json.dumps({"uni_id": later[2].uni_id, "state": "skipped"}) + "\n"
                       + json.dumps({"uni_id": later[3].uni_id, "state": "abnormal_exit", "gave_up": True,
                                     "error_type": "oom"}) + "\n")
    Steering(d).apply(later)
    assert [t.state for t in d.queues["1"]] == [TaskState.PENDING, TaskState.COMPLETED, TaskState.SKIPPED,
                                                TaskState.FAILED]


def test_skipped_tasks_are_passed_over_and_unskip_rewinds(tmp_path):
    """A queue's head moves past skipped tasks; rewinding finds one that was unskipped."""
    d = daemon(blocks("a", "b"), tmp_path / "h")
    q = d.queues["1"]
    q[0].state = TaskState.SKIPPED
    assert q.head() is q[1]
    q[0].state = TaskState.PENDING
    q.rewind()
    assert q.head() is q[0]
