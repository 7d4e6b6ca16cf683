"""Commands that look at a run without touching it: `report`, `logs`, `watch`, `completion`.

They read files the daemon and the supervisors write (history, logs, status.json, the
registry); none of them talks to the daemon.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .cli import _fail, _state_dir, _uni_id, main
from .completion import complete_uni_id

STATE_DIR_OPT = click.option("--state-dir", default="script_process", show_default=True,
                             envvar="GPU_COMPETE_STATE_DIR", help="The daemon's state directory.")


# --- report ----------------------------------------------------------------------------------

@main.command()
@STATE_DIR_OPT
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--svg", "svg_file", type=click.Path(dir_okay=False, writable=True),
              help="Also write a timeline picture (one row per GPU, one bar per attempt) to this SVG file.")
@click.option("--since", metavar="TIME",
              help="Only attempts that ended at or after TIME (local, 2026-11-22T14:00:00 or 2026-11-22).")
def report(state_dir: str, as_json: bool, svg_file: str | None, since: str | None) -> None:
    """Summarize the history: per task its attempts, durations, GPUs, error types and peak VRAM;
    per GPU its busy share; totals (makespan, GPU-hours used, GPU-hours idle while work waited).
    The history holds every run on STATE_DIR; --since keeps the recent ones."""
    from . import journal, timeline
    from . import report as report_mod

    state = _state_dir(state_dir)
    history = state / "history.jsonl"
    try:
        atts = report_mod.attempts(journal.entries(history))
    except OSError as exc:
        _fail(f"cannot read {history}: {exc.strerror or exc}", 1)
    if since is not None:
        start = report_mod.parse_time(since if len(since) > 10 else f"{since}T00:00:00")
        if start is None:
            _fail(f"--since {since!r} is not a time like 2026-11-22T14:00:00 or a date like 2026-11-22")
        atts = [a for a in atts if a.end is not None and a.end >= start]
    gpus: list[str] = []
    try:  # GPUs that never ran anything still get a row, from the last status.json
        gpus = [str(g.get("key", g.get("index"))) for g in json.loads((state / "status.json").read_text())["gpus"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    data = report_mod.build(atts, gpus)
    if svg_file:
        try:
            Path(svg_file).write_text(timeline.render(atts, gpus))
        except OSError as exc:
            _fail(f"cannot write {svg_file}: {exc.strerror or exc}", 1)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(report_mod.render(data))
        if svg_file:
            click.echo(f"\ntimeline written to {svg_file}")


# --- logs ------------------------------------------------------------------------------------

def _task_over(state: Path, uni_id: str) -> bool:
    """True when no further output will come for the task: it completed or gave up, or
    nothing runs it now and no daemon runs on the state directory to start it again."""
    from . import journal, procs
    from .pidfile import running_daemon
    from .registry import Registry, RegistryError

    try:
        record = Registry(state / "uni_id.json").get(uni_id)
    except RegistryError:
        return False
    if record is not None and record.get("state") == "running":
        return not any(procs.liveness(record.get(p), record.get(c)) == "alive"
                       for p, c in (("supervisor_pid", "supervisor_create_time"), ("pid", "create_time")))
    if record is not None and record.get("gave_up") is True:
        return True
    if running_daemon(state) is None:
        return True
    if record is None:
        if uni_id in journal.completed(state / "history.jsonl"):
            return True
        try:  # a task the running daemon doesn't have will not start
            return uni_id not in json.loads((state / "status.json").read_text())["task_ids"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
    return record.get("state") == "normal_exit"


@main.command()
@click.argument("uni_id", shell_complete=complete_uni_id)
@STATE_DIR_OPT
@click.option("-f", "--follow", is_flag=True, help="Keep printing as the log grows, until the task ends.")
@click.option("--attempt", type=click.IntRange(min=1), help="Only this attempt (1 is the first run).")
@click.option("--ray", "ray_address", metavar="ADDRESS", envvar="GPU_COMPETE_RAY",
              help="A task of a --ray run whose node's disk is not this one: fetch its log through its agent.")
def logs(uni_id: str, state_dir: str, follow: bool, attempt: int | None, ray_address: str | None) -> None:
    """Print a task's log (STATE_DIR/logs/UNI_ID.log, or STATE_DIR/nodes/NODE/logs/UNI_ID.log
    for a task of a --ray run): every attempt, each opened by a `==== ... start` line and
    closed by a `==== ... end` line, or only one with --attempt. With -f, follow it like
    `tail -f` until the task has ended (completed, given up, or nothing runs it and no daemon
    will)."""
    from . import tasklog

    uid = _uni_id(uni_id)
    state = _state_dir(state_dir)
    path = state / "logs" / f"{uid}.log"
    if not path.exists():
        path = next(iter(sorted((state / "nodes").glob(f"*/logs/{uid}.log"))), path)
    out = sys.stdout.buffer
    if ray_address and not path.exists():
        from .cluster_run import fetch_log

        text = fetch_log(ray_address, state.resolve(), uid, fail=_fail)
        chosen = tasklog.select(text.encode(), uid, attempt)
        if chosen is None:
            _fail(f"{uid} has no attempt {attempt}", 1)
        out.write(chosen)
        out.flush()
        return
    if follow and (path.exists() or not _task_over(state, uid)):
        try:
            for chunk in tasklog.follow(path, uid, attempt, lambda: _task_over(state, uid)):
                out.write(chunk)
                out.flush()
        except KeyboardInterrupt:
            pass
        return
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        _fail(f"no log for {uid} in {state / 'logs'} or {state / 'nodes'}/*/logs (it has not started yet, or the uni_id is wrong; "
              "a task of a --ray run on another node: add --ray ADDRESS)", 1)
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror or exc}", 1)
    chosen = tasklog.select(data, uid, attempt)
    if chosen is None:
        numbers = [s.number for s in tasklog.sections(data, uid)]
        _fail(f"{uid} has no attempt {attempt} (attempts in its log: {', '.join(map(str, numbers)) or 'none'})", 1)
    out.write(chosen)
    out.flush()


# --- watch -----------------------------------------------------------------------------------

@main.command()
@STATE_DIR_OPT
@click.option("--interval", default=1.0, type=click.FloatRange(min=0.1, max=60), show_default=True,
              help="Seconds between refreshes.")
def watch(state_dir: str, interval: float) -> None:
    """A full-screen live view of a running daemon, read from STATE_DIR/status.json: queues
    with progress and estimates, GPUs with memory (yours / others' / free), backoffs, recent
    failures and why idle queues wait. `q` or Ctrl-C quits. When no daemon runs it says so
    and keeps watching."""
    from . import watch as watch_mod

    sys.exit(watch_mod.run(_state_dir(state_dir), interval))


# --- completion ------------------------------------------------------------------------------

@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script. Add to your shell's start-up file:

    \b
    bash: eval "$(gpu-compete completion bash)"      (~/.bashrc)
    zsh:  eval "$(gpu-compete completion zsh)"       (~/.zshrc)
    fish: gpu-compete completion fish | source        (~/.config/fish/config.fish)

    uni_ids are completed from the registry and the logs of --state-dir (or
    $GPU_COMPETE_STATE_DIR, else ./script_process).
    """
    from click.shell_completion import get_completion_class

    cls: Any = get_completion_class(shell)
    click.echo(cls(main, {}, "gpu-compete", "_GPU_COMPETE_COMPLETE").source())
