"""Proof under faults and load: the real daemon on simulated GPUs while a seeded chaos driver
kills supervisors and the daemon itself, and scribbles over the registry.

How a run is judged (the invariants of the project issue "Proof under faults and load"):

* Every task runs `task.sh` (CHAOS_TASK_SH below), which appends to an `events` file:
  `start UNI GPU TIME PID PGID N OUTCOME`, a `beat UNI GPU TIME PID` every 50 ms while it
  runs, and `end UNI GPU TIME STATUS PID` when it ends by itself. Lines are paired by the
  pid of the task script, so a leftover of an earlier attempt that outlives its supervisor
  is never mistaken for a later attempt of the same task.
* An attempt whose supervisor the test SIGKILLed ("killed") may have no `end` line: it was
  ended by SIGKILL, which leaves no trace. Its end is taken as its *last sign of life* (its
  last `beat` or `end` line, else its `start`). That is a lower bound of when it died, so a
  reported overlap is always a real one (no false alarms); an overlap shorter than one beat
  (50 ms) can go unseen. A leftover that the daemon failed to end keeps beating and is
  caught. The daemon's own record of the loss (history.jsonl, `error_type: lost`, `end` in
  whole seconds) is too coarse for this and is not used for timing.
* A killed attempt's outcome usually never reached gpu-compete (its supervisor died), so the
  task rightly runs again even if the killed script printed `end ... 0`; but the supervisor
  may have journaled the success just before the SIGKILL landed, and then the task must not
  run again. So a killed attempt counts as a success only if its script ended with status 0
  and the task never started again. Each task must have exactly one success by that count,
  and history.jsonl exactly one `normal_exit` line (which tells the two cases apart).
* Failures are decided per (task, start number) from the seed: line N of `plan-UNI` says
  how start N ends (`ok`, `exit:CODE`, `oom`); at most two failures per task, so every task
  eventually succeeds (a killed start consumes its line too).
* A reader thread reads the registry every few ms; every read must be a JSON object unless
  its bytes are (a prefix of) what the chaos driver itself wrote there. The copies that
  gpu-compete sets aside as `uni_id.json.corrupt-*` must also be such bytes.
* A sentinel process that gpu-compete did not start, named by registry records (a legacy
  bare pid; running records with a wrong and with the right create_time), must end the run
  alive and without having received any signal it can trap.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from gpu_compete.registry import Registry

from .daemon_harness import Attempt, DaemonRun, assert_each_succeeded_once, assert_exclusive, assert_queue_order
from .helpers import clean_env, wait_for

CHAOS_TASK_SH = r"""#!/bin/bash
# task.sh UNI_ID MILLISECONDS [MODE] -- the chaos variant; appends to ./events:
#   start UNI GPU TIME PID PGID N OUTCOME  (N: starts of this task so far, this one included)
#   beat  UNI GPU TIME PID                 (every 50 ms while it runs: a sign of life)
#   end   UNI GPU TIME STATUS PID
# OUTCOME is line N of ./plan-UNI ("ok" past its end): ok | exit:CODE | oom
uid=$1; ms=$2
here=${0%/*}
gpu=${CUDA_VISIBLE_DEVICES:-none}
read -r -a st < /proc/$$/stat
pgid=${st[4]}
n=0; [ -f "$here/count-$uid" ] && read -r n < "$here/count-$uid"
n=$((n + 1)); echo "$n" > "$here/count-$uid"
plan=(); [ -f "$here/plan-$uid" ] && mapfile -t plan < "$here/plan-$uid"
outcome=${plan[n-1]:-ok}
echo "start $uid $gpu $EPOCHREALTIME $$ $pgid $n $outcome" >> "$here/events"
deadline=$(( ${EPOCHREALTIME/./} + ms * 1000 ))
while :; do
  left=$(( deadline - ${EPOCHREALTIME/./} ))
  [ "$left" -le 0 ] && break
  [ "$left" -gt 50000 ] && left=50000
  printf -v pause '0.%06d' "$left"
  sleep "$pause"
  echo "beat $uid $gpu $EPOCHREALTIME $$" >> "$here/events"
done
status=0
case "$outcome" in
  exit:*) status=${outcome#exit:}; echo "failing on purpose with status $status" >&2 ;;
  oom) echo "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" >&2; status=1 ;;
esac
echo "end $uid $gpu $EPOCHREALTIME $status $$" >> "$here/events"
exit "$status"
"""

SENTINEL_PY = textwrap.dedent("""
    import signal, sys, time
    log = sys.argv[1]
    def record(signum, frame):
        with open(log, "a") as fh:
            fh.write(f"{signum}\\n")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                signal.SIGQUIT, signal.SIGALRM, signal.SIGPIPE, signal.SIGCONT):
        signal.signal(sig, record)
    open(log + ".ready", "w").close()
    while True:
        time.sleep(3600)
""")

FAILURES = ("exit:3", "exit:42", "oom")
ALLOWED_ERROR_TYPES = {"oom", "unknown", "lost"}  # exit:N is `unknown`; a killed supervisor is `lost`


@dataclass
class ChaosAttempt(Attempt):
    pid: int = 0
    pgid: int = 0
    n: int = 0
    outcome: str = "ok"
    last_seen: float = 0.0
    killed: bool = False


def parse_events(path: Path, killed: set[tuple[str, int]]) -> list[ChaosAttempt]:
    """Attempts from the events file, paired by the script's pid; `killed` holds (uni_id, pgid)
    of attempts whose supervisor the test SIGKILLed. An attempt without an `end` line ends at
    its last sign of life; a killed attempt's status is dropped (its outcome was lost) unless
    it ended with 0 and its task never started again (its success was journaled in time)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    open_: dict[int, ChaosAttempt] = {}
    done: list[ChaosAttempt] = []
    for line in lines:
        parts = line.split()
        kind, uid, gpu, t = parts[0], parts[1], parts[2], float(parts[3])
        if kind == "start":
            pid = int(parts[4])
            if pid in open_:  # a reused pid: that earlier script is certainly gone
                done.append(open_.pop(pid))
            open_[pid] = ChaosAttempt(uid, gpu, t, pid=pid, pgid=int(parts[5]), n=int(parts[6]), outcome=parts[7],
                                      last_seen=t)
        elif kind == "beat":
            a = open_.get(int(parts[4]))
            if a is not None and a.uni_id == uid:
                a.last_seen = max(a.last_seen, t)
        elif kind == "end":
            a = open_.get(int(parts[5]))
            if a is not None and a.uni_id == uid:
                del open_[a.pid]
                a.end, a.status, a.last_seen = t, int(parts[4]), max(a.last_seen, t)
                done.append(a)
    attempts = sorted(done + list(open_.values()), key=lambda a: a.start)
    last = {a.uni_id: a for a in attempts}
    for a in attempts:
        a.killed = (a.uni_id, a.pgid) in killed
        if a.end is None:
            a.end = a.last_seen
        if a.killed and not (a.status == 0 and last[a.uni_id] is a):
            a.status = None
    return attempts


def task_processes(namespace: str) -> list[psutil.Process]:
    """Live processes started for this run's tasks (their environment names our state dir)."""
    found = []
    for proc in psutil.process_iter(["uids", "status"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != os.getuid():
                continue
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("GPU_COMPETE_NAMESPACE") == namespace:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


class RegistryWatcher(threading.Thread):
    """Reads the registry every few ms; keeps every read that is not a JSON object."""

    def __init__(self, path: Path, interval: float = 0.003):
        super().__init__(daemon=True)
        self.path, self.interval = path, interval
        self.reads = 0
        self.bad: dict[bytes, int] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                time.sleep(self.interval)
                continue
            try:  # one read call: on a regular file it returns the file, or a prefix of it
                data = os.read(fd, os.fstat(fd).st_size + 65536)
            finally:
                os.close(fd)
            self.reads += 1
            try:
                ok = isinstance(json.loads(data), dict)
            except (ValueError, RecursionError):
                ok = False
            if not ok:
                self.bad[data] = self.bad.get(data, 0) + 1
            time.sleep(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)


class Sentinel:
    """A process gpu-compete did not start: it records every trappable signal it receives."""

    def __init__(self, tmp_path: Path):
        self.log = tmp_path / "sentinel-signals"
        self.proc = subprocess.Popen([sys.executable, "-c", SENTINEL_PY, str(self.log)], start_new_session=True,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=clean_env())
        wait_for(lambda: Path(str(self.log) + ".ready").exists(), 10, "the sentinel to trap its signals")
        self.pid = self.proc.pid
        self.create_time = psutil.Process(self.pid).create_time()

    def records(self) -> dict:
        right = {"pid": self.pid, "state": "running", "retry_count": 0, "create_time": self.create_time,
                 "pgid": self.pid, "supervisor_pid": self.pid, "supervisor_create_time": self.create_time, "gpu": 0}
        wrong = dict(right, create_time=self.create_time - 3600, supervisor_create_time=self.create_time - 3600, gpu=1)
        return {"stranger": self.pid, "stranger-wrong-ct": wrong, "stranger-right-ct": right}

    def plant(self, registry: Path) -> None:
        """As a well-behaved third party: under the registry's lock, atomically."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the registry may hold the driver's garbage right now
            Registry(registry).update(lambda data: data.update(self.records()))

    def problems(self) -> list[str]:
        out = []
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.05:
                out.append("the sentinel's pid now names another process")
            elif proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_STOPPED, psutil.STATUS_DEAD):
                out.append(f"the sentinel is {proc.status()}")
        except psutil.NoSuchProcess:
            out.append(f"the sentinel died (exit {self.proc.poll()})")
        if self.log.exists() and self.log.read_text().strip():
            out.append(f"the sentinel received signals {self.log.read_text().split()}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # our own child
        self.proc.wait(timeout=10)


@dataclass
class Budget:
    daemon_kills: int
    supervisor_kills: int
    garbage: int
    truncations: int


@dataclass
class Scenario:
    seed: int
    queues: int
    tasks_per_queue: tuple[int, int]
    budget: Budget
    bound_s: float  # the whole run, chaos included, must end within this
    gpus: str = "4x24"
    failures: bool = True  # planned failures (exit codes, OOM) on top of the driver's faults


class ChaosRun:
    def __init__(self, tmp_path: Path, scenario: Scenario, blocks: list | None = None):
        """`blocks` as DaemonRun takes them, with milliseconds for seconds; drawn from the seed if None."""
        self.sc = scenario
        self.rng = random.Random(scenario.seed)
        rng = self.rng
        if blocks is None:
            blocks = []
            for q in range(1, scenario.queues + 1):
                queue = rng.choice([str(q), f"exp{q}", f"vision.{q}", f"nlp-{q}"])
                vram = rng.choice([1, 4, 8, 16, 20])
                for pos in range(1, rng.randint(*scenario.tasks_per_queue) + 1):
                    # mostly short; one in five outlives a daemon's restart, to be adopted (or not)
                    ms = rng.randint(1200, 2000) if rng.random() < 0.2 else rng.randint(200, 600)
                    blocks.append((queue, vram, f"{queue}/{pos}", ms, "chaos"))
        self.blocks = blocks
        self.run = DaemonRun(tmp_path, blocks, simulate=scenario.gpus)
        (tmp_path / "task.sh").write_text(CHAOS_TASK_SH)  # replaces the harness's script
        self.queues: dict[str, list[str]] = {}
        for queue, _, name, _, _ in blocks:
            self.queues.setdefault(queue, []).append(self.run.names[name])
        self.uids = [u for us in self.queues.values() for u in us]
        self.plans: dict[str, list[str]] = {}
        for uid in self.uids:
            plan = [rng.choice(("ok", "ok", "ok") + FAILURES) for _ in range(3)] if scenario.failures else ["ok"]
            while sum(o != "ok" for o in plan) > 2:
                plan[plan.index(next(o for o in plan if o != "ok"))] = "ok"
            self.plans[uid] = plan
            (tmp_path / f"plan-{uid}").write_text("\n".join(plan) + "\n")
        self.dir = tmp_path
        self.registry = self.run.state / "uni_id.json"
        self.namespace = str(self.run.state.resolve())
        self.argv = self.run.argv("--backoff", "0.5", "--retry-burst", "3", "--settle", "5")
        self.daemon: subprocess.Popen | None = None
        self.incarnations = 0
        self.chaos_bytes: list[bytes] = []  # everything the driver wrote into the registry itself
        self.killed: set[tuple[str, int]] = set()  # (uni_id, pgid of the killed attempt)
        self.log: list[str] = []  # what the driver did, for failure messages
        self.exit_codes: list[int] = []
        self.done: Counter = Counter()  # chaos actions carried out, by kind

    # --- the daemon ------------------------------------------------------------------------

    def start_daemon(self) -> None:
        self.incarnations += 1
        i = self.incarnations
        out, err = open(self.dir / f"daemon-{i}.out", "w"), open(self.dir / f"daemon-{i}.err", "w")
        with out, err:
            self.daemon = subprocess.Popen(self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                           env=clean_env())
        self.note(f"daemon #{i} started (pid {self.daemon.pid})")

    def kill_daemon(self) -> None:
        assert self.daemon is not None
        os.kill(self.daemon.pid, signal.SIGKILL)  # our own child
        self.daemon.wait()
        self.note(f"daemon #{self.incarnations} SIGKILLed")
        self.daemon = None

    def daemon_err(self) -> str:
        try:
            return (self.dir / f"daemon-{self.incarnations}.err").read_text()[-4000:]
        except OSError:
            return ""

    # --- chaos actions ---------------------------------------------------------------------

    def note(self, what: str) -> None:
        self.log.append(f"{time.time():.3f} {what}")

    def records(self) -> dict:
        try:
            data = json.loads(self.registry.read_bytes())
        except (OSError, ValueError, RecursionError):
            return {}
        return data if isinstance(data, dict) else {}

    def victims(self) -> list[tuple[str, psutil.Process, int]]:
        """Running supervisors of this run's tasks, each proven to be one: its pid and create
        time are the record's, it is titled `gpu-compete: supervisor <uni_id>`, and
        its one child, the task's shell and process-group leader, carries the record's uni_id
        and our namespace in its environment. (A supervisor is forked, not exec'd, so its own
        /proc environ is still the daemon's; the task environment shows in its child.)"""
        out = []
        records = self.records()
        for uid in self.uids:
            rec = records.get(uid)
            if not isinstance(rec, dict) or rec.get("state") != "running":
                continue
            sup, sct = rec.get("supervisor_pid"), rec.get("supervisor_create_time")
            if not isinstance(sup, int) or not isinstance(sct, (int, float)):
                continue
            try:
                proc = psutil.Process(sup)
                if abs(proc.create_time() - sct) >= 0.05 or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                if " ".join(proc.cmdline()).strip() != f"gpu-compete: supervisor {uid}":
                    continue  # its title, set by setproctitle in the fork
                env = proc.environ()
                kids = proc.children()
                if len(kids) != 1:
                    continue
                kid = kids[0]
                kid_env = kid.environ()
                if env.get("GPU_COMPETE_UNI_ID", uid) != uid or kid_env.get("GPU_COMPETE_UNI_ID") != uid:
                    continue
                if kid_env.get("GPU_COMPETE_NAMESPACE") != self.namespace or os.getpgid(kid.pid) != kid.pid:
                    continue
            except (psutil.Error, OSError):
                continue
            out.append((uid, proc, kid.pid))
        return out

    def kill_supervisor(self) -> bool:
        victims = self.victims()
        if not victims:
            return False
        uid, proc, pgid = self.rng.choice(victims)
        self.killed.add((uid, pgid))  # before the kill: its script may write its end line at once
        try:
            proc.send_signal(signal.SIGKILL)  # psutil checks it is still the same process
        except psutil.Error:
            self.killed.discard((uid, pgid))
            return False
        self.note(f"SIGKILLed supervisor {proc.pid} of {uid} (task group {pgid})"
                  f"{'' if self.daemon else ' while no daemon runs'}")
        return True

    def garbage(self) -> None:
        token = f"chaos-{len(self.chaos_bytes)}-{self.rng.getrandbits(32):08x}".encode()
        kind = self.rng.choice(["bytes", "torn", "nested", "array", "text", "empty"])
        payload = {
            "bytes": bytes(self.rng.getrandbits(8) for _ in range(self.rng.randint(1, 400))) + token,
            "torn": b'{\n  "' + token + b'": {\n    "pid": 12',
            "nested": b"[" * 100_000 + token,
            "array": b'["' + token + b'", 1, 2]',
            "text": b"some editor was here " + token + b"\n",
            "empty": b"",
        }[kind]
        self.chaos_bytes.append(payload)
        # A careless third party: truncate in place and write in two pieces.
        with open(self.registry, "wb") as fh:
            half = len(payload) // 2
            fh.write(payload[:half])
            fh.flush()
            time.sleep(0.002)
            fh.write(payload[half:])
        self.note(f"overwrote the registry with {kind} garbage ({len(payload)} bytes)"
                  f"{'' if self.daemon else ' while no daemon runs'}")

    def truncate(self) -> None:
        try:
            fd = os.open(self.registry, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            content = os.read(fd, 1 << 24)
            keep = self.rng.randint(0, max(0, len(content) - 1))
            self.chaos_bytes.append(content[:keep])  # before the cut: readers may see it at once
            os.ftruncate(fd, keep)
        finally:
            os.close(fd)
        self.note(f"truncated the registry to {keep} of {len(content)} bytes")

    # --- the driver ------------------------------------------------------------------------

    def progress(self) -> float:
        """The share of tasks with a success in the history."""
        done = {h.get("uni_id") for h in self.run.history() if h.get("state") == "normal_exit"}
        return len(done & set(self.uids)) / len(self.uids)

    def drive(self, sentinel: Sentinel) -> float:
        """Run the daemon under chaos until it exits 0; returns the seconds it took.

        Actions come at seeded random gaps (0.15-0.7 s), faster (0.03-0.12 s) while the share
        of the budget spent lags behind the share of tasks completed, so the whole budget is
        spent before the run ends whatever the machine's speed. A killed daemon is restarted
        0.1-0.6 s later, and the next action comes before that restart: a supervisor killed or
        a registry damaged while no daemon runs is where faults compound."""
        rng, budget = self.rng, self.sc.budget
        left = {"daemon": budget.daemon_kills, "supervisor": budget.supervisor_kills,
                "garbage": budget.garbage, "truncate": budget.truncations}
        total = sum(left.values())
        began = time.monotonic()
        deadline = began + self.sc.bound_s
        self.start_daemon()
        next_action = began + rng.uniform(0.3, 0.8)
        restart_at = replant_at = None
        progress, progress_at = 0.0, 0.0
        while True:
            now = time.monotonic()
            if now > deadline:
                raise AssertionError(f"the run did not finish in {self.sc.bound_s:g} s\n" + self.story())
            if self.daemon is None:
                if now >= restart_at:
                    self.start_daemon()
            else:
                rc = self.daemon.poll()
                if rc is not None:
                    self.exit_codes.append(rc)
                    assert rc == 0, f"daemon #{self.incarnations} exited {rc}\n" + self.story()
                    return now - began
            if replant_at is not None and now >= replant_at:
                sentinel.plant(self.registry)
                replant_at = None
            if now - progress_at > 0.1:
                progress, progress_at = self.progress(), now
            if now >= next_action and any(left.values()):
                action = rng.choice([a for a, n in left.items() if n > 0])
                done = True
                if action == "daemon":
                    if self.daemon is None:
                        done = False
                    else:
                        self.kill_daemon()
                        restart_at = now + rng.uniform(0.1, 0.6)
                elif action == "supervisor":
                    done = self.kill_supervisor()
                elif action == "garbage":
                    self.garbage()
                    replant_at = now + rng.uniform(0.05, 0.5)
                else:
                    self.truncate()
                    replant_at = now + rng.uniform(0.05, 0.5)
                if done:
                    left[action] -= 1
                    self.done[action] += 1
                    lagging = sum(self.done.values()) / total < progress / 0.75
                    next_action = now + (rng.uniform(0.03, 0.12) if lagging else rng.uniform(0.15, 0.7))
                    if action == "daemon":  # faults compound while no daemon runs: act before the restart
                        next_action = min(next_action, now + rng.uniform(0.0, restart_at - now))
                else:
                    next_action = now + 0.05
            time.sleep(0.01)

    def story(self) -> str:
        return (f"files: {self.dir}\ndriver log (last 60):\n  " + "\n  ".join(self.log[-60:])
                + f"\nlast daemon's stderr (tail):\n{self.daemon_err()[-2000:]}")

    def cleanup(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait()
        for proc in task_processes(self.namespace):  # only processes carrying our run's namespace
            try:
                proc.kill()
            except psutil.Error:
                pass


def check_run(chaos: ChaosRun, watcher: RegistryWatcher | None = None, sentinel: Sentinel | None = None) -> dict:
    """Every invariant of the issue (those on the registry reads and the sentinel when given them);
    fails listing every one that broke, else returns a summary."""
    run, uids = chaos.run, chaos.uids
    broken: list[str] = []

    def check(what: str, condition: bool, detail: object = "") -> None:
        if not condition:
            broken.append(f"{what}: {detail}")

    # Nothing of ours outlives the daemon for longer than a task could (2 s), plus slack.
    deadline = time.monotonic() + 5
    while task_processes(chaos.namespace) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftovers = [(p.pid, p.info.get("status")) for p in task_processes(chaos.namespace)]
    check("task processes outlived the daemon", not leftovers, leftovers)

    attempts = parse_events(run.dir / "events", chaos.killed)
    by_task: dict[str, list[ChaosAttempt]] = defaultdict(list)
    for a in attempts:
        by_task[a.uni_id].append(a)

    def show(uid: str) -> list[str]:
        return [f"#{a.n} gpu {a.gpu} {a.start:.3f}-{a.end:.3f} status {a.status}{' KILLED' if a.killed else ''}"
                for a in by_task[uid]]

    # 1. every task completed exactly once as a success; nothing that succeeded ran again
    unended = [a for a in attempts if a.status is None and not a.killed]  # the daemon must not end healthy tasks
    check("attempts ended by someone other than the driver", not unended, unended)
    once = Counter(a.uni_id for a in attempts if a.status == 0)
    check("tasks without exactly one successful attempt (events)", all(once[u] == 1 for u in uids),
          {u: show(u) for u in uids if once[u] != 1})
    check("tasks whose last attempt was not their success", all(by_task[u] and by_task[u][-1].status == 0 for u in uids),
          {u: show(u) for u in uids if not (by_task[u] and by_task[u][-1].status == 0)})
    astray = [a for a in attempts if not a.killed and a.status != 0
              and a.status != {"ok": 0, "oom": 1}.get(a.outcome, int(a.outcome[5:]) if a.outcome[:5] == "exit:" else -1)]
    check("attempts that did not end as planned", not astray, astray)
    history = run.history()
    successes = Counter(h["uni_id"] for h in history if h.get("state") == "normal_exit")
    check("tasks without exactly one normal_exit line in history.jsonl", successes == Counter(uids),
          {u: [h for h in history if h["uni_id"] == u] for u in set(uids) | set(successes) if successes[u] != 1})
    errors = Counter(h.get("error_type") for h in history if h.get("state") == "abnormal_exit")
    check("unexpected error types in the history", set(errors) <= ALLOWED_ERROR_TYPES, errors)
    oom_tasks = {uid for uid, plan in chaos.plans.items() if "oom" in plan}
    oom_lines = {h["uni_id"] for h in history if h.get("error_type") == "oom"}
    check("tasks classified oom that never printed it", oom_lines <= oom_tasks, oom_lines - oom_tasks)
    # ... and the harness's own view of the same
    for invariant, args in ((assert_each_succeeded_once, (attempts, uids)),
                            # 2. no overlap within a queue, and its order held
                            (assert_queue_order, (attempts, chaos.queues)),
                            # 3. in exclusive mode no GPU ran two tasks at once
                            (assert_exclusive, (attempts,))):
        try:
            invariant(*args)
        except AssertionError as exc:
            broken.append(f"{invariant.__name__}: {exc}")
    # 4. the registry was a whole JSON object at every read, except for the driver's own bytes
    if watcher is not None:
        not_ours = [data[:120] for data in watcher.bad if not any(c.startswith(data) for c in chaos.chaos_bytes)]
        check("registry reads that were neither a JSON object nor the driver's bytes", not not_ours, not_ours)
        check("the reader thread barely read the registry", watcher.reads > 100, watcher.reads)
    asides = sorted(run.state.glob("uni_id.json.corrupt-*"))
    wrongly = [p.name for p in asides if not any(c.startswith(p.read_bytes()) for c in chaos.chaos_bytes)]
    check("registry files set aside that the driver did not write", not wrongly, wrongly)
    # 5. no stranger was signalled
    if sentinel is not None:
        check("the sentinel", not sentinel.problems(), sentinel.problems())

    assert not broken, "\n".join(["invariants broken:", *broken, chaos.story()])
    return {"tasks": len(uids), "attempts": len(attempts), "killed attempts": sum(a.killed for a in attempts),
            "daemons": chaos.incarnations, "registry reads": watcher.reads if watcher else 0,
            "chaos reads": sum(watcher.bad.values()) if watcher else 0, "set aside": len(asides),
            "history errors": dict(errors), "driver actions": dict(chaos.done)}


def run_chaos(tmp_path: Path, scenario: Scenario) -> dict:
    chaos = ChaosRun(tmp_path, scenario)
    sentinel = Sentinel(tmp_path)
    watcher = RegistryWatcher(chaos.registry)
    try:
        sentinel.plant(chaos.registry)
        watcher.start()
        took = chaos.drive(sentinel)
        watcher.stop()
        summary = check_run(chaos, watcher, sentinel)
        summary["seconds"] = round(took, 1)
        print(f"chaos seed {scenario.seed}: {summary}")
        return summary
    finally:
        watcher.stop()
        chaos.cleanup()
        sentinel.close()
        (tmp_path / "driver.log").write_text("\n".join(chaos.log) + "\n")


def test_chaos_every_task_succeeds_once_in_order_on_exclusive_gpus(tmp_path):
    """Under seeded chaos (failing and OOMing tasks, SIGKILLed supervisors and daemon, a registry overwritten
    with garbage or truncated) every task succeeds exactly once, queues keep order without overlap, GPUs stay
    exclusive, gpu-compete's registry writes are always whole, and no stranger is signalled."""
    scenario = Scenario(seed=20261122, queues=12, tasks_per_queue=(3, 4),
                        budget=Budget(daemon_kills=4, supervisor_kills=6, garbage=3, truncations=3), bound_s=50)
    summary = run_chaos(tmp_path, scenario)
    assert summary["daemons"] >= 4 and summary["killed attempts"] >= 3, f"too little chaos happened: {summary}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_long_chaos_with_more_queues_and_more_kills(tmp_path, seed):
    """The same invariants hold over longer seeded chaos runs with more queues, tasks and faults."""
    scenario = Scenario(seed=seed, queues=20, tasks_per_queue=(3, 5),
                        budget=Budget(daemon_kills=8, supervisor_kills=14, garbage=6, truncations=6), bound_s=150)
    summary = run_chaos(tmp_path, scenario)
    assert summary["daemons"] >= 7 and summary["killed attempts"] >= 7, f"too little chaos happened: {summary}"


# --- focused reproductions of what chaos runs found ---------------------------------------------

def _focused(tmp_path: Path, gpus: str = "2x24") -> ChaosRun:
    """One queue: a 2 s task (it outlives a daemon's restart), then a short one; no planned failures."""
    scenario = Scenario(seed=0, queues=0, tasks_per_queue=(0, 0), budget=Budget(0, 0, 0, 0), bound_s=30,
                        gpus=gpus, failures=False)
    return ChaosRun(tmp_path, scenario, blocks=[("1", 1, "long", 2000, "chaos"), ("1", 1, "next", 200, "chaos")])


def _wait_until_recorded(chaos: ChaosRun) -> None:
    """The long task runs and its supervisor has recorded its process group."""
    uid = chaos.run.names["long"]
    wait_for(lambda: (chaos.dir / "events").exists() and chaos.records().get(uid, {}).get("pgid"), 20,
             "the long task to start and be recorded")


def _finish_and_check(chaos: ChaosRun) -> None:
    wait_for(lambda: chaos.daemon.poll() is not None, 30, "the restarted daemon to finish")
    assert chaos.daemon.returncode == 0, chaos.daemon_err()
    check_run(chaos)


@pytest.mark.parametrize("gpus", ["2x24", "1x24"])
def test_a_task_still_running_is_not_started_again_after_its_record_was_wiped_and_the_daemon_killed(tmp_path, gpus):
    """A registry overwritten with garbage just before the daemon is SIGKILLed must not make the restarted daemon
    run again a task whose process still runs: not beside it (2 GPUs), nor after its success was journaled (1 GPU)."""
    chaos = _focused(tmp_path, gpus)
    try:
        chaos.start_daemon()
        _wait_until_recorded(chaos)
        chaos.chaos_bytes.append(b"\x00not json{")
        chaos.registry.write_bytes(chaos.chaos_bytes[-1])
        chaos.kill_daemon()
        chaos.start_daemon()
        _finish_and_check(chaos)
    finally:
        chaos.cleanup()


def test_a_supervisor_killed_while_no_daemon_runs_leaves_nothing_running_when_its_task_is_retried(tmp_path):
    """A task whose supervisor is SIGKILLed while no daemon runs is retried by the restarted daemon only
    after what the supervisor left behind (the task's script) has been ended."""
    chaos = _focused(tmp_path)
    try:
        chaos.start_daemon()
        _wait_until_recorded(chaos)
        chaos.kill_daemon()
        assert chaos.kill_supervisor(), "no verifiable supervisor to kill"
        chaos.start_daemon()
        _finish_and_check(chaos)
    finally:
        chaos.cleanup()
