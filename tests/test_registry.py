"""The `uni_id.json` registry: concurrent writers, writers killed mid-write, corrupt files,
legacy and malformed records, pid liveness, and the on-disk format.

Real processes throughout: writers are separate interpreters, kills are real SIGKILLs.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gpu_compete import procs
from gpu_compete.registry import Registry, RegistryWarning, normalize

from .helpers import clean_env, python_cmd, read_json, wait_for

WORKERS = 20
UPDATES = 20


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(python_cmd(code, *args), env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def lock_is_free(lock_path: Path) -> bool:
    """True when nobody holds the registry's flock (tries it without blocking)."""
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def temp_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(".uni_id.json.*.tmp"))


# --- concurrent writers ------------------------------------------------------------------------

WORKER = r"""
import os, sys, time
from gpu_compete.registry import Registry

path, wid, n, ready, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
reg = Registry(path)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.002)

def bump(data):
    rec = data.setdefault("counter", {"pid": 1, "state": "running", "retry_count": 0})
    rec["retry_count"] += 1

for j in range(n):
    reg.update(bump)
    reg.set(f"w{wid:02d}-{j:02d}", pid=os.getpid(), state="normal_exit", retry_count=j)
"""


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    """20 processes doing 20 read-modify-write increments and 20 distinct-key sets each lose no update."""
    path = tmp_path / "uni_id.json"
    go = tmp_path / "go"
    workers = [spawn(WORKER, str(path), str(i), str(UPDATES), str(tmp_path / f"ready-{i}"), str(go))
               for i in range(WORKERS)]
    try:
        wait_for(lambda: all((tmp_path / f"ready-{i}").exists() for i in range(WORKERS)), 30,
                 "every writer to start")
        go.touch()  # release them together, so they contend for the lock
        for w in workers:
            _, err = w.communicate(timeout=60)
            assert w.returncode == 0, err
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.communicate()

    data = read_json(path)
    assert data["counter"]["retry_count"] == WORKERS * UPDATES
    pids = {w.pid for w in workers}
    keys = {f"w{i:02d}-{j:02d}" for i in range(WORKERS) for j in range(UPDATES)}
    assert keys <= data.keys()
    assert set(data) == keys | {"counter"}
    for i, w in enumerate(workers):
        for j in range(UPDATES):
            assert data[f"w{i:02d}-{j:02d}"]["pid"] == w.pid
            assert data[f"w{i:02d}-{j:02d}"]["retry_count"] == j
    assert {data[k]["pid"] for k in keys} == pids
    assert (tmp_path / "uni_id.json.lock").exists()
    assert temp_files(tmp_path) == []


# --- writers killed mid-write ------------------------------------------------------------------

BIG = 3000

LOOPING_WRITER = r"""
import sys
from gpu_compete.registry import Registry

reg = Registry(sys.argv[1])
N = int(sys.argv[2])

def change(data):
    gen = data["gen"]["retry_count"] + 1
    data["gen"]["retry_count"] = gen
    for k in range(N):
        data[f"big{k:05d}"] = {"pid": 1000 + k, "state": "normal_exit", "retry_count": gen, "note": "x" * 200}

while True:
    reg.update(change)
"""


def seed_big(path: Path) -> None:
    def change(data: dict) -> None:
        data["gen"] = {"pid": 1, "state": "running", "retry_count": 0}
        for k in range(BIG):
            data[f"big{k:05d}"] = {"pid": 1000 + k, "state": "normal_exit", "retry_count": 0, "note": "x" * 200}

    Registry(path).update(change)


def check_whole(path: Path) -> int:
    """The file is one complete generation: valid JSON, every record, all from the same write."""
    data = read_json(path)
    assert isinstance(data, dict)
    gen = data["gen"]["retry_count"]
    assert len(data) == BIG + 1
    assert {data[f"big{k:05d}"]["retry_count"] for k in range(BIG)} == {gen}
    return gen


def test_sigkill_at_random_moments_leaves_valid_file(tmp_path: Path) -> None:
    """A writer looping over a large registry, SIGKILLed at random moments, always leaves a whole, valid file, the lock file and a free lock."""
    path = tmp_path / "uni_id.json"
    seed_big(path)
    rng = random.Random(os.getpid())
    gen = 0
    for _ in range(6):
        writer = spawn(LOOPING_WRITER, str(path), str(BIG))
        try:
            before = gen
            # It is writing once a newer generation shows up; then kill it at a random moment.
            wait_for(lambda: check_whole(path) > before, 20, "the writer to complete a write")
            time.sleep(rng.uniform(0.0, 0.15))  # not synchronisation: picks the moment of the kill
            writer.send_signal(signal.SIGKILL)
            writer.communicate(timeout=10)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.communicate()
        assert writer.returncode == -signal.SIGKILL
        gen = check_whole(path)
        assert gen > before
        assert (tmp_path / "uni_id.json.lock").exists()
        assert lock_is_free(tmp_path / "uni_id.json.lock")
    # The next writer gets the lock and writes normally.
    Registry(path).set("after", pid=os.getpid(), state="running")
    assert read_json(path)["after"]["state"] == "running"
    assert (tmp_path / "uni_id.json.lock").exists()


STALLED_WRITER = r"""
import os, sys, time
import gpu_compete.registry as registry

path, marker = sys.argv[1], sys.argv[2]
real_fsync = os.fsync

def stall(fd):
    real_fsync(fd)
    open(marker, "w").close()   # the temp file is written and synced, not yet renamed
    time.sleep(120)

os.fsync = stall
registry.Registry(path).set("new", pid=os.getpid(), state="running")
"""


def test_sigkill_between_temp_write_and_rename_keeps_old_file(tmp_path: Path) -> None:
    """A writer SIGKILLed while holding the lock with its temp file written but not renamed leaves the old file byte-for-byte, the lock file, and a free lock."""
    path = tmp_path / "uni_id.json"
    reg = Registry(path)
    reg.set("old", pid=os.getpid(), state="running", retry_count=1)
    old_bytes = path.read_bytes()
    marker = tmp_path / "in-write"
    writer = spawn(STALLED_WRITER, str(path), str(marker))
    try:
        wait_for(marker.exists, 20, "the writer to reach the point between fsync and rename")
        assert temp_files(tmp_path), "the writer should have a temp file in the registry's directory"
        assert not lock_is_free(tmp_path / "uni_id.json.lock"), "the writer should hold the lock"
        writer.send_signal(signal.SIGKILL)
        writer.communicate(timeout=10)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate()
    assert path.read_bytes() == old_bytes
    assert "new" not in read_json(path)
    assert (tmp_path / "uni_id.json.lock").exists()
    assert lock_is_free(tmp_path / "uni_id.json.lock")
    reg.set("later", pid=os.getpid(), state="running")
    assert set(read_json(path)) == {"old", "later"}


# --- corrupt files -----------------------------------------------------------------------------

CORRUPT = {
    "empty": b"",
    "whitespace": b"  \n",
    "garbage": b"\x00\xff{not json at all\n",
    "truncated": b'{"exp1": {"pid": 12, "state": "runn',
    "list": b'[{"pid": 12, "state": "running"}]\n',
    "number": b"42\n",
    "deeply-nested": b"[" * 100_000,
}


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_file_is_read_as_empty_and_copied_aside_only_by_a_writer(tmp_path: Path, content: bytes) -> None:
    """An empty, garbage or non-object registry reads as {} with a RegistryWarning and a read
    creates no file; a writer keeps its exact bytes in one uni_id.json.corrupt-<timestamp>."""
    path = tmp_path / "uni_id.json"
    path.write_bytes(content)
    reg = Registry(path)
    reg.SETTLE_S = 0.05
    with pytest.warns(RegistryWarning, match="left as it is"):
        assert reg.read() == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uni_id.json"]  # a reader only reads
    assert path.read_bytes() == content

    with pytest.warns(RegistryWarning, match="corrupt-"):
        reg.set("fresh", pid=os.getpid(), state="running")
    assert set(read_json(path)) == {"fresh"}
    asides = sorted(tmp_path.glob("uni_id.json.corrupt-*"))
    assert [a.read_bytes() for a in asides] == [content]

    # The same bad content again (from another writer object too): no second copy.
    path.write_bytes(content)
    other = Registry(path)
    other.SETTLE_S = 0.05
    with pytest.warns(RegistryWarning, match="already copied"):
        other.set("again", pid=os.getpid(), state="running")
    assert len(list(tmp_path.glob("uni_id.json.corrupt-*"))) == 1


def test_copies_of_bad_contents_are_bounded(tmp_path: Path) -> None:
    """Distinct bad contents are kept, but never more than MAX_ASIDE copies; the oldest go."""
    path = tmp_path / "uni_id.json"
    reg = Registry(path)
    reg.SETTLE_S = 0.0
    for i in range(reg.MAX_ASIDE + 3):
        path.write_bytes(f"garbage {i}".encode())
        with pytest.warns(RegistryWarning):
            reg.set(f"r{i}", pid=os.getpid(), state="running")
    asides = sorted(tmp_path.glob("uni_id.json.corrupt-*"))
    assert len(asides) == reg.MAX_ASIDE
    assert asides[-1].read_bytes() == f"garbage {reg.MAX_ASIDE + 2}".encode()


def test_a_bad_file_inside_an_update_never_costs_a_record(tmp_path: Path) -> None:
    """A file truncated by a lock-less writer and never finished: the update writes back the
    last whole content this writer read plus its change, never less."""
    path = tmp_path / "uni_id.json"
    reg = Registry(path)
    reg.SETTLE_S = 0.05
    for i in range(5):
        reg.set(f"r{i}", pid=os.getpid(), state="running")
    path.write_bytes(b'{"r0": {"pid": 1')  # a legacy writer died mid-write
    with pytest.warns(RegistryWarning, match="last whole content"):
        reg.set("mine", pid=os.getpid(), state="running")
    assert set(read_json(path)) == {"r0", "r1", "r2", "r3", "r4", "mine"}


def test_a_half_written_file_is_waited_for_not_replaced(tmp_path: Path) -> None:
    """An update that meets a file still being written by a lock-less writer reads it again
    until it is whole, and keeps what that writer wrote."""
    path = tmp_path / "uni_id.json"
    path.write_text('{"old": 1}')
    reg = Registry(path)
    whole = json.dumps({"old": 1, "theirs": {"pid": 5, "state": "running"}}, indent=2).encode()
    with open(path, "wb") as fh:  # truncate, then finish the write from a thread a moment later
        fh.write(whole[:10])
        fh.flush()
        timer = threading.Timer(0.05, lambda: (fh.write(whole[10:]), fh.flush()))
        timer.start()
        reg.set("mine", pid=os.getpid(), state="running")
        timer.join()
    assert set(read_json(path)) == {"old", "theirs", "mine"}


def test_missing_file_reads_empty_without_warning(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    """A registry that does not exist yet is simply empty: no warning, nothing created by reading."""
    reg = Registry(tmp_path / "sub" / "uni_id.json")
    assert reg.read() == {}
    assert reg.get("x") is None
    assert not [w for w in recwarn if issubclass(w.category, RegistryWarning)]
    assert list(tmp_path.iterdir()) == []


# --- legacy and malformed records --------------------------------------------------------------

def test_legacy_bare_pid_reads_as_running_record(tmp_path: Path) -> None:
    """A legacy `"exp001": 12345` entry reads as a running record with that pid, and a later set() upgrades it in place."""
    path = tmp_path / "uni_id.json"
    path.write_text('{"exp001": 12345}\n')
    reg = Registry(path)
    record = reg.read()["exp001"]
    assert record["pid"] == 12345
    assert record["state"] == "running"
    assert record["retry_count"] == 0
    assert reg.get("exp001")["state"] == "running"

    reg.set("exp001", state="normal_exit")
    stored = read_json(path)["exp001"]
    assert stored["pid"] == 12345
    assert stored["state"] == "normal_exit"
    assert stored["retry_count"] == 0
    assert "legacy" not in stored


def test_normalize_drops_or_clamps_wrong_types() -> None:
    """normalize() never trusts a field of the wrong type: bad pids become None, bad retry counts 0, non-records None."""
    assert normalize({"pid": "abc", "state": "running", "retry_count": 2})["pid"] is None
    assert normalize({"pid": True, "state": "running"})["pid"] is None
    assert normalize({"pid": -5, "state": "running"})["pid"] is None
    assert normalize({"pid": 7, "state": "running", "retry_count": -1})["retry_count"] == 0
    assert normalize({"pid": 7, "state": "running", "retry_count": "3"})["retry_count"] == 0
    assert normalize({"pid": 7, "state": "running", "retry_count": 1.5})["retry_count"] == 0
    assert normalize({"pid": 7, "state": "normal_exit"})["retry_count"] == 0
    for bad in ([1, 2], "12345", None, True, 1.5):
        assert normalize(bad) is None
    # An unknown state: a record with a pid is taken as running (not an error), one without as failed.
    running = normalize({"pid": 7, "state": "bogus"})
    assert running["state"] == "running" and "error_type" not in running
    failed = normalize({"state": "bogus"})
    assert failed["state"] == "abnormal_exit" and failed["error_type"] == "unknown"
    # Extra fields pass through.
    assert normalize({"pid": 7, "state": "running", "gpu": 3})["gpu"] == 3


def test_unreadable_record_is_skipped_but_kept_in_file(tmp_path: Path) -> None:
    """read() skips a list record with a RegistryWarning, and set() of another id leaves it in the file untouched."""
    path = tmp_path / "uni_id.json"
    weird = [1, "two", {"three": 3}]
    path.write_text(json.dumps({"weird": weird, "ok": {"pid": "abc", "state": "running", "retry_count": -1}}))
    reg = Registry(path)
    with pytest.warns(RegistryWarning, match="weird"):
        records = reg.read()
    assert set(records) == {"ok"}
    assert records["ok"]["pid"] is None
    assert records["ok"]["retry_count"] == 0

    reg.set("other", pid=os.getpid(), state="running")
    raw = read_json(path)
    assert raw["weird"] == weird
    assert raw["ok"] == {"pid": "abc", "state": "running", "retry_count": -1}  # not rewritten either
    assert raw["other"]["pid"] == os.getpid()


def test_set_merges_fields_and_none_deletes(tmp_path: Path) -> None:
    """set() changes only the fields given (None removes one), keeps retry_count and extra fields, and leaves other records alone."""
    path = tmp_path / "uni_id.json"
    reg = Registry(path)
    reg.set("a", pid=11, state="abnormal_exit", error_type="oom", retry_count=2, gpu=1)
    reg.set("b", pid=12, state="running")
    reg.set("a", state="normal_exit", error_type=None)
    data = read_json(path)
    assert data["a"]["state"] == "normal_exit"
    assert "error_type" not in data["a"]
    assert data["a"]["retry_count"] == 2
    assert data["a"]["pid"] == 11 and data["a"]["gpu"] == 1
    assert data["b"]["pid"] == 12 and data["b"]["state"] == "running"
    reg.remove("a")
    assert set(read_json(path)) == {"b"}


@pytest.mark.parametrize("uni_id", ["", ".", "..", "a/b", "../x", "a b", "a\nb", "x;rm", "$(id)", "é"])
def test_set_refuses_unsafe_uni_id(tmp_path: Path, uni_id: str) -> None:
    """Registry.set refuses a uni_id outside [A-Za-z0-9_.-]+ (and . / ..) without creating any file."""
    with pytest.raises(ValueError, match="bad uni_id"):
        Registry(tmp_path / "uni_id.json").set(uni_id, pid=1, state="running")
    assert list(tmp_path.iterdir()) == []


# --- liveness ----------------------------------------------------------------------------------

def test_liveness_alive_dead_reused_unverified(tmp_path: Path) -> None:
    """Our own pid with its create time is alive, a reaped child's pid is dead, a matching pid with a wrong create time is reused, and a legacy record without create time is unverified."""
    me = os.getpid()
    assert procs.liveness(me, procs.create_time(me)) == "alive"
    assert procs.is_alive(me, procs.create_time(me))

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child_create = procs.create_time(child.pid)
    child.wait(timeout=10)
    assert procs.liveness(child.pid, child_create) == "dead"
    assert not procs.is_alive(child.pid, child_create)

    assert procs.liveness(me, procs.create_time(me) - 30.0) == "reused"
    assert not procs.is_alive(me, procs.create_time(me) - 30.0)

    for bad in (None, 0, -1, "123", True):
        assert procs.liveness(bad, 1.0) == "dead"

    path = tmp_path / "uni_id.json"
    path.write_text(json.dumps({"legacy": me}))
    record = Registry(path).get("legacy")
    assert "create_time" not in record
    assert procs.liveness(record["pid"], record.get("create_time")) == "unverified"


def test_liveness_of_unreaped_dead_child_is_dead() -> None:
    """A child that has died but is not yet reaped (a zombie) counts as dead, not alive."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        created = procs.create_time(child.pid)
        assert procs.liveness(child.pid, created) == "alive"
        os.kill(child.pid, signal.SIGKILL)
        wait_for(lambda: procs.liveness(child.pid, created) == "dead", 10, "the zombie to count as dead")
    finally:
        child.kill()
        child.wait()


def test_recorded_create_time_matches_liveness(tmp_path: Path) -> None:
    """A record written with a live process's pid and create_time reads back alive, and dead once that process ends."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        reg = Registry(tmp_path / "uni_id.json")
        reg.set("job", pid=child.pid, create_time=procs.create_time(child.pid), state="running")
        record = reg.get("job")
        assert procs.liveness(record["pid"], record["create_time"]) == "alive"
    finally:
        child.kill()
        child.wait()
    record = reg.get("job")
    assert procs.liveness(record["pid"], record["create_time"]) == "dead"


# --- on-disk format ----------------------------------------------------------------------------

def test_written_file_is_indented_json_with_mode_0600(tmp_path: Path) -> None:
    """The registry is indented JSON (one record a line) that plain json.load reads, its file mode is 0o600, and the sidecar lock file is kept."""
    path = tmp_path / "script_process" / "uni_id.json"
    old_umask = os.umask(0o022)
    try:
        reg = Registry(path)
        reg.set("exp1", pid=os.getpid(), state="running", retry_count=3)
        reg.set("exp2", pid=os.getpid(), state="abnormal_exit", error_type="oom")
    finally:
        os.umask(old_umask)
    text = path.read_text()
    assert text.startswith("{\n  \"exp1\": {")
    assert [line.split(":")[0] for line in text.splitlines()[1:3]] == ['  "exp1"', '  "exp2"']
    with open(path) as fh:
        data = json.load(fh)
    assert data["exp1"] == {**data["exp1"], "pid": os.getpid(), "state": "running", "retry_count": 3}
    assert data["exp2"]["error_type"] == "oom"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lock = Path(str(path) + ".lock")
    assert lock.exists()
    reg.remove("exp1", "exp2")
    assert read_json(path) == {}
    assert lock.exists()  # never deleted
    assert sorted(p.name for p in path.parent.iterdir()) == ["uni_id.json", "uni_id.json.lock"]


def test_every_change_reaches_the_file_whatever_was_cached(tmp_path: Path) -> None:
    """Updates that change one record among many, or a record in place, are all on disk; another
    writer's file (same inode trick impossible: a rename) is read afresh, not taken from cache."""
    path = tmp_path / "uni_id.json"
    mine, theirs = Registry(path), Registry(path)
    for i in range(50):
        mine.set(f"t{i}", pid=1000 + i, state="running", retry_count=0)
    mine.set("t7", retry_count=2)
    mine.update(lambda data: data["t8"].update(state="abnormal_exit", error_type="oom"))
    theirs.set("t9", state="normal_exit")
    mine.set("t10", retry_count=5)
    on_disk = json.loads(path.read_text())
    assert on_disk["t7"]["retry_count"] == 2 and on_disk["t8"]["error_type"] == "oom"
    assert on_disk["t9"]["state"] == "normal_exit" and on_disk["t10"]["retry_count"] == 5
    assert len(on_disk) == 50 and mine.read() == theirs.read()


def test_updated_at_is_stamped_as_every_writer_of_ours_stamps_it(tmp_path):
    """`Registry.set` (the supervisor's and `gpu-compete register`'s writes) stamps `updated_at`
    as the daemon and the agents do (local time, to the second): one format in one file."""
    import re

    record = Registry(tmp_path / "uni_id.json").set("q1-x", state="running", pid=os.getpid())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", record["updated_at"]), record["updated_at"]
