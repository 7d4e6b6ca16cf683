"""The node agent: everything of a run that touches one machine's processes and GPUs.

A coordinator decides what runs where; an agent probes its node's GPUs, starts the
supervisors it is told to start, says how each of its tasks is doing, ends tasks on request
and serves their logs. It decides nothing. Its calls take and return plain values
(`GpuSnapshot`s, `TaskSpec`s, dicts), so the same class runs in-process or as a Ray actor
pinned to its node (`cluster.py`).

Files: the node keeps its registry and logs in `<state_dir>/nodes/<node>/` on its own disk
(wrapped scripts there register locally, as on one machine). The directory is also the
namespace that identifies our processes, so "nodes" that are one machine (as in tests) never
take each other's tasks, nor see each other's simulated GPUs.

An agent is served by Ray on two threads: `observe` may wait for something to happen while
`launch` and `kill` go on. Supervisors are forked by a single-threaded fork server
(`forkserver.py`), never from this process with threads; they outlive the agent.
"""

from __future__ import annotations

import os
import select
import threading
import time
from pathlib import Path
from typing import Any, Callable

from . import evidence, launcher, procs, stopping
from .agent_local import OneMachine
from .forkserver import ForkServer
from .gpus import open_probe
from .gpus.base import GpuProbe, GpuSnapshot, current_user
from .hostguard import GuardWatch, HostGuard
from .outcomes import GHOST_S
from .placing import dead_listed, descends, roots_of, tree_on
from .records import Records, launch_fields
from .registry import Registry, private_dirs
from .tasks import GIB, TaskSpec
from .timefmt import iso
from .vram import VramWatch, peak_to_write

#: How often a wait looks at its supervisors where the kernel has no pidfd to wait on.
_POLL_S = 0.1


def _record_row(record: dict[str, Any]) -> dict[str, Any]:
    """What `gpu-compete status` shows of a task's registry record, with whether its pid is
    alive here (only this node can tell)."""
    return {"state": record.get("state"), "pid": record.get("pid"), "retry_count": record.get("retry_count"),
            "error_type": record.get("error_type"), "gpu": record.get("gpu"), "retry_at": record.get("retry_at"),
            "alive": procs.liveness(record.get("pid"), record.get("create_time"))}


def node_dir(state_dir: str | os.PathLike[str], node: str) -> Path:
    return Path(state_dir) / "nodes" / node


class Agent(OneMachine):
    def __init__(self, node: str | None, state_dir: str, work_dir: str, simulate: str | None = None,
                 gpus: str = "all", kill_grace: float = 10.0, fence_s: float | None = None,
                 contact_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 min_free_ram: float | None = None, min_free_disk: float | None = None, *,
                 probe: GpuProbe | None = None, registry: str | os.PathLike[str] | None = None):
        """`node=None`: the agent of a single-machine run, in the daemon's process. Its files
        are the run's own (`state_dir`, the `registry` given), its GPUs keep their plain keys,
        it uses the `probe` the command line opened, and it forks supervisors itself (the
        daemon is single-threaded); it has no heartbeat, since no coordinator elsewhere may
        count its tasks lost.

        `fence_s`: the coordinator's --node-timeout. While this agent lives it touches
        `agent.alive` every second; a supervisor started here ends its task (as lost) once the
        file is older than `fence_s`. The coordinator counts a node's tasks lost (and runs them
        elsewhere) only after it has not heard from the node for longer than that, so a node
        whose Ray processes died (the machine alive) never keeps a second copy running.

        `contact_s`: the file is touched only while a coordinator has called within that long,
        or is known to be gone (`owner_gone`, see `attach_owner`). A node cut off from the
        coordinator while its agent lives (a partition) thus ends its tasks before they run
        elsewhere; a dead coordinator stops nothing (the agents live on, and a restarted one
        adopts the tasks).

        `min_free_ram`, `min_free_disk`: the host guards (GB), checked on this node; `observe`
        says why they hold (`"guard"`), and the coordinator starts nothing here meanwhile."""
        self.node = node
        # In-process, the state directory is the run's as given: it names the run's processes
        # (their namespace), as the daemon's and its wrapped scripts' do.
        self.state = node_dir(state_dir, node).resolve() if node is not None else Path(state_dir)
        if node is not None:  # (in-process, the daemon makes its directories when it takes them)
            private_dirs(self.state / "logs")
        self.paths = launcher.LaunchPaths(Path(work_dir), self.state,
                                          Path(registry) if registry is not None else self.state / "uni_id.json",
                                          self.state / "history.jsonl")
        self.namespace = str(self.state)
        self.registry = Registry(self.paths.registry)
        self.records = Records(self.registry)  # the node's registry: every write of ours goes through it
        self.probe = probe if probe is not None else open_probe(simulate=simulate, gpus=gpus, namespace=self.namespace)
        self.kill_grace = kill_grace
        self.heartbeat = self.state / "agent.alive"
        self.fence = (str(self.heartbeat), fence_s) if fence_s else None
        self.clock = clock
        self.contact_s = contact_s
        self.last_contact = clock()
        self.owner_gone: Callable[[], bool] = lambda: False
        if node is not None:
            self._beat()
        if self.fence:
            threading.Thread(target=self._beat_forever, name="agent-heartbeat", daemon=True).start()
        self.forks = ForkServer() if node is not None else None
        self.children: dict[str, launcher.Child] = {}  # supervisors this agent started
        self.exits: dict[str, int] = {}  # uid -> a pidfd of its supervisor (readable once it exits)
        self.gpu_pids: dict[str, set[int]] = {}  # pids of each running task seen on its GPUs
        self.ghosts: dict[int, float] = {}  # pid of an ended task -> until when it is not counted
        self.pids_ours = False  # NVML has listed a task of ours by its pid here: same pid namespace
        self.vram = VramWatch(descends, current_user())
        self.peaks: dict[str, list[int]] = {}  # uid -> [peak bytes of this attempt, as last written]
        self.guard = GuardWatch(HostGuard(min_free_ram, min_free_disk), Path(work_dir), lambda: iso(time.time()))
        self.lock = threading.Lock()
        self.ending: set[str] = set()  # tasks being killed by `end`: said to run until that is done
        self._news = False  # something a waiting observe must return for (an `end` done)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # --- the three calls ----------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        self._contact()
        return {"node": self.node, "pid": os.getpid(), "state_dir": str(self.state)}

    def attach_owner(self, gone: Callable[[], bool]) -> None:
        """How to tell that the coordinator now driving this agent is gone for good (its process
        ended), as opposed to cut off: True only on proof (see `cluster.AgentActor.own`)."""
        self.owner_gone = gone
        self._contact()

    def should_beat(self) -> bool:
        """Touch the heartbeat now? While a coordinator calls, or once it is known to be gone
        (nobody runs this node's tasks elsewhere then); not while it may be alive and cut off."""
        if self.contact_s is None or self.clock() - self.last_contact <= self.contact_s:
            return True
        try:
            return bool(self.owner_gone())
        except Exception:  # noqa: BLE001 - cannot tell: not a proof
            return False

    def snapshot(self) -> list[GpuSnapshot]:
        """This node's GPUs, named `node/key` (plain keys in-process)."""
        self._contact()
        return [_named(s, self.node) for s in self.probe.snapshot()]

    def start(self, spec: TaskSpec, keys: list[str], cuda_visible: list[str], attempt: int,
              timeout_s: float | None = None) -> launcher.Child:
        """Fork a supervisor for the task on these local GPU keys; records nothing. In-process
        the daemon forks it (and waits for it); on a node the fork server does, and the
        supervisor's exit is watched through a pidfd."""
        gpus = tuple(keys) if len(keys) > 1 else ()
        if self.forks is None:
            child = launcher.start(spec, keys[0], attempt, self.paths, cuda_visible=",".join(cuda_visible),
                                   gpus=gpus, timeout_s=timeout_s, grace_s=self.kill_grace)
        else:
            pid, done_fd = self.forks.start(spec=spec, gpu=keys[0], attempt=attempt, paths=self.paths,
                                            cuda_visible=",".join(cuda_visible), gpus=gpus, timeout_s=timeout_s,
                                            grace_s=self.kill_grace, node=self.node, fence=self.fence)
            os.set_blocking(done_fd, False)
            child = launcher.Child(pid, done_fd)  # the fork server's child, not ours: never waited on here
            try:
                self.exits[spec.uni_id] = os.pidfd_open(child.pid)
            except OSError:  # an old kernel, or it has ended already: the wait polls instead
                pass
        self.children[spec.uni_id] = child
        return child

    def launch(self, spec: TaskSpec, keys: list[str], cuda_visible: list[str], attempt: int, retry_count: int,
               timeout_s: float | None = None) -> dict[str, Any]:
        """Start a supervisor for the task on these local GPU keys; its registry record is
        written here (the node's registry), as the single-machine daemon writes it."""
        self._contact()
        with self.lock:
            child = self.start(spec, keys, cuda_visible, attempt, timeout_s)
            created = procs.create_time(child.pid)
            now = iso(time.time())
            # (if the disk refuses it, the supervisor records the task itself, and this is
            # written with the next write that works)
            self.peaks.pop(spec.uni_id, None)
            self.records.launched(spec.uni_id, launch_fields(keys, spec.queue, attempt, retry_count, child.pid,
                                                            created, now, self.node))
        self._wake()
        return {"pid": child.pid, "create_time": created, "started_at": now}

    def observe(self, expected: list[str], wait_s: float = 0.0, forget: list[str] | None = None) -> dict[str, Any]:
        """How this node's tasks are doing, and its GPUs now. Waits up to `wait_s` for a task
        of ours to end (returns at once when one has), so the coordinator hears of a freed GPU
        within milliseconds without asking every few milliseconds.

        Returns {"node", "snapshots", "tasks": {uid: {...}}}, a task being
        `{"state": "running", "confirmed": bool, "gone": bool}` (gone: its processes have
        ended and its outcome is being written: its GPU is free), or `{"state": "ended",
        "outcome": "normal_exit" | "abnormal_exit" | "lost", "error_type", "exit_status", ...}`.
        A uid this node knows nothing of is `{"state": "unknown"}`.

        `forget`: tasks whose successes are now in the coordinator's history: their records
        leave this node's registry, as a completed task's record does on one machine.

        The registry is written before the wait (what the last answer found, such as grown
        VRAM peaks, and what a failing disk refused), so that no write delays an answer."""
        self._contact()
        if forget:
            self.records.forget(forget, unless_running=True, defer=True)
        self.records.flush()
        self._wait(wait_s)
        with self.lock:
            snapshots = self.probe.snapshot()
            records = self.records.read_or_empty()
            now = time.monotonic()
            self.ghosts = {pid: until for pid, until in self.ghosts.items() if until > now}
            tasks = {uid: self._how(uid, records.get(uid), snapshots) for uid in {*expected, *self.children}}
            self._usage(tasks, records, snapshots)
            for uid, how in tasks.items():
                if isinstance(records.get(uid), dict) and self.node is not None:
                    how["record"] = _record_row(records[uid])
            for uid, how in tasks.items():
                if how["state"] == "ended" or how.get("gone"):
                    self.peaks.pop(uid, None)
                    record = records.get(uid) if isinstance(records.get(uid), dict) else {}
                    for pid in self.gpu_pids.pop(uid, set()) | self._roots(uid, record):
                        self.ghosts[pid] = now + GHOST_S
                    self._ghost_leftovers(record, snapshots, now)
        why = self.guard.check()
        return {"node": self.node, "snapshots": [_named(s, self.node) for s in snapshots], "tasks": tasks,
                "ghosts": sorted(self.ghosts), "guard": None if why is None else {"why": why, "since": self.guard.since}}

    def find(self, uni_ids: list[str]) -> dict[str, dict[str, Any]]:
        """What this node knows of these tasks, for a restarted coordinator: every one whose
        process lives here, or whose record says it runs or how it ended (a task may have ended
        while no coordinator watched; the coordinator takes the outcomes it has not taken yet).
        {uid: {"gpu", "attempt", "state", "error_type"}}."""
        self._contact()
        records = self.records.read_or_empty()
        wanted = set(uni_ids)
        live = evidence.live_task_processes(wanted, self.namespace)
        found = {}
        for uid in wanted:
            record = records.get(uid) if isinstance(records.get(uid), dict) else None
            known = record is not None and record.get("state") in ("running", "normal_exit", "abnormal_exit")
            if uid in live or known or evidence.supervisor_running(launcher.log_path(self.state, uid)):
                record = record or {}
                found[uid] = {"gpu": record.get("gpu", live.get(uid, {}).get("gpu")),
                              "attempt": record.get("attempt"), "error_type": record.get("error_type"),
                              "peak_vram_gb": record.get("peak_vram_gb"),
                              "state": "running" if uid in live else record.get("state", "running")}
        return found

    def kill(self, uni_ids: list[str], stopped: bool = False) -> None:
        """End these tasks' processes (SIGTERM, SIGKILL after the grace period); only
        processes we started, by their recorded identity or their environment. `stopped`
        (`stop --kill`): once their supervisors have written how they ended, their records say
        `stopped`, so a restarted coordinator runs them again without counting a failure."""
        self._contact()
        records = self.records.read_or_empty()
        chosen = [records.get(uid) or {} for uid in uni_ids]

        stopping.end_tasks(chosen, self.kill_grace, lambda: None)  # the kernel reaps the fork server's children
        for uid in uni_ids:
            procs.kill_all(procs.processes_with_env(**{evidence.UNI_ID_ENV: uid, evidence.NAMESPACE_ENV: self.namespace}))
        if stopped:
            self._record_stopped(uni_ids, {uid: records.get(uid) or {} for uid in uni_ids})

    def end(self, uni_ids: list[str]) -> None:
        """`gpu-compete kill` on a --ray run: `kill(uni_ids, stopped=True)` in the background,
        so this node's launches and answers go on through the grace period. Until it is done
        (the task's processes are all gone and its record says stopped), `observe` says the
        task runs: its next attempt cannot start, here or elsewhere, before the kill's last
        sweep, which looks for its processes by their environment and would end that one too."""
        self._contact()
        uids = list(uni_ids)
        with self.lock:
            self.ending.update(uids)

        def work() -> None:
            try:
                self.kill(uids, True)
            finally:
                with self.lock:
                    self.ending.difference_update(uids)
                    self._news = True
                self._wake()

        threading.Thread(target=work, name="agent-end", daemon=True).start()

    def forget_records(self, uni_ids: list[str]) -> None:
        """`observe(forget=...)` at once: for the coordinator's last word at the end of a run."""
        self._contact()
        self.records.forget(uni_ids, unless_running=True)

    def retried(self, uni_ids: list[str]) -> None:
        """`gpu-compete retry`: these tasks' records forget the give-up, the retry time and
        the count, and an ended one its attempt, so a restarted coordinator does not take again
        an outcome the retry has set aside."""
        self._contact()
        self.records.retried(uni_ids)

    def _record_stopped(self, uni_ids: list[str], records: dict[str, dict[str, Any]]) -> None:
        deadline = time.monotonic() + 5.0
        supervisors = [p for uid in uni_ids
                       if procs.is_pid(p := (self.children[uid].pid if uid in self.children
                                             else records[uid].get("supervisor_pid")))]
        while time.monotonic() < deadline and any(procs.liveness(p) != "dead" for p in supervisors):
            time.sleep(0.05)  # their own last word first: ours goes on top of it

        now = iso(time.time())
        self.records.stopped({uid: {"updated_at": now} for uid in uni_ids}, existing=True,
                             supervisors={uid: records[uid].get("supervisor_pid") for uid in uni_ids})

    def log(self, uni_id: str, tail_bytes: int | None = None) -> str | None:
        path = launcher.log_path(self.state, uni_id)
        try:
            with open(path, "rb") as fh:
                if tail_bytes is not None:
                    fh.seek(max(0, os.fstat(fh.fileno()).st_size - tail_bytes))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return None

    # --- inside -------------------------------------------------------------------------------

    def alive(self, uid: str, record: dict[str, Any] | None, known: dict[str, Any] | None) -> bool:
        """Whether a task whose supervisor is not (or no longer) our child still runs: by the
        identity its record (or the last whole record we read of it) names, or its
        supervisor's lock on its log."""
        return evidence.record_alive(record or known or {}, uid, self.namespace) or (
            record is not None and bool(known) and evidence.record_alive(known, uid, self.namespace)
        ) or evidence.supervisor_running(launcher.log_path(self.state, uid))

    def _how(self, uid: str, record: dict[str, Any] | None, snapshots: list[GpuSnapshot]) -> dict[str, Any]:
        """One task's state, from the best evidence (as the single-machine daemon decides it)."""
        if uid in self.ending:
            return {"state": "running", "confirmed": self._confirmed(uid, record, snapshots), "gone": False}
        child = self.children.get(uid)
        if child is not None:
            if child.done_fd is not None:
                child.read_done()
            if not self._exited(uid):
                return {"state": "running", "confirmed": self._confirmed(uid, record, snapshots),
                        "gone": child.worker_done}
            self._forget(uid)  # ended: the registry and the log say how, as for any supervisor
        # The supervisor has ended, or was started by an earlier agent: the record, the
        # supervisor's lock on its log and the log's end line tell (the daemon's rule).
        logfile = launcher.log_path(self.state, uid)
        if record is None and not logfile.exists():
            return {"state": "unknown"}
        sup = (record or {}).get("supervisor_pid")
        ended = evidence.outcome(uid, record, logfile, supervisor_pid=sup if procs.is_pid(sup) else None,
                                 alive=lambda: self.alive(uid, record, None))
        if ended is None:
            return {"state": "running", "confirmed": self._confirmed(uid, record, snapshots), "gone": False}
        if ended.state == "lost":
            self._leftovers(uid, record)
            return self._ended("lost", "lost", record, None, why=ended.why)
        return self._ended(ended.state, ended.error_type, record, (record or {}).get("exit_status"))

    def _usage(self, tasks: dict[str, dict[str, Any]], records: dict[str, Any], snapshots: list[GpuSnapshot]) -> None:
        """What each running task's processes hold now on its GPUs (`"vram": {node/key: bytes}`),
        from this round's snapshot: the coordinator keeps the peak and learns from an oom."""
        running = {uid: (tuple(_keys(records[uid])), self._roots(uid, records[uid])) for uid, how in tasks.items()
                   if how["state"] == "running" and isinstance(records.get(uid), dict)}
        if not running:
            return
        grown: dict[str, dict[str, Any]] = {}
        for uid, per_gpu in self.vram.sample(snapshots, running).items():
            tasks[uid]["vram"] = {_key(self.node, key): used for key, used in per_gpu.items()}
            if per_gpu:
                fields = self._peak(uid, records[uid], *max(per_gpu.items(), key=lambda kv: kv[1]))
                if fields:
                    grown[uid] = fields
        if grown:  # written before the next observe waits, on this attempt's record only
            self.records.peaks(grown, defer=True, supervisors={u: records[u].get("supervisor_pid") for u in grown})

    def _peak(self, uid: str, record: dict[str, Any], key: str, used: int) -> dict[str, Any] | None:
        """The attempt's peak VRAM is written to its record as it grows (as the daemon writes
        it on one machine), so a restarted coordinator that adopts the task still has it."""
        if uid not in self.peaks:
            said = record.get("peak_vram_gb")
            start = int(said * GIB) if isinstance(said, (int, float)) and not isinstance(said, bool) else 0
            self.peaks[uid] = [start, start]
        peak = self.peaks[uid]
        peak[0] = max(peak[0], used)
        fields = peak_to_write(peak[0], peak[1], key)
        if fields:
            peak[1] = peak[0]
        return fields

    def _ended(self, outcome: str, error_type: str | None, record: dict[str, Any] | None, rc: int | None,
               why: str | None = None) -> dict[str, Any]:
        record = record or {}
        return {"state": "ended", "outcome": outcome, "error_type": error_type, "exit_status": rc, "why": why,
                "started_at": record.get("started_at"), "ended_at": record.get("ended_at"),
                "peak_vram_gb": record.get("peak_vram_gb")}

    def _confirmed(self, uid: str, record: dict[str, Any] | None, snapshots: list[GpuSnapshot]) -> bool:
        """Whether a process of the task's tree shows on its GPU; the pids seen are kept, so
        they are not counted once the task has ended (NVML lists them a moment longer)."""
        on_gpu = {s.key: [p.pid for p in s.processes] for s in snapshots}
        mine = tree_on(on_gpu, sorted(_keys(record or {})), self._roots(uid, record), self.ghosts)
        if mine:
            self.gpu_pids.setdefault(uid, set()).update(mine)
            self.pids_ours = True
        return bool(mine) or bool(self.gpu_pids.get(uid))

    def _ghost_leftovers(self, record: dict[str, Any], snapshots: list[GpuSnapshot], now: float) -> None:
        """As the daemon does: on the GPUs a task has just left, a listed pid whose process no
        longer exists is a leftover of its tree. Only once NVML's pids are known to be ours
        (a task of ours was seen on its GPU): in a container every pid would look dead."""
        if not self.pids_ours:
            return
        for pid in dead_listed(snapshots, _keys(record), self.ghosts):
            self.ghosts[pid] = now + GHOST_S

    def _roots(self, uid: str, record: dict[str, Any] | None) -> set[int]:
        return roots_of(record or {}, self.children.get(uid))

    def _leftovers(self, uid: str, record: dict[str, Any] | None) -> None:
        stopping.end_leftovers(record or {}, uid, self.namespace)

    def _exited(self, uid: str) -> bool:
        fd = self.exits.get(uid)
        if fd is not None:
            return bool(select.select([fd], [], [], 0)[0])
        child = self.children[uid]
        return procs.liveness(child.pid) == "dead"  # (a zombie counts as dead)

    def _forget(self, uid: str) -> None:
        child = self.children.pop(uid, None)
        if child is not None:
            child.close_done()
        fd = self.exits.pop(uid, None)
        if fd is not None:
            os.close(fd)

    def _contact(self) -> None:
        self.last_contact = self.clock()

    def _beat_forever(self) -> None:
        while True:
            if self.should_beat():
                self._beat()
            time.sleep(1.0)

    def _beat(self) -> None:
        try:
            os.close(os.open(self.heartbeat, os.O_WRONLY | os.O_CREAT, 0o600))  # private, as every state file
            os.utime(self.heartbeat)
        except OSError:
            pass  # a full disk: the supervisors' fences may end tasks, which then run elsewhere

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:
            pass

    def _wait(self, wait_s: float) -> None:
        """Until a task of ours says it is gone or exits, or `wait_s` ends (a launch meanwhile
        adds its task to what is waited on)."""
        deadline = time.monotonic() + wait_s
        while True:
            with self.lock:
                fds, polling = [self._wake_r], False
                for uid, child in self.children.items():
                    if uid in self.ending:
                        continue  # its end is said once its kill is done (`_news`)
                    if child.done_fd is not None:
                        fds.append(child.done_fd)
                    if uid in self.exits:
                        fds.append(self.exits[uid])
                    else:
                        polling = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            ready, _, _ = select.select(fds, [], [], min(remaining, _POLL_S) if polling else remaining)
            if self._wake_r in ready:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            with self.lock:
                news, self._news = self._news, False
            if news or any(fd != self._wake_r for fd in ready):
                return
            if polling and not ready:
                with self.lock:
                    if any(self._exited(uid) for uid in self.children if uid not in self.ending):
                        return


def _keys(record: dict[str, Any]) -> set[str]:
    """The local GPU keys a record names (`gpu`, and `gpus` for a gpus=N task)."""
    return {str(record.get("gpu"))} | {str(k) for k in record.get("gpus") or ()}


def _key(node: str | None, key: str) -> str:
    """A GPU's name: `node/key` on a node of a cluster, the plain key in-process."""
    return key if node is None else f"{node}/{key}"


def _named(snap: GpuSnapshot, node: str | None) -> GpuSnapshot:
    from dataclasses import replace

    return snap if node is None else replace(snap, key=_key(node, snap.key))
