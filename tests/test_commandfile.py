"""The command file: parsing, errors with exact line numbers, placeholders, uni_ids, and
property-based checks (arbitrary text only ever raises CommandFileError; generated files
parse to exactly the tasks they describe and round-trip through `check --json`)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_compete.cli import main
from gpu_compete.commandfile import CommandFileError, ParsedFile, load, parse
from gpu_compete.tasks import (
    GPU_MARKER,
    PLACEHOLDERS,
    TaskSpec,
    expand,
    group_queues,
    make_uni_id,
    suspicious_placeholders,
)

SAFE = re.compile(r"[A-Za-z0-9_.-]+")
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write(tmp_path: Path, text: str | bytes, name: str = "commands.txt") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_bytes(text.encode("utf-8"))
    return path


def shape(parsed: ParsedFile) -> list[tuple[str, int, float, tuple[str, ...]]]:
    return [(t.queue, t.position, t.vram_gb, t.commands) for t in parsed.tasks]


def ids(text: str) -> list[str]:
    return [t.uni_id for t in parse(text).tasks]


def trailing_backslashes(s: str) -> int:
    return len(s) - len(s.rstrip("\\"))


# --- the format ------------------------------------------------------------------------------

def test_single_block():
    """One command and a queue line make one task with its queue, position, VRAM and line."""
    parsed = parse("python train.py\n1,20\n", "f.txt")
    assert parsed.path == "f.txt"
    assert shape(parsed) == [("1", 1, 20.0, ("python train.py",))]
    assert parsed.tasks[0].line == 1
    assert parsed.warnings == []


@pytest.mark.parametrize("queue_line, queue, vram", [
    ("1,20", "1", 20.0),
    ("1, 20", "1", 20.0),
    ("1 ,20", "1", 20.0),
    ("  1 ,  20  ", "1", 20.0),
    ("\t1,\t20", "1", 20.0),
    ("2, 7.5", "2", 7.5),
    ("3,0", "3", 0.0),
    ("4,.5", "4", 0.5),
    ("5,1e1", "5", 10.0),
    ("gpu_a,8", "gpu_a", 8.0),
    ("exp.v2,8", "exp.v2", 8.0),
    ("my-queue,8", "my-queue", 8.0),
    ("A9z,8", "A9z", 8.0),
    ("007,8", "007", 8.0),
])
def test_queue_line_forms(queue_line, queue, vram):
    """Queue ids are integers or `[A-Za-z0-9_.-]` names, VRAM any number >= 0; spaces around the comma are allowed."""
    parsed = parse(f"echo hi\n{queue_line}\n")
    assert shape(parsed) == [(queue, 1, vram, ("echo hi",))]


def test_negative_zero_vram_is_zero():
    """`-0` is accepted as VRAM 0 and is stored as plain 0.0 (never shown as `-0`)."""
    task = parse("echo\n1,-0\n").tasks[0]
    assert task.vram_gb == 0.0 and math.copysign(1, task.vram_gb) == 1


def test_multi_command_block_keeps_order():
    """All command lines of a block belong to one task, in file order."""
    parsed = parse("cd {work_dir}\nexport X=1\npython a.py\n2,4\n")
    assert shape(parsed) == [("2", 1, 4.0, ("cd {work_dir}", "export X=1", "python a.py"))]


def test_comments_are_skipped_and_do_not_split_blocks():
    """`#` lines (indented or not) are dropped, even inside a block, and do not end it."""
    text = "# header\n#\necho a\n   # inside\necho b\n# before queue\n1,2\n"
    parsed = parse(text)
    assert shape(parsed) == [("1", 1, 2.0, ("echo a", "echo b"))]
    assert parsed.tasks[0].line == 3


def test_blank_and_whitespace_lines_separate_blocks():
    """One or more blank (or whitespace-only) lines separate task blocks; leading/trailing blanks are fine."""
    text = "\n\necho a\n1,1\n\n\n  \t \necho b\n2,2\n \necho c\n1,3\n\n\n"
    parsed = parse(text)
    assert shape(parsed) == [("1", 1, 1.0, ("echo a",)), ("2", 1, 2.0, ("echo b",)),
                             ("1", 2, 3.0, ("echo c",))]
    assert [t.line for t in parsed.tasks] == [3, 8, 11]


def test_positions_count_within_each_queue_and_group_in_first_appearance_order():
    """Positions are 1-based per queue, and group_queues keeps queues in first-appearance order."""
    text = "a\nq2,1\n\nb\nq1,1\n\nc\nq2,1\n\nd\nq1,1\n\ne\nq2,1\n"
    parsed = parse(text)
    assert [(t.queue, t.position, t.commands[0]) for t in parsed.tasks] == [
        ("q2", 1, "a"), ("q1", 1, "b"), ("q2", 2, "c"), ("q1", 2, "d"), ("q2", 3, "e")]
    grouped = group_queues(parsed.tasks)
    assert list(grouped) == ["q2", "q1"]
    assert [t.commands[0] for t in grouped["q2"]] == ["a", "c", "e"]


def test_crlf_and_bom_parse_like_plain_lf():
    """Windows line endings and a UTF-8 BOM give the same tasks (and uni_ids) as a plain file."""
    plain = "echo a \\\n  --flag\necho b\n1,2\n\necho c\n2,3\n"
    windows = "\ufeff" + plain.replace("\n", "\r\n")
    assert shape(parse(windows)) == shape(parse(plain))
    assert ids(windows) == ids(plain)


def test_continuation_joins_lines():
    """A line ending in `\\` continues on the next one; the task's line is where it starts."""
    text = "echo a\npython train.py \\\n  --lr 0.1 \\\n  --epochs 3\n1,\\\n 20\n"
    parsed = parse(text)
    assert parsed.tasks[0].commands == ("echo a", "python train.py   --lr 0.1   --epochs 3")
    assert parsed.tasks[0].vram_gb == 20.0


def test_continued_line_may_look_like_a_comment_or_blank():
    """A continued part starting with `#` or being empty is part of the command, not a comment or separator."""
    parsed = parse("echo a \\\n# not a comment\n1,2\n")
    assert parsed.tasks[0].commands == ("echo a # not a comment",)
    parsed = parse("echo a \\\n\n1,2\n")
    assert parsed.tasks[0].commands == ("echo a",)


def test_comment_ending_in_backslash_does_not_continue():
    """A comment line ending in `\\` is still just a comment."""
    assert shape(parse("# note \\\necho a\n1,2\n")) == [("1", 1, 2.0, ("echo a",))]


def test_escaped_backslash_at_end_is_not_a_continuation():
    """An even number of trailing backslashes is a literal backslash (as in the shell), not a continuation."""
    parsed = parse("echo a\\\\\n1,2\n")
    assert parsed.tasks[0].commands == ("echo a\\\\",)


def test_odd_trailing_backslashes_continue():
    """Three trailing backslashes are an escaped backslash plus a continuation, as in the shell."""
    parsed = parse("echo a\\\\\\\nb\n1,2\n")
    assert parsed.tasks[0].commands == ("echo a\\\\b",)


def test_backslash_then_trailing_spaces_still_continues():
    """`cmd \\  ` (invisible spaces after the backslash) continues rather than leaving a dangling backslash."""
    parsed = parse("python a.py \\  \n  --x 1\n1,2\n")
    assert parsed.tasks[0].commands == ("python a.py   --x 1",)


def test_no_command_ends_with_a_dangling_backslash():
    """No parsed command ends in an odd number of backslashes, which would swallow the next script line."""
    for text in ("echo a \\ \nb\n1,2\n", "echo a\\\\\\\nb\n1,2\n", "echo a\\\\\n1,2\n", "echo a\\ \\\n\n1,2\n"):
        for command in parse(text).tasks[0].commands:
            assert trailing_backslashes(command) % 2 == 0, command


def test_escaped_space_before_an_empty_continued_line_is_kept():
    """`a\\ \\` followed by an empty line keeps the escaped space instead of leaving a dangling backslash."""
    assert parse("echo a\\ \\\n\n1,2\n").tasks[0].commands == ("echo a\\ ",)


def test_line_numbers_count_only_newlines():
    """Line numbers match editors and grep -n: form feeds, U+2028, NEL etc. inside lines don't shift them."""
    text = "echo a\x0cb\u2028c\x85d\x1ce\n1,2\n\n1,2\n"
    with pytest.raises(CommandFileError) as err:
        parse(text, "f")
    assert err.value.line == 4
    assert parse("echo a\x0cb\u2028c\n1,2\n").tasks[0].commands == ("echo a\x0cb\u2028c",)


# --- errors: FILE:LINE: message ----------------------------------------------------------------

BAD = [
    # a block without a queue line
    ("echo a\necho b\n", 2, "QUEUE_ID,VRAM_GB"),
    ("echo a\n", 1, "no queue line"),
    ("echo a\n\necho b\n1,20\n", 1, "no queue line"),
    ("echo a\n1,20\n\necho b\n# c\necho c\n", 6, "QUEUE_ID,VRAM_GB"),
    ("echo a\n1,20\n\necho b\n1,20,3\n", 5, "QUEUE_ID,VRAM_GB"),
    ("echo a\n1,\n", 2, "QUEUE_ID,VRAM_GB"),
    # a queue line with no commands before it
    ("1,20\n", 1, "no commands"),
    ("# c\n\n1,20\n", 3, "no commands"),
    ("echo a\n1,20\n\n2,5\n", 4, "no commands"),
    ("1,20\n2,5\n", 1, "no commands"),
    ("echo a\n1,20\n\n# comment only\n3,1\n", 5, "no commands"),
    # commands after the queue line in the same block
    ("echo a\n1,20\necho b\n", 3, "after the queue line"),
    ("echo a\n1,20\necho b\n2,5\n", 3, "after the queue line"),
    ("x\n1,1\n\necho a\n1, 20\n# c\necho b\n2,5\n", 7, "after the queue line"),
    # bad, negative or non-finite VRAM
    ("echo a\n1,abc\n", 2, "VRAM"),
    ("echo a\n1,20GB\n", 2, "VRAM"),
    ("echo a\n1,-1\n", 2, "negative"),
    ("echo a\n1,1\n\n\necho b\n1,-0.5\n", 6, "negative"),
    ("echo a\n1,nan\n", 2, "finite"),
    ("echo a\n1,inf\n", 2, "finite"),
    ("echo a\n1,-inf\n", 2, "VRAM"),
    ("echo a\n1,1e999\n", 2, "finite"),
    ("echo a\n1,1e300\n", 2, "VRAM"),
    ("echo a\n1,2_0\n", 2, "VRAM"),
    ("echo a\n1,\u0663\n", 2, "VRAM"),
    ("echo a\n1,0x10\n", 2, "VRAM"),
    # bad queue id
    ("echo a\nq/1,20\n", 2, "queue id"),
    ("echo a\n\u00e9,20\n", 2, "queue id"),
    ("echo a\n..,20\n", 2, "queue id"),
    ("echo a\n.,20\n", 2, "queue id"),
    ("echo a\na$b,20\n", 2, "queue id"),
    ("echo a\na b,20\n", 2, "QUEUE_ID"),
    # the file ends inside a continued line
    ("echo a \\\n", 1, "continued"),
    ("echo a\n1,2\n\necho b \\\n  --x \\", 4, "continued"),
    # NUL
    ("echo a\x00\n1,2\n", 1, "NUL"),
    ("echo a\n1,2\n# c\x00\n", 3, "NUL"),
]


@pytest.mark.parametrize("text, line, fragment", BAD)
def test_bad_input_names_the_exact_line(text, line, fragment):
    """Each kind of bad input raises CommandFileError naming the exact line: `FILE:LINE: message`."""
    with pytest.raises(CommandFileError) as err:
        parse(text, "cmds.txt")
    exc = err.value
    assert exc.line == line
    assert exc.path == "cmds.txt"
    assert str(exc).startswith(f"cmds.txt:{line}: ")
    assert str(exc) == f"cmds.txt:{line}: {exc.message}"
    assert fragment.lower() in exc.message.lower()


@pytest.mark.parametrize("text", ["", "\n\n\n", "   \n\t\n", "# only\n# comments\n", "\ufeff"])
def test_file_without_tasks_is_an_error(text, tmp_path):
    """A file with no task blocks is rejected with `FILE: no tasks ...` (there is no line to name)."""
    path = write(tmp_path, text)
    with pytest.raises(CommandFileError) as err:
        load(path)
    assert err.value.line is None
    assert str(err.value).startswith(f"{path}: ")
    assert "no tasks" in str(err.value)


def test_load_reads_a_good_file(tmp_path):
    """load() reads a file from disk and reports its path."""
    path = write(tmp_path, "echo {uni_id}\n1,2\n")
    parsed = load(path)
    assert parsed.path == str(path)
    assert shape(parsed) == [("1", 1, 2.0, ("echo {uni_id}",))]


def test_missing_file(tmp_path):
    """A missing file is `FILE: no such file`."""
    path = tmp_path / "nope.txt"
    with pytest.raises(CommandFileError) as err:
        load(path)
    assert err.value.line is None
    assert str(err.value) == f"{path}: no such file"


def test_directory_is_not_a_command_file(tmp_path):
    """A directory in place of the file is a CommandFileError, not an OSError."""
    with pytest.raises(CommandFileError) as err:
        load(tmp_path)
    assert str(err.value).startswith(f"{tmp_path}: ")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file(tmp_path):
    """A chmod 000 file is `FILE: cannot read: ...`."""
    path = write(tmp_path, "echo a\n1,2\n")
    path.chmod(0)
    try:
        with pytest.raises(CommandFileError) as err:
            load(path)
    finally:
        path.chmod(0o644)
    assert err.value.line is None
    assert str(err.value).startswith(f"{path}: cannot read")


def test_unreadable_file_even_as_root(tmp_path, monkeypatch):
    """A read that fails with PermissionError (simulated, so it also runs as root) is `FILE: cannot read: ...`."""
    path = write(tmp_path, "echo a\n1,2\n")

    def deny(self):  # noqa: ANN001
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(CommandFileError) as err:
        load(path)
    assert str(err.value) == f"{path}: cannot read: Permission denied"


def test_path_through_a_file_is_an_error(tmp_path):
    """A path whose parent is a regular file (ENOTDIR) is a CommandFileError."""
    path = write(tmp_path, "echo a\n1,2\n") / "child"
    with pytest.raises(CommandFileError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize("data, line", [
    (b"\xff\xfe\n1,2\n", 1),
    (b"echo a\n\xff\n1,2\n", 2),
    (b"echo a\n1,2\n\necho caf\xe9\n3,4\n", 4),
    (b"echo a\r\n1,2\r\n\r\necho \xc3\n", 4),
])
def test_non_utf8_names_the_line(tmp_path, data, line):
    """A file that is not UTF-8 is rejected naming the line of the first bad byte."""
    path = write(tmp_path, data)
    with pytest.raises(CommandFileError) as err:
        load(path)
    assert err.value.line == line
    assert str(err.value).startswith(f"{path}:{line}: ")
    assert "UTF-8" in err.value.message


def test_nothing_is_half_parsed():
    """An error late in the file rejects the whole file: no ParsedFile with the good tasks comes back."""
    text = "echo good\n1,2\n\necho good2\n2,3\n\necho bad\n3,-1\n"
    with pytest.raises(CommandFileError) as err:
        parse(text)
    assert err.value.line == 8


# --- placeholders ------------------------------------------------------------------------------

def test_expand_replaces_the_three_placeholders_exactly():
    """{work_dir}, {uni_id} and {available_gpu} are replaced everywhere they appear."""
    out = expand("cd {work_dir} && run --id {uni_id} --gpu {available_gpu} --log {work_dir}/{uni_id}.log",
                 work_dir="/w", uni_id="q1-1-abc", available_gpu="3")
    assert out == "cd /w && run --id q1-1-abc --gpu 3 --log /w/q1-1-abc.log"


@pytest.mark.parametrize("command", [
    "echo ${HOME}",
    "awk '{print $1}' file",
    "cp x.{a,b} /tmp",
    "echo {} {{}} { } {",
    "find . -exec rm {} \\;",
    "echo {UNI_ID} {Work_Dir} { uni_id } {uni_id_} {available_gpus}",
    "python -c 'd={\"k\": 1}; print(d)'",
    "echo }{",
])
def test_other_braces_survive(command):
    """Every brace that is not exactly one of the three placeholders is left alone."""
    assert expand(command, work_dir="/w", uni_id="U", available_gpu="0") == command


def test_doubled_braces_keep_the_outer_ones():
    """`{{uni_id}}` expands the inner placeholder and keeps the outer braces."""
    assert expand("{{uni_id}}", uni_id="U") == "{U}"


def test_substituted_values_are_not_expanded_again():
    """A value that itself contains a placeholder (a work dir named `{uni_id}`) is inserted verbatim."""
    out = expand("cd {work_dir}; echo {uni_id} {available_gpu}",
                 work_dir="/data/{uni_id}/{available_gpu}", uni_id="{work_dir}", available_gpu="0")
    assert out == "cd /data/{uni_id}/{available_gpu}; echo {work_dir} 0"


def test_expand_leaves_placeholders_without_values():
    """Only the placeholders given a value are replaced."""
    assert expand("{work_dir} {uni_id} {available_gpu}", uni_id="U") == "{work_dir} U {available_gpu}"


def test_task_expanded_shows_gpu_marker_until_a_gpu_is_chosen():
    """TaskSpec.expanded puts `<gpu>` where the GPU goes until a GPU index is given."""
    task = parse("run {work_dir} {uni_id} {available_gpu} ${HOME}\n1,2\n").tasks[0]
    assert task.expanded("/w") == [f"run /w {task.uni_id} {GPU_MARKER} ${{HOME}}"]
    assert GPU_MARKER == "<gpu>"
    assert task.expanded("/w", 3) == [f"run /w {task.uni_id} 3 ${{HOME}}"]


@pytest.mark.parametrize("word, meant", [
    ("uniid", "uni_id"), ("uni-id", "uni_id"), ("UNI_ID", "uni_id"), ("uniId", "uni_id"),
    ("work-dir", "work_dir"), ("workdir", "work_dir"), ("work_dri", "work_dir"),
    ("gpu", "available_gpu"), ("gpu_id", "available_gpu"), ("available-gpu", "available_gpu"),
    ("availble_gpu", "available_gpu"),
])
def test_misspelled_placeholders_are_suspicious(word, meant):
    """Brace words that look like a misspelled placeholder are reported with the intended one."""
    assert suspicious_placeholders(f"echo {{{word}}}") == [(word, meant)]


@pytest.mark.parametrize("command", [
    "echo {uni_id} {work_dir} {available_gpu}", "echo ${HOME} ${gpu} ${uniid}", "awk '{print $1}'",
    "echo {a,b}", "echo {x} {name} {epoch}", "echo {}",
])
def test_ordinary_braces_are_not_suspicious(command):
    """Real placeholders, shell variables and ordinary brace words get no warning."""
    assert suspicious_placeholders(command) == []


def test_parse_warns_naming_the_line():
    """A suspicious placeholder gives a warning (not an error) naming its line; the file still parses."""
    text = "# c\necho ok\necho {uniid}\n1,2\n\nrun \\\n  --dir {work-dir}\n2,2\n"
    parsed = parse(text)
    assert len(parsed.tasks) == 2
    assert [(w.line, "{uniid}" in w.message and "{uni_id}" in w.message) for w in parsed.warnings][0] == (3, True)
    assert parsed.warnings[1].line == 6
    assert "{work-dir}" in parsed.warnings[1].message and "{work_dir}" in parsed.warnings[1].message
    # the command is kept as written: a warning never rewrites it
    assert parsed.tasks[0].commands[1] == "echo {uniid}"


# --- uni_id --------------------------------------------------------------------------------------

FILE = "echo a\n1,2\n\necho b\n1,2\n\necho a\n2,4\n\necho a\n1,2\n"


def test_uni_ids_are_unique_even_for_identical_commands():
    """Tasks with identical commands in one queue or across queues still get distinct uni_ids."""
    got = ids(FILE)
    assert len(set(got)) == 4


def test_uni_ids_are_short_and_safe():
    """A uni_id uses only [A-Za-z0-9_.-] and is short (queue, an 8-hex digest, and an occurrence
    number from the second identical block of a queue on)."""
    for task in parse(FILE + "\nx\nmy_q.v-2,1\n").tasks:
        assert SAFE.fullmatch(task.uni_id)
        assert len(task.uni_id) <= len(task.queue) + 20
        suffix = "" if task.occurrence == 1 else f"-{task.occurrence}"
        assert re.fullmatch(rf"q{re.escape(task.queue)}-[0-9a-f]{{8}}{suffix}", task.uni_id)


def test_uni_ids_are_stable_across_parses_and_loads(tmp_path):
    """Parsing the same file again (or loading it from disk) gives the same uni_ids."""
    path = write(tmp_path, FILE)
    assert ids(FILE) == ids(FILE) == [t.uni_id for t in load(path).tasks]


def test_uni_id_is_a_pure_function_of_queue_commands_occurrence():
    """make_uni_id depends on exactly queue, commands and occurrence (not the position), and
    TaskSpec uses it."""
    base = make_uni_id("1", ("a", "b"))
    assert base == make_uni_id("1", ("a", "b"), 1)
    assert len({base, make_uni_id("2", ("a", "b")), make_uni_id("1", ("a", "b"), 2),
                make_uni_id("1", ("a", "c")), make_uni_id("1", ("a b",)), make_uni_id("1", ("ab",))}) == 6
    spec = TaskSpec(queue="1", position=2, commands=("a", "b"), vram_gb=1, line=1)
    assert spec.uni_id == base == TaskSpec(queue="1", position=7, commands=("a", "b"), vram_gb=3, line=9).uni_id
    assert spec.legacy_uni_id == "q1-2-" + base.rsplit("-", 1)[1]


def test_inserting_or_removing_a_task_leaves_other_uni_ids_alone():
    """A task inserted at the front of a queue, or one removed, changes no other task's uni_id."""
    before = dict(zip(["a1", "b", "a2-other-queue", "a1-again"], ids(FILE)))
    inserted = ids("echo new\n1,2\n\n" + FILE)
    assert inserted[1:] == list(before.values())
    removed = ids(FILE.replace("echo b\n1,2\n\n", ""))
    assert removed == [before["a1"], before["a2-other-queue"], before["a1-again"]]


def test_identical_blocks_get_occurrence_numbers_in_file_order():
    """The second identical block of a queue is `-2`; removing the first renumbers only that pair."""
    got = ids(FILE)
    assert got[3] == got[0] + "-2"
    assert ids("echo a\n1,2\n\necho a\n1,2\n\necho a\n1,2\n")[2] == got[0] + "-3"


def test_uni_id_ignores_vram_comments_blank_lines_and_spacing():
    """VRAM, comments, extra blank lines and spacing of the queue line don't change uni_ids."""
    other = "# top\n\n\necho a\n# c\n1 , 9\n\n\n\necho b\n1,2\n\n# x\necho a\n2,  0.5\n\necho a\n1,2\n\n"
    assert ids(other) == ids(FILE)


def test_editing_a_task_changes_only_its_uni_id():
    """Editing one task's commands changes its uni_id and leaves every other task's alone."""
    before = ids(FILE)
    after = ids(FILE.replace("echo b", "echo B"))
    assert after[1] != before[1]
    assert [after[i] for i in (0, 2, 3)] == [before[i] for i in (0, 2, 3)]
    added = ids(FILE.replace("echo b\n", "echo b\necho more\n"))
    assert added[1] != before[1] and [added[i] for i in (0, 2, 3)] == [before[i] for i in (0, 2, 3)]


# --- properties ----------------------------------------------------------------------------------

FRAGMENTS = ["", " ", "\t", "#", "# c", ",", ",,", "1,20", "q, 7.5", "a,b", "1,-3", "1,nan", "x/y,2", "\\", "\\\\",
             "{", "}", "{uni_id}", "{uniid}", "${HOME}", "{a,b}", "echo", "echo a", "é", "\u2028", "\x0c", "\x85",
             "\x00", "\r", "\ufeff", "1e999", "-", "..", "\U0001f600"]


@st.composite
def soup(draw) -> str:
    """Text built from pieces that matter to the parser: commas, backslashes, #, blanks, braces..."""
    mixed = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=5).map("".join)
    queue_lines = st.sampled_from(["1,20", "a, 7.5", " q.1 , 0 ", "1,-3", "x/y,2", "2,nan", "1,1e400", "1 ,2 \\"])
    if draw(st.booleans()):
        lines = draw(st.lists(st.one_of(mixed, queue_lines, st.just("")), max_size=14))
    else:  # block-shaped: random command lines, then a (sometimes bad) queue line
        good = st.sampled_from(["1,20", "a, 7.5", " q.1 , 0 "])
        commands = st.lists(st.one_of(mixed, mixed.map("run ".__add__)), min_size=1, max_size=3)
        blocks = draw(st.lists(st.tuples(commands, st.one_of(good, good, queue_lines)), min_size=1, max_size=4))
        lines = [line for commands, queue in blocks for line in [*commands, queue, ""]]
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "", "\n", "\\"]))


def check_outcome(text: str, path: str = "p.cmd") -> ParsedFile | None:
    """Parse, asserting the only failure is a well-formed CommandFileError and that successes are sane."""
    nlines = text.count("\n") + 1
    try:
        parsed = parse(text, path)
    except CommandFileError as exc:
        assert str(exc).startswith(f"{path}:")
        assert exc.line is None or 1 <= exc.line <= nlines
        assert str(exc) == (f"{path}:{exc.line}: {exc.message}" if exc.line else f"{path}: {exc.message}")
        return None
    assert parsed.tasks
    uids = [t.uni_id for t in parsed.tasks]
    assert len(set(uids)) == len(uids)
    for t in parsed.tasks:
        assert SAFE.fullmatch(t.uni_id) and SAFE.fullmatch(t.queue)
        assert 1 <= t.line <= nlines
        assert math.isfinite(t.vram_gb) and t.vram_gb >= 0 and isinstance(t.vram_bytes, int)
        assert t.commands
        for c in t.commands:
            assert c and c == c.lstrip() and "\x00" not in c and "\n" not in c
            # trailing whitespace only survives as an escaped space (`a\ `)
            assert c == c.rstrip() or trailing_backslashes(c.rstrip()) % 2 == 1
            assert trailing_backslashes(c) % 2 == 0
        t.expanded("/w"), t.expanded("/w", 0)
    for q in group_queues(parsed.tasks).values():
        assert [t.position for t in q] == list(range(1, len(q) + 1))
    for w in parsed.warnings:
        assert 1 <= w.line <= nlines
    return parsed


@PROPS
@given(st.text())
def test_arbitrary_text_only_raises_command_file_error(text):
    """Any unicode text either parses into sane tasks or raises a CommandFileError naming a real line."""
    check_outcome(text)


@PROPS
@given(soup())
def test_parser_soup_only_raises_command_file_error(text):
    """Random mixes of commas, backslashes, #, blank lines, braces, unicode and NUL never crash the parser."""
    check_outcome(text)


@PROPS
@given(st.binary(max_size=200))
def test_arbitrary_bytes_on_disk_only_raise_command_file_error(tmp_path_factory, data):
    """Any bytes in a file either load or raise a CommandFileError starting with the path and a real line."""
    path = tmp_path_factory.mktemp("bytes") / "f.txt"
    path.write_bytes(data)
    nlines = data.count(b"\n") + 1
    try:
        load(path)
    except CommandFileError as exc:
        assert str(exc).startswith(f"{path}:")
        assert exc.line is None or 1 <= exc.line <= nlines


# valid files, generated

ARG = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-=./", min_size=1, max_size=8)
REST_PIECE = st.one_of(
    st.sampled_from([" {uni_id}", " {work_dir}/out", " --gpu {available_gpu}", " ${HOME}", " awk '{print $1}'",
                     " x.{a,b}", " a,b", " , ", " # trailing comment", " \\\\", " {uniid}", " {gpu}", " {}",
                     " 'é ü 漢字 😀'", " \\\\n", "\\\\", "  ", "#", ","]),
    st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=6),
)
COMMAND = st.builds(lambda prog, arg, rest: f"{prog} {arg}{''.join(rest)}".strip(),
                    st.sampled_from(["echo", "python train.py", "bash run.sh", "./go", "CUDA=1 torchrun"]),
                    ARG, st.lists(REST_PIECE, max_size=4)).map(
    lambda c: c + "\\" if trailing_backslashes(c) % 2 else c)
QUEUE = st.one_of(st.integers(0, 99).map(str),
                  st.text(alphabet="abcXYZ019_.-", min_size=1, max_size=6).filter(lambda q: q not in (".", "..")))
VRAM = st.one_of(st.integers(0, 200).map(str),
                 st.floats(0, 200, allow_nan=False).map(repr),
                 st.sampled_from(["0", "0.0", ".5", "7.", "7.50", "1e1", "2E0", "+3"]))
COMMENT = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=10).map(
    lambda s: "#" + s)


@st.composite
def physical(draw, command: str) -> list[str]:
    """A command as one or more physical lines joined by trailing-backslash continuations."""
    cuts = [k for k in range(1, len(command)) if command[k - 1] != "\\"]
    chosen = sorted(draw(st.sets(st.sampled_from(cuts), max_size=2))) if cuts and draw(st.booleans()) else []
    pieces, start = [], 0
    for k in [*chosen, len(command)]:
        pieces.append(command[start:k])
        start = k
    return [p + "\\" for p in pieces[:-1]] + [pieces[-1]]


@st.composite
def command_files(draw):
    """(file text, [(queue, vram text, commands)]) for a valid command file."""
    blocks = draw(st.lists(st.tuples(QUEUE, VRAM, st.lists(COMMAND, min_size=1, max_size=3)), min_size=1,
                           max_size=8))
    # reuse queues so that some hold several tasks
    names = draw(st.lists(QUEUE, min_size=1, max_size=3))
    blocks = [(names[i % len(names)] if draw(st.booleans()) else q, v, cs) for i, (q, v, cs) in enumerate(blocks)]
    out: list[str] = []
    for _ in range(draw(st.integers(0, 2))):
        out.append(draw(st.one_of(COMMENT, st.sampled_from(["", "  ", "\t"]))))
    for index, (queue, vram, commands) in enumerate(blocks):
        if index:
            out += draw(st.lists(st.sampled_from(["", " ", "\t "]), min_size=1, max_size=3))
            if draw(st.booleans()):
                out.append(draw(COMMENT))
        for command in commands:
            if draw(st.integers(0, 4)) == 0:
                out.append(draw(COMMENT))
            out += draw(physical(command))
        if draw(st.integers(0, 4)) == 0:
            out.append(draw(COMMENT))
        left, right = draw(st.sampled_from([("", ""), (" ", ""), ("", " "), ("  ", "\t")]))
        queue_line = f"{left}{queue}{right},{right}{vram}{left}"
        if draw(st.integers(0, 5)) == 0:
            out += [f"{queue},\\", f" {vram}"]
        else:
            out.append(queue_line)
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    text = newline.join(out) + draw(st.sampled_from(["", newline, newline * 2]))
    return text, [(q, v, tuple(cs)) for q, v, cs in blocks]


def expected_queues(blocks):
    queues: dict[str, list[tuple[float, tuple[str, ...]]]] = {}
    for queue, vram, commands in blocks:
        queues.setdefault(queue, []).append((float(vram), commands))
    return queues


@PROPS
@given(command_files())
def test_generated_files_parse_to_the_generated_tasks(case):
    """A valid file built from random queues, commands and VRAMs parses to exactly those tasks, in order."""
    text, blocks = case
    parsed = check_outcome(text)
    assert parsed is not None
    assert [(t.queue, t.vram_gb, t.commands) for t in parsed.tasks] == [
        (q, float(v), cs) for q, v, cs in blocks]
    grouped = group_queues(parsed.tasks)
    assert {q: [(t.vram_gb, t.commands) for t in ts] for q, ts in grouped.items()} == expected_queues(blocks)
    assert list(grouped) == list(expected_queues(blocks))
    # the same text parses to the same ids again
    assert [t.uni_id for t in parse(text).tasks] == [t.uni_id for t in parsed.tasks]


@PROPS
@given(case=command_files())
def test_generated_files_round_trip_through_check_json(tmp_path_factory, case):
    """`check --json` on a generated file reports the generated queues, order, VRAMs and commands."""
    text, blocks = case
    directory = tmp_path_factory.mktemp("rt")
    path = directory / "commands.txt"
    path.write_bytes(text.encode("utf-8"))
    work = directory / "work"
    result = CliRunner().invoke(main, ["check", "--commands", str(path), "--json", "--work-dir", str(work)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["file"] == str(path)
    want = expected_queues(blocks)
    assert [q["queue"] for q in data["queues"]] == list(want)
    for q in data["queues"]:
        got = [(t["vram_gb"], tuple(t["commands"])) for t in q["tasks"]]
        assert got == want[q["queue"]]
        assert [t["position"] for t in q["tasks"]] == list(range(1, len(got) + 1))
        for t in q["tasks"]:
            assert SAFE.fullmatch(t["uni_id"])
            assert t["expanded"] == [expand(c, work_dir=str(work.resolve()), uni_id=t["uni_id"],
                                            available_gpu=GPU_MARKER) for c in t["commands"]]
    all_ids = [t["uni_id"] for q in data["queues"] for t in q["tasks"]]
    assert len(set(all_ids)) == len(all_ids) == len(blocks)


@PROPS
@given(st.lists(st.tuples(st.sampled_from(["1", "2", "a"]), st.lists(COMMAND, min_size=1, max_size=2)),
                min_size=2, max_size=6), st.data())
def test_editing_one_task_never_changes_another_uni_id(tasks, data):
    """Changing one task's commands changes its uni_id and no other task's (but for blocks
    identical to it in its queue, which are told apart by their occurrence number)."""
    def render(items):
        return "\n\n".join("\n".join([*cs, f"{q},1"]) for q, cs in items) + "\n"

    victim = data.draw(st.integers(0, len(tasks) - 1))
    queue, commands = tasks[victim]
    edited = list(tasks)
    edited[victim] = (queue, [*commands[:-1], commands[-1] + " --edited"])
    before, after = ids(render(tasks)), ids(render(edited))
    assert after[victim] != before[victim]
    others = [i for i, t in enumerate(tasks) if i != victim and t != tasks[victim]]
    assert [after[i] for i in others] == [before[i] for i in others]


def test_placeholder_names_are_the_documented_three():
    """The placeholders are exactly {work_dir}, {uni_id} and {available_gpu}."""
    assert set(PLACEHOLDERS) == {"work_dir", "uni_id", "available_gpu"}


def test_shell_style_placeholder_is_left_to_the_shell_with_a_warning():
    """`${uni_id}` is a shell variable: not expanded, and the line gets a warning naming the fix."""
    parsed = parse("echo ${uni_id} {uni_id}\n1,2\n")
    task = parsed.tasks[0]
    assert task.expanded("/w") == [f"echo ${{uni_id}} {task.uni_id}"]
    assert [(w.line, "${uni_id}" in w.message) for w in parsed.warnings] == [(1, True)]
