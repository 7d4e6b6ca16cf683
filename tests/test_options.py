"""Queue-line options (`QUEUE_ID,VRAM_GB,key=value...`): values, durations, errors at
`FILE:LINE`, `after=` cycles found before anything runs, and `check` showing them."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gpu_compete.cli import main
from gpu_compete.commandfile import CommandFileError, parse
from gpu_compete.options import format_duration, parse_duration


def one(queue_line: str):
    return parse(f"echo hi\n{queue_line}\n").tasks[0]


def test_plain_queue_line_means_the_defaults():
    """A `QUEUE_ID,VRAM_GB` line gives one GPU, no timeout, priority 0, default retries, no after."""
    t = one("1,8")
    assert (t.gpus, t.timeout_s, t.priority, t.retries, t.after) == (1, None, 0, None, ())
    assert t.options() == {}


def test_every_option_becomes_a_validated_value():
    """Each key lands on TaskSpec as a typed value."""
    text = "echo a\n2,1\n\necho b\n1,20, gpus=2 ,timeout=1h30m,priority=-3,retries=0,after=2\n"
    t = parse(text).tasks[1]
    assert (t.gpus, t.timeout_s, t.priority, t.retries, t.after) == (2, 5400.0, -3, 0, ("2",))
    assert t.options() == {"gpus": 2, "timeout_s": 5400.0, "priority": -3, "retries": 0, "after": ["2"]}
    assert t.queue_line == 5 and t.line == 4


def test_options_do_not_change_the_uni_id():
    """Options say how a task runs, not what it is: same commands and place, same uni_id."""
    assert one("1,8").uni_id == one("1,8,priority=9,timeout=5m,gpus=2").uni_id


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("4h", 14400), ("1h30m", 5400),
                                            ("2d", 172800), ("1m30s", 90), ("0.5s", 0.5), ("1h0m5s", 3605)])
def test_durations(text, seconds):
    """Durations are written with units and combine in d, h, m, s order."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["90", "", "1.5h", "30m1h", "0s", "-5m", "1 h", "5 minutes", "400d", "١s"])
def test_bad_durations(text):
    """A duration without a unit, out of order, zero, negative or past a year is refused."""
    with pytest.raises(ValueError):
        parse_duration(text)


def test_bare_number_duration_suggests_units():
    """`timeout=90` asks whether seconds or minutes were meant."""
    with pytest.raises(ValueError, match="90s or 90m"):
        parse_duration("90")


def test_format_duration_round_trips():
    """What `check` shows parses back to the same seconds."""
    for seconds in (5, 59, 60, 90, 3600, 5400, 3605, 0.5):
        assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("line, fragment", [
    ("1,8,gpu=2", "unknown option 'gpu'; did you mean gpus?"),
    ("1,8,colour=red", "unknown option 'colour'"),
    ("1,8,gpus=2,gpus=3", "option gpus is given twice"),
    ("1,8,gpus=0", "gpus=0: must be at least 1"),
    ("1,8,gpus=two", "expected an integer"),
    ("1,8,gpus=1.5", "expected an integer"),
    ("1,8,gpus=65", "at most 64"),
    ("1,8,timeout=90", "did you mean 90s or 90m"),
    ("1,8,timeout=", "option timeout has no value"),
    ("1,8,priority=high", "expected an integer"),
    ("1,8,retries=-1", "at least 0"),
    ("1,8,after=a b", "not a queue id"),
    ("1,8,after=2+2", "named twice"),
    ("1,8,gpus", "only key=value options"),
    ("1,8,", "empty option"),
    ("1,8,,gpus=2", "empty option"),
])
def test_bad_options_name_the_queue_line(line, fragment):
    """Every unknown key, bad value or repeated key is FILE:LINE: what is wrong."""
    with pytest.raises(CommandFileError) as info:
        parse(f"# c\necho a\n{line}\n", "cmds.txt")
    assert str(info.value).startswith("cmds.txt:3: ")
    assert fragment in str(info.value)


def test_after_unknown_queue_is_an_error():
    """after= naming a queue the file lacks can never be satisfied: an error at its line."""
    with pytest.raises(CommandFileError, match=r"^f:2: after=9: there is no queue 9"):
        parse("echo a\n1,1,after=9\n", "f")


def test_after_own_queue_is_an_error():
    """A task waiting for its own queue to be done waits for itself."""
    with pytest.raises(CommandFileError, match=r"^f:5: after=1: a task cannot wait for its own queue"):
        parse("echo a\n1,1\n\necho b\n1,1,after=1\n", "f")


def test_after_cycle_is_found_before_anything_runs():
    """A cycle through three queues is one FILE:LINE error that names the cycle."""
    text = "echo a\n1,1,after=2\n\necho b\n2,1,after=3\n\necho c\n3,1\n\necho d\n3,1,after=1\n"
    with pytest.raises(CommandFileError) as info:
        parse(text, "f")
    message = str(info.value)
    assert message.startswith("f:2: after= makes a cycle")
    assert "queue 1 waits for queue 2 waits for queue 3 waits for queue 1" in message


def test_after_without_cycle_parses():
    """A diamond of after= (3 after 1+2, 2 after 1) is fine."""
    text = "echo a\n1,1\n\necho b\n2,1,after=1\n\necho c\n3,1,after=1+2\n"
    assert [t.after for t in parse(text).tasks] == [(), ("1",), ("1", "2")]


@pytest.mark.parametrize("text, commands", [
    ("echo a\n1,8\n", ("echo a",)),
    ("python x.py --a,b\n1,8\n", ("python x.py --a,b",)),
    ("echo x\nfoo,1,bar\necho y\n1,8\n", ("echo x", "foo,1,bar", "echo y")),  # commas mid-block: a command
])
def test_old_format_parses_as_before(text, commands):
    """Files without options give the same tasks (commands, VRAM, no options) as before options existed."""
    (task,) = parse(text).tasks
    assert (task.commands, task.vram_gb, task.options()) == (commands, 8.0, {})


def test_queue_line_with_options_in_mid_block_is_a_missing_blank_line():
    """A queue line with options followed by commands is caught like a plain one."""
    with pytest.raises(CommandFileError, match=r"^f:3: command after the queue line at line 2"):
        parse("echo a\n1,8,gpus=2\necho b\n2,1\n", "f")


def test_check_shows_options(tmp_path):
    """`check` prints the options beside VRAM and `check --json` gives them as values."""
    path = tmp_path / "c.txt"
    path.write_text("echo a\n1,20,gpus=2,timeout=1h30m,priority=5\n\necho b\n2,4,after=1,retries=0\n")
    result = CliRunner().invoke(main, ["check", "--commands", str(path)])
    assert result.exit_code == 0, result.output
    assert "vram 20 GB on each of 2 GPUs, timeout 1h30m, priority 5" in result.stdout
    assert "vram 4 GB, retries 0, after queue 1" in result.stdout
    result = CliRunner().invoke(main, ["check", "--commands", str(path), "--json"])
    data = json.loads(result.stdout)
    assert data["queues"][0]["tasks"][0]["options"] == {"gpus": 2, "timeout_s": 5400.0, "priority": 5}
    assert data["queues"][1]["tasks"][0]["options"] == {"retries": 0, "after": ["1"]}


def test_check_bad_option_exits_2(tmp_path):
    """A bad option through the CLI is FILE:LINE on stderr and exit status 2."""
    path = tmp_path / "c.txt"
    path.write_text("echo a\n1,20,gpus=2,gpus=2\n")
    result = CliRunner().invoke(main, ["check", "--commands", str(path)])
    assert result.exit_code == 2
    assert f"{path}:2: option gpus is given twice" in result.output


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

OPTION_VALUES = st.fixed_dictionaries({}, optional={
    "gpus": st.integers(1, 64),
    "timeout_s": st.integers(1, 10**6).map(float),
    "priority": st.integers(-10**6, 10**6),
    "retries": st.integers(0, 10**6),
})


@settings(max_examples=200, deadline=None)
@given(OPTION_VALUES, st.randoms(use_true_random=False))
def test_any_valid_options_round_trip(values, rnd):
    """Options written in any order (timeouts as `check` formats them) parse to exactly those values."""
    from gpu_compete.options import format_duration

    items = [f"timeout={format_duration(v)}" if k == "timeout_s" else f"{k}={v}" for k, v in values.items()]
    rnd.shuffle(items)
    line = ",".join(["1", "8", *items])
    task = one(line)
    assert {k: getattr(task, k) for k in values} == values
    # options() leaves out what equals the default (gpus=1, priority=0)
    assert task.options() == {k: v for k, v in values.items() if (k, v) not in (("gpus", 1), ("priority", 0))}
