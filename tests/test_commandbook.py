"""Following the command file: change detection, the pure reload diff, a bad edit kept out,
`add` under concurrency, and carrying over position-based ids."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from gpu_compete import legacy
from gpu_compete.appender import AddError, append, block_text
from gpu_compete.commandbook import CommandBook, diff
from gpu_compete.records import Records
from gpu_compete.commandfile import load, parse
from gpu_compete.registry import Registry

from .helpers import gpu_compete_cmd, clean_env

FILE = "echo a\n1,2\n\necho b\n1,2\n\necho c\n2,1\n"


def ids(text):
    return [t.uni_id for t in parse(text).tasks]


class Wall:
    """An injected wall clock in nanoseconds."""

    def __init__(self):
        self.ns = 0

    def __call__(self):
        return self.ns


def book_at(tmp_path, text=FILE):
    path = tmp_path / "cmd.txt"
    path.write_text(text)
    wall = Wall()
    wall.ns = path.stat().st_mtime_ns + 10**10  # long after the write: not racy
    book = CommandBook(path, load(path), wall_ns=wall)
    assert [s.uni_id for s in book.check()] == ids(text)  # the first check reads the file once
    return path, book, wall


# --- the diff --------------------------------------------------------------------------------

def test_diff_names_added_dropped_running_out_and_unchanged():
    """The diff is by uni_id: new ones added, missing pending ones dropped, missing running ones
    run out, the rest unchanged."""
    a, b, c = ids(FILE)
    new = parse("echo c\n2,1\n\necho a\n1,2\n\necho d\n1,2\n").tasks
    got = diff({a: False, b: True, c: False}, new)
    assert got.added == (new[2].uni_id,)
    assert got.removed_pending == () and got.removed_running == (b,)
    assert got.unchanged == (c, a)
    got = diff({a: False, b: False, c: True}, new[:1])
    assert got.removed_pending == (a, b) and got.removed_running == ()
    assert diff({a: False}, parse("echo a\n1,2\n").tasks).empty


# --- following the file ----------------------------------------------------------------------

def test_an_untouched_file_is_not_read_again(tmp_path, monkeypatch):
    """With size, mtime and inode unchanged and the mtime not racy, check() reads nothing."""
    path, book, _ = book_at(tmp_path)
    reads = []
    real = type(path).read_bytes
    monkeypatch.setattr(type(path), "read_bytes", lambda self: reads.append(1) or real(self))
    assert book.check() is None
    assert reads == []


def test_a_touch_reads_the_file_but_changes_nothing(tmp_path):
    """A new mtime with the same content is read once and reported as no change."""
    path, book, wall = book_at(tmp_path)
    os.utime(path, ns=(wall.ns - 5 * 10**9, wall.ns - 5 * 10**9))
    assert book.check() is None


def test_an_edit_in_the_same_clock_tick_is_seen(tmp_path):
    """A file read within two seconds of its mtime is read again, so an edit that keeps size and
    mtime is not missed."""
    path = tmp_path / "cmd.txt"
    path.write_text(FILE)
    st = path.stat()
    wall = Wall()
    wall.ns = st.st_mtime_ns + 10**9  # read one second after the write: racy
    book = CommandBook(path, load(path), wall_ns=wall)
    book.check()
    path.write_text(FILE.replace("echo a", "echo z"))  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    specs = book.check()
    assert specs is not None and specs[0].commands == ("echo z",)


def test_a_bad_edit_is_kept_out_logged_once_and_the_fix_applied(tmp_path, capsys):
    """A file with an error is not applied and its FILE:LINE error is kept; the fixed file is."""
    path, book, wall = book_at(tmp_path)
    good = list(book.specs)
    path.write_text(FILE + "\necho d\n1,-3\n")
    assert book.check() is None
    assert book.error == f"{path}:11: bad VRAM '-3': must not be negative"
    assert book.specs == good
    os.utime(path, ns=(1, 1))  # stat changes, content doesn't
    assert book.check() is None and book.error is not None
    path.write_text(FILE + "\necho d\n1,3\n")
    specs = book.check()
    assert [s.commands[0] for s in specs] == ["echo a", "echo b", "echo c", "echo d"]
    assert book.error is None


def test_a_deleted_file_keeps_the_last_good_one(tmp_path):
    """A command file that disappears is an error in status, not an empty queue."""
    path, book, _ = book_at(tmp_path)
    path.unlink()
    assert book.check() is None
    assert "cannot read" in book.error and len(book.specs) == 3


# --- add ---------------------------------------------------------------------------------------

def test_block_text_quotes_arguments_and_refuses_what_would_break_the_file():
    """Several arguments are quoted, one is shell text; blank lines, comments and bad queue lines
    are refused."""
    assert block_text(["python", "t.py", "--name", "a b"], "1", "2") == "python t.py --name 'a b'\n1,2\n"
    assert block_text(["cd x && python t.py"], "q", "7.5") == "cd x && python t.py\nq,7.5\n"
    for argv, queue, vram in ([["a\n\nb"], "1", "1"], [["# x"], "1", "1"], [["a"], "b/c", "1"],
                              [["a"], "1", "x"], [[], "1", "1"]):
        with pytest.raises(AddError):
            block_text(argv, queue, vram)


def test_append_gives_the_uni_id_the_daemon_will_use(tmp_path):
    """The printed uni_id is the block's id in the whole file (occurrence numbers included), and
    the file stays valid even when it did not end in a newline."""
    path = tmp_path / "cmd.txt"
    path.write_text("echo a\n1,2")
    uid, line = append(path, block_text(["echo a"], "1", "2"))
    assert uid == ids(path.read_text())[1] == ids("echo a\n1,2\n")[0] + "-2"
    assert line == 4


def test_append_refuses_a_broken_file_and_touches_nothing(tmp_path):
    """A command file with an error gets no block; the error names its line."""
    path = tmp_path / "cmd.txt"
    path.write_text("echo a\n1,x\n")
    with pytest.raises(AddError, match=r"cmd.txt:2: bad VRAM"):
        append(path, block_text(["echo b"], "1", "2"))
    assert path.read_text() == "echo a\n1,x\n"


def test_twenty_adds_in_parallel_lose_nothing(tmp_path):
    """20 `gpu-compete add` processes at once: 20 distinct uni_ids printed, all 20 blocks in a
    valid file."""
    path = tmp_path / "cmd.txt"
    path.write_text(FILE)

    def add(i):
        return subprocess.run(gpu_compete_cmd("add", "--commands", str(path), "-q", str(i % 3), "-v", "1",
                                              "--", "echo", f"task {i}"),
                              capture_output=True, text=True, env=clean_env(), timeout=60)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(add, range(20)))
    assert [r.returncode for r in results] == [0] * 20, [r.stderr for r in results if r.returncode]
    printed = {r.stdout.strip() for r in results}
    tasks = parse(path.read_text()).tasks
    assert len(tasks) == 23 and len(printed) == 20
    assert printed == {t.uni_id for t in tasks[3:]}


def test_add_racing_manual_appends_loses_no_block(tmp_path):
    """`add`s racing a person's `cat >> cmd.txt` appends: every block of both is in the file."""
    path = tmp_path / "cmd.txt"
    path.write_text(FILE)
    # Each manual block is one write, as `cat >> cmd.txt` of a short block is (bash's printf
    # may write a line in pieces, which no append scheme can keep whole).
    manual = subprocess.Popen(["bash", "-c", f"for i in $(seq 1 30); do printf '\\necho manual %s\\n1,1\\n' $i > {tmp_path}/b; "
                                             f"cat {tmp_path}/b >> {path}; done"])
    for i in range(10):
        append(path, block_text([f"echo added {i}"], "2", "1"))
    assert manual.wait(timeout=30) == 0
    commands = [t.commands[0] for t in parse(path.read_text()).tasks]
    assert sorted(c for c in commands if "manual" in c) == sorted(f"echo manual {i}" for i in range(1, 31))
    assert [c for c in commands if "added" in c] == [f"echo added {i}" for i in range(10)]


def test_append_follows_a_file_an_editor_replaced(tmp_path):
    """When an editor renamed a new file over the command file, the block lands in the new one."""
    path = tmp_path / "cmd.txt"
    path.write_text(FILE)
    fd = os.open(path, os.O_RDONLY)  # hold the old inode open, as a slow racer would
    try:
        new = tmp_path / "cmd.new"
        new.write_text(FILE + "\necho edited\n1,1\n")
        os.replace(new, path)
        append(path, block_text(["echo added"], "1", "1"))
    finally:
        os.close(fd)
    assert [t.commands[0] for t in parse(path.read_text()).tasks][-2:] == ["echo edited", "echo added"]


# --- old ids ---------------------------------------------------------------------------------

def test_position_based_ids_are_carried_over(tmp_path):
    """History lines and registry records under the old ids are carried to the new ids; a task
    alive under its old id keeps it (an alias)."""
    specs = parse(FILE).tasks
    history = tmp_path / "history.jsonl"
    history.write_text(f'{{"uni_id": "{specs[0].legacy_uni_id}", "state": "normal_exit"}}\n')
    registry = Registry(tmp_path / "uni_id.json")
    registry.set(specs[1].legacy_uni_id, state="abnormal_exit", error_type="oom", retry_count=2)
    registry.set(specs[2].legacy_uni_id, state="running", pid=os.getpid())
    aliases = legacy.migrate(specs, history, Records(registry), lambda uid, rec: uid == specs[2].legacy_uni_id)
    assert aliases == {specs[2].uni_id: specs[2].legacy_uni_id}
    from gpu_compete import journal
    assert specs[0].uni_id in journal.completed(history)
    records = registry.read()
    assert records[specs[1].uni_id]["retry_count"] == 2 and specs[1].legacy_uni_id not in records
    assert legacy.migrate(specs, history, Records(registry), lambda *_: False) == {}  # once only
