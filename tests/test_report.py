"""The run report and its SVG timeline, from history lines."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET

from gpu_compete import report, timeline

from .helpers import clean_env, run_gpu_compete

SVG = "{http://www.w3.org/2000/svg}"


def iso(t: float, ms: bool = True) -> str:
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))
    return text + f".{int(round(t * 1000)) % 1000:03d}" if ms else text


T0 = 1_800_000_000.0


def line(uid, queue, gpu, attempt, start, end, state="normal_exit", **extra):
    entry = {"uni_id": uid, "queue": queue, "gpu": gpu, "attempt": attempt, "state": state,
             "start": None if start is None else iso(T0 + start), "end": iso(T0 + end, ms=False if state != "normal_exit" else True)}
    entry.update(extra)
    return entry


HISTORY = [
    line("q1-1-a", "1", 0, 1, 0, 10),
    line("q2-1-b", "2", 1, 1, 0, 4, "abnormal_exit", error_type="oom", peak_vram_gb=23.5),
    line("q2-1-b", "2", 1, 2, 5, 12, peak_vram_gb=12.0),
    line("q1-2-c", "1", 0, 1, 10, 20),
    line("q3-1-d", "3", 1, 1, 12, 20, "abnormal_exit", error_type="runtime_error", gave_up=True),
]


def test_attempts_parse_history_lines_and_drop_repeats():
    """Each ended attempt becomes one Attempt with times parsed; a success written twice counts once."""
    atts = report.attempts(HISTORY + [HISTORY[0], {"junk": 1}, {"uni_id": "x", "state": "running"}])
    assert len(atts) == 5
    first = atts[0]
    assert (first.uni_id, first.gpu, first.attempt, first.duration) == ("q1-1-a", "0", 1, 10.0)
    assert atts[1].error_type == "oom" and atts[1].peak_vram_gb == 23.5


def test_a_later_run_of_the_same_attempt_numbers_counts_again():
    """`--fresh` runs every task again from attempt 1: those lines are new attempts, while the
    daemon's copy of a success the supervisor wrote (its start to the second) is not."""
    again = [line(e["uni_id"], e["queue"], e["gpu"], e["attempt"], 100 + i, 110 + i, e["state"])
             for i, e in enumerate(HISTORY)]
    copy = dict(HISTORY[0], start=iso(T0, ms=False), by="daemon")
    atts = report.attempts(HISTORY + [copy] + again)
    assert len(atts) == 10
    assert [a.start for a in atts[5:]] == [T0 + 100 + i for i in range(5)]


def test_parse_time_keeps_milliseconds_and_refuses_junk():
    """History times with and without milliseconds parse; anything else is None."""
    assert report.parse_time(iso(T0 + 0.25)) == T0 + 0.25
    assert report.parse_time(iso(T0, ms=False)) == T0
    assert report.parse_time("yesterday") is None and report.parse_time(None) is None


def test_build_totals_per_task_and_per_gpu():
    """Makespan, busy shares, GPU-hours, outcomes, error types and peak VRAM come out as computed by hand."""
    data = report.build(report.attempts(HISTORY), gpus=["0", "1", "2"])
    totals = data["totals"]
    assert totals["makespan_s"] == 20.0
    assert totals["tasks"] == 4 and totals["attempts"] == 5 and totals["completed"] == 3 and totals["failed"] == 1
    assert totals["failed_attempts"] == 2
    gpus = {g["gpu"]: g for g in data["gpus"]}
    assert gpus["0"]["busy_s"] == 20.0 and gpus["0"]["busy_share"] == 1.0
    assert gpus["1"]["busy_s"] == 19.0  # 0-4, 5-12, 12-20
    assert gpus["2"]["busy_s"] == 0.0 and gpus["2"]["attempts"] == 0
    assert totals["gpu_hours_used"] == round(39 / 3600, 4)
    tasks = {t["uni_id"]: t for t in data["tasks"]}
    assert tasks["q2-1-b"]["outcome"] == "completed" and tasks["q2-1-b"]["error_types"] == ["oom"]
    assert tasks["q2-1-b"]["peak_vram_gb"] == 23.5 and tasks["q2-1-b"]["total_s"] == 11.0
    assert tasks["q3-1-d"]["outcome"] == "failed"


def test_idle_while_waiting_counts_gaps_when_a_queue_was_ready():
    """A queue ready from the start waits while one GPU is idle: that idle time is counted; a gap after a failure (a backoff) is not."""
    hist = [line("q1-1-a", "1", 0, 1, 0, 10), line("q2-1-b", "2", 0, 1, 10, 20),  # q2 waited 0-10, GPU 1 idle
            line("q3-1-c", "3", 1, 1, 0, 2, "abnormal_exit", error_type="oom"),
            line("q3-1-c", "3", 1, 2, 8, 9)]  # 2-8 is a backoff: not waiting
    data = report.build(report.attempts(hist), gpus=["0", "1"])
    gpus = {g["gpu"]: g for g in data["gpus"]}
    # q2 waited 0-10; GPU 1 was idle 2-8 and 9-10 of that
    assert gpus["1"]["idle_while_waiting_s"] == 7.0
    assert gpus["0"]["idle_while_waiting_s"] == 0.0
    assert data["totals"]["gpu_hours_idle_while_waiting"] == round(7 / 3600, 4)


def test_attempt_without_start_is_counted_but_not_timed():
    """A failure line from an older daemon without `start` still counts as an attempt."""
    data = report.build(report.attempts([line("q1-1-a", "1", 0, 1, None, 5, "abnormal_exit", error_type="lost")]))
    assert data["totals"]["attempts"] == 1 and data["totals"]["makespan_s"] == 0.0
    assert data["tasks"][0]["outcome"] == "not completed"


def test_svg_is_valid_with_one_bar_per_timed_attempt():
    """The timeline parses as XML, has one row per GPU and one coloured bar per attempt, labelled where it fits."""
    atts = report.attempts(HISTORY)
    svg = timeline.render(atts, gpus=["0", "1", "2"])
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    bars = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "attempt"]
    assert len(bars) == 5
    colors = [b.get("fill") for b in bars]
    assert colors.count(timeline.COLORS["completed"]) == 3
    assert timeline.COLORS["oom"] in colors and timeline.COLORS["failed"] in colors
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "GPU 2" in texts and "q1-1-a" in texts
    # a bar narrower than its label carries no label, but its tooltip names it
    tiny = report.attempts([line("q9-1-longname", "9", 0, 1, 0, 0.01), line("q1-1-a", "1", 0, 1, 0, 100)])
    root = ET.fromstring(timeline.render(tiny))
    assert "q9-1-longname" not in [t.text for t in root.iter(f"{SVG}text")]
    assert any("q9-1-longname" in (t.text or "") for t in root.iter(f"{SVG}title"))
    tips = [t.text for t in ET.fromstring(svg).iter(f"{SVG}title")]
    assert any("q2-1-b attempt 1: oom" in t and "peak 23.5 GB" in t for t in tips)


def test_svg_escapes_what_it_writes():
    """A GPU key or uni_id with XML characters cannot break the document."""
    atts = [report.Attempt("a<b>&c", "1", "0&1", 1, T0, T0 + 100, "normal_exit")]
    ET.fromstring(timeline.render(atts, title="x < y & z"))


def test_report_cli_text_json_and_svg(tmp_path):
    """`gpu-compete report` reads STATE_DIR/history.jsonl and prints text, JSON, and writes the SVG."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in HISTORY) + '{"torn":')
    out = run_gpu_compete("report", "--state-dir", str(state), "--svg", str(tmp_path / "t.svg"), env=clean_env())
    assert out.returncode == 0, out.stderr
    assert "makespan 20.0s" in out.stdout and "q2-1-b" in out.stdout and "oom" in out.stdout
    ET.parse(tmp_path / "t.svg")
    out = run_gpu_compete("report", "--state-dir", str(state), "--json", env=clean_env())
    assert json.loads(out.stdout)["totals"]["attempts"] == 5


def test_report_cli_on_empty_state_dir(tmp_path):
    """With no history yet the report says so and exits 0."""
    out = run_gpu_compete("report", "--state-dir", str(tmp_path), env=clean_env())
    assert out.returncode == 0 and "no attempts" in out.stdout


def test_report_since_keeps_recent_attempts(tmp_path):
    """--since leaves out attempts that ended before it; a bad time exits 2."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in HISTORY))
    since = iso(T0 + 15, ms=False)
    out = run_gpu_compete("report", "--state-dir", str(state), "--json", "--since", since, env=clean_env())
    assert out.returncode == 0, out.stderr
    assert [t["uni_id"] for t in json.loads(out.stdout)["tasks"]] == ["q1-2-c", "q3-1-d"]
    out = run_gpu_compete("report", "--state-dir", str(state), "--since", "last week", env=clean_env())
    assert out.returncode == 2 and "--since 'last week'" in out.stderr
