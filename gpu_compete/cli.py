"""The `gpu-compete` command line: thin commands that build objects and print.

`gpu-compete --commands FILE` is `gpu-compete run --commands FILE`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from . import __version__

EXIT_USAGE = 2


class Seconds(click.ParamType):
    """A finite number of seconds, 0 or more; fractions allowed."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(number) or number < 0:
            self.fail(f"{value!r} must be a finite number of seconds, 0 or more", param, ctx)
        if number > MAX_SECONDS:
            self.fail(f"{value!r} is more than a year ({MAX_SECONDS:.0f} s)", param, ctx)
        return number


SECONDS = Seconds()


class Duration(click.ParamType):
    """A duration as the command file writes it: 90s, 30m, 4h, 1h30m."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        from .options import parse_duration

        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()
MAX_SECONDS = 366 * 24 * 3600.0  # past this a clock or select() overflows; no one means it


class DefaultGroup(click.Group):
    """Runs `run` when the first argument is not a subcommand (`gpu-compete --commands f`), or
    when there are no arguments and GPU_COMPETE_COMMANDS names the command file."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        elif not args and os.environ.get("GPU_COMPETE_COMMANDS"):
            args = ["run"]
        return super().parse_args(ctx, args)


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    from .logs import error_line

    error_line(message)
    sys.exit(code)


def _warnings_to_stderr() -> None:
    from .logs import json_mode, warning_line

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        warning_line(str(message))

    if not json_mode():
        warnings.showwarning = show


def _load_commands(path: str):
    from .commandfile import CommandFileError, load

    try:
        parsed = load(path)
    except CommandFileError as exc:
        _fail(str(exc))
    from .logs import json_mode, warning_line

    for warning in parsed.warnings:
        if json_mode():
            warning_line(f"{parsed.path}:{warning.line}: {warning.message}")
        else:
            click.echo(f"{parsed.path}:{warning.line}: warning: {warning.message}", err=True)
    return parsed


def _open_probe(simulate: str | None, gpus: str, namespace: str | None = None):
    from .gpus import NoDriverError, ScopeError, open_probe
    from .gpus.simulated import SimulationSpecError

    try:
        return open_probe(simulate=simulate, gpus=gpus, namespace=namespace)
    except (NoDriverError, ScopeError, SimulationSpecError) as exc:
        _fail(str(exc))


def _state_dir(path: str) -> Path:
    state = Path(path)
    if state.exists() and not state.is_dir():
        _fail(f"--state-dir {path} is a file, not a directory")
    return state


def _registry_path(registry: str | None, state_dir: Path | None = None) -> Path:
    from .registry import default_path

    if registry:
        return Path(registry)
    return state_dir / "uni_id.json" if state_dir is not None else default_path()


def _uni_id(value: str) -> str:
    from .registry import check_uni_id

    try:
        return check_uni_id(value)
    except ValueError as exc:
        _fail(str(exc))
    return value


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpu-compete")
def main() -> None:
    """Queue experiments onto shared GPUs: tasks of one queue run in order, queues run in
    parallel, each task on a GPU with enough free VRAM.

    \b
    gpu-compete --commands command.txt          run the queues (same as `run`)
    gpu-compete check --commands command.txt    parse and show, run nothing
    gpu-compete status                          what a running daemon is doing
    gpu-compete gpus --simulate 4x24            what the scheduler sees
    gpu-compete watch                           a live full-screen view
    gpu-compete logs UNI_ID -f                  follow a task's log
    gpu-compete report --svg run.svg            what happened, and a timeline
    gpu-compete add -q 1 -v 20 -- CMD...        append a task while the daemon runs
    """
    _warnings_to_stderr()


# --- check -----------------------------------------------------------------------------------

@main.command()
@click.option("--commands", "commands_file", required=True, type=click.Path(dir_okay=False),
              help="The command file to check.")
@click.option("--work-dir", default=".", show_default=True, help="Value of {work_dir} in the expansion.")
@click.option("--json", "as_json", is_flag=True, help="Print the queues as JSON on stdout.")
def check(commands_file: str, work_dir: str, as_json: bool) -> None:
    """Parse a command file and show its queues, uni_ids and expanded commands; run nothing.

    Bad input is reported as FILE:LINE: message, with exit status 2.
    """
    from .tasks import GPU_MARKER, group_queues

    parsed = _load_commands(commands_file)
    work = str(Path(work_dir).resolve())
    queues = group_queues(parsed.tasks)
    if as_json:
        data = {"file": parsed.path, "queues": [
            {"queue": q, "tasks": [{"uni_id": t.uni_id, "position": t.position, "vram_gb": t.vram_gb, "line": t.line,
                                    "options": t.options(), "commands": list(t.commands),
                                    "expanded": t.expanded(work)} for t in tasks]}
            for q, tasks in queues.items()]}
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{parsed.path}: {len(parsed.tasks)} tasks in {len(queues)} queues "
               f"({GPU_MARKER} stands for the GPU chosen at launch)")
    for q, tasks in queues.items():
        click.echo(f"\nqueue {q} ({len(tasks)} task{'s' if len(tasks) != 1 else ''}, in order)")
        for t in tasks:
            click.echo(f"  {t.position}. {t.uni_id}  vram {t.vram_gb:g} GB{_options_text(t)}  (line {t.line})")
            for command in t.expanded(work):
                click.echo(f"       $ {command}")


def _options_text(spec) -> str:
    from .options import format_duration

    parts = []
    if spec.timeout_s is not None:
        parts.append(f"timeout {format_duration(spec.timeout_s)}")
    if spec.priority:
        parts.append(f"priority {spec.priority}")
    if spec.retries is not None:
        parts.append(f"retries {spec.retries}")
    if spec.after:
        parts.append(f"after queue {'+'.join(spec.after)}")
    each = f" on each of {spec.gpus} GPUs" if spec.gpus != 1 else ""
    return each + "".join(f", {p}" for p in parts)


# --- exec and registry -----------------------------------------------------------------------

@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--uni-id", "uni_id", required=True, help="The task's id in the registry.")
@click.option("--registry", type=click.Path(dir_okay=False),
              help="Registry file [default: $GPU_COMPETE_REGISTRY, else ./script_process/uni_id.json].")
@click.option("--log", "log_file", type=click.Path(dir_okay=False), help="Also append CMD's output here.")
@click.option("--timeout", "timeout", type=DURATION,
              help="Time limit (90s, 30m, 4h, 1h30m): SIGTERM to CMD's group, SIGKILL 10 s later; error_type timeout.")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec(uni_id: str, registry: str | None, log_file: str | None, timeout: float | None,  # noqa: A001
         cmd: tuple[str, ...]) -> None:
    """Run CMD and record it in the registry: running, then normal_exit or abnormal_exit
    with an error_type (oom, not_found, syntax_error, import_error, nccl_error, runtime_error,
    killed, host_oom, timeout, unknown) read from its exit status and output.

    SIGINT, SIGTERM and SIGHUP are forwarded to CMD. Exits with CMD's status (128+N when
    signal N ended it). Use `--` before CMD: gpu-compete exec --uni-id exp1 -- python train.py
    """
    from .registry import Registry
    from .supervisor import run

    uid = _uni_id(uni_id)
    result = run(list(cmd), uid, Registry(_registry_path(registry)), log_file, timeout_s=timeout)
    sys.exit(result.returncode)


@main.group()
def registry() -> None:
    """Read and write registry records (for scripts that manage their own processes)."""


_REGISTRY_OPT = click.option("--registry", "registry_file", type=click.Path(dir_okay=False),
                             help="Registry file [default: $GPU_COMPETE_REGISTRY, else ./script_process/uni_id.json].")


@registry.command("set")
@click.argument("uni_id")
@click.option("--state", required=True, type=click.Choice(["running", "normal_exit", "abnormal_exit"]))
@click.option("--pid", type=click.IntRange(min=1), help="Process id to record (default: keep the recorded one).")
@click.option("--error-type", help="Why it failed (with abnormal_exit), e.g. oom.")
@_REGISTRY_OPT
def registry_set(uni_id: str, state: str, pid: int | None, error_type: str | None, registry_file: str | None) -> None:
    """Set a record's state (and pid, error type); its retry_count is kept."""
    from . import procs
    from .registry import Registry, RegistryError

    fields: dict[str, Any] = {"state": state}
    if pid is not None:
        fields.update(pid=pid, create_time=procs.create_time(pid))
    if state == "abnormal_exit":
        fields["error_type"] = error_type or "unknown"
    else:
        fields["error_type"] = None
    try:
        record = Registry(_registry_path(registry_file)).set(_uni_id(uni_id), **fields)
    except RegistryError as exc:
        _fail(str(exc), 1)
    click.echo(json.dumps({uni_id: record}, indent=2, sort_keys=True))


@registry.command("get")
@click.argument("uni_id")
@_REGISTRY_OPT
def registry_get(uni_id: str, registry_file: str | None) -> None:
    """Print one record as JSON (exit 1 if there is none)."""
    from .registry import Registry

    record = Registry(_registry_path(registry_file)).get(_uni_id(uni_id))
    if record is None:
        _fail(f"no record for {uni_id}", 1)
    click.echo(json.dumps(record, indent=2, sort_keys=True))


@registry.command("rm")
@click.argument("uni_id")
@_REGISTRY_OPT
def registry_rm(uni_id: str, registry_file: str | None) -> None:
    """Remove one record."""
    from .registry import Registry, RegistryError

    try:
        Registry(_registry_path(registry_file)).remove(_uni_id(uni_id))
    except RegistryError as exc:
        _fail(str(exc), 1)


# --- status, gpus, stop ----------------------------------------------------------------------

@main.command()
@click.option("--state-dir", default="script_process", show_default=True, envvar="GPU_COMPETE_STATE_DIR",
              help="The daemon's state directory (holds status.json).")
@click.option("--registry", "registry_file", type=click.Path(dir_okay=False),
              help="Registry file [default: STATE_DIR/uni_id.json, or $GPU_COMPETE_REGISTRY].")
@click.option("--all-records", is_flag=True, help="Also list registry records that are not this daemon's tasks.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON on stdout.")
def status(state_dir: str, registry_file: str | None, all_records: bool, as_json: bool) -> None:
    """Show a daemon's queues and GPUs (from STATE_DIR/status.json) and its tasks' registry
    records, with whether each pid is alive."""
    from . import status as status_mod
    from .pidfile import running_daemon
    from .registry import ENV_VAR, Registry, RegistryError

    state = _state_dir(state_dir)
    if registry_file is None and os.environ.get(ENV_VAR) and not (state / "uni_id.json").exists():
        registry_file = os.environ[ENV_VAR]
    path = _registry_path(registry_file, state)
    try:
        records = Registry(path).read()
    except RegistryError as exc:
        _fail(str(exc), 1)
    view: dict[str, Any] = {}
    try:
        view = json.loads((state / "status.json").read_text())
    except (OSError, ValueError):
        pass
    daemon = running_daemon(state)
    view["daemon_running"] = daemon is not None
    ours = view.get("task_ids")
    if view.get("cluster") is not None and registry_file is None and not records:
        # A --ray run: each node keeps its registry; its records as their nodes last said
        # (whether a pid is alive only its node can tell).
        records = {r["uni_id"]: r for r in view.get("registry") or [] if isinstance(r, dict) and "uni_id" in r}
        view["other_records"] = 0
    elif ours is not None and not all_records:
        ours = set(ours)
        view["other_records"] = sum(1 for u in records if u not in ours)
        view["registry"] = status_mod.records_view({u: r for u, r in records.items() if u in ours})
    else:
        view["other_records"] = 0
        view["registry"] = status_mod.records_view(records)
    view.pop("task_ids", None)
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    if "totals" not in view and not records and not daemon:
        click.echo(f"nothing has run on {state} yet: no status.json and no registry records there "
                   f"(start with `gpu-compete --commands FILE`, or pass --state-dir)")
        return
    if "totals" in view and not daemon:
        click.echo(f"(no daemon is running on {state}; last status below)")
    click.echo(status_mod.render(view))


@main.command()
@click.option("--gpus", "gpu_scope", default="all", show_default=True, envvar="GPU_COMPETE_GPUS",
              help="all, or a comma list of NVML indices, GPU UUIDs and MIG UUIDs (a MIG GPU's index "
                   "or UUID means all its MIG devices).")
@click.option("--simulate", metavar="SPEC", envvar="GPU_COMPETE_SIMULATE",
              help="Simulated GPUs instead of NVML: NxGB (4x24), NxGB,delay=S, or a JSON file.")
@click.option("--state-dir", default="script_process", show_default=True, envvar="GPU_COMPETE_STATE_DIR",
              help="With --simulate: show the simulation as the daemon on this state directory sees it.")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as JSON on stdout.")
def gpus(gpu_scope: str, simulate: str | None, state_dir: str, as_json: bool) -> None:
    """Show each GPU (each MIG device, on a GPU in MIG mode) as the scheduler sees it: memory,
    utilization, processes and owners, and whether it is free for you in exclusive mode."""
    from .gpus import current_user
    from .policy import build_views, fits
    from .status import gb, table

    probe = _open_probe(simulate, gpu_scope, namespace=str(Path(state_dir).resolve()))
    try:
        snaps = probe.snapshot()
    finally:
        probe.close()
    user = current_user()
    # One view per snapshot, in order: MIG devices of one GPU share its index, so pair, don't key.
    free_for_me = [fits(v, 0, True) for v in build_views(snaps, [], user)]
    if as_json:
        click.echo(json.dumps({"user": user, "gpus": [dict(s.to_dict(), free_for_me_exclusive=free)
                                                      for s, free in zip(snaps, free_for_me)]}, indent=2))
        return
    rows = []
    for s, free in zip(snaps, free_for_me):
        util = "?" if s.utilization is None else f"{s.utilization}%"
        if not s.processes_known:
            ps = f"(unreadable: {(s.error or '').removeprefix('process list unavailable: ') or 'no reason given'})"
        else:
            ps = " ".join(f"{p.pid}:{p.user}:{gb(p.used_bytes)}GB" for p in s.processes) or None
        name = s.name if s.cuda_visible == str(s.index) else f"{s.name} [{s.cuda_visible}]"
        rows.append([s.key, name if s.available else f"UNAVAILABLE ({s.error})",
                     f"{gb(s.free_bytes)}/{gb(s.total_bytes)}", util, ps, "yes" if free else "no"])
    click.echo("\n".join(table(["GPU", "NAME", "FREE/TOTAL GB", "UTIL", "PROCESSES (pid:user:GB)",
                                 f"FREE FOR {user} (exclusive)"], rows)))


@main.command()
@click.option("--state-dir", default="script_process", show_default=True, envvar="GPU_COMPETE_STATE_DIR",
              help="The daemon's state directory.")
@click.option("--kill", is_flag=True, help="Also end the running tasks (SIGTERM, then SIGKILL after 10 s).")
def stop(state_dir: str, kill: bool) -> None:
    """Ask the daemon on STATE_DIR to drain (start nothing new, wait for running tasks), or
    with --kill to end its tasks' process groups so that a restart runs them again."""
    from .pidfile import running_daemon

    state = _state_dir(state_dir)
    info = running_daemon(state)
    if info is None:
        _fail(f"no gpu-compete daemon is running on {state}")  # exit 2, as the steering commands
    os.kill(info["pid"], signal.SIGUSR2 if kill else signal.SIGTERM)
    click.echo(f"asked daemon {info['pid']} to {'end its tasks and stop' if kill else 'drain and stop'}")


# --- run ---------------------------------------------------------------------------------------

def _env(name: str) -> str:
    return f"GPU_COMPETE_{name}"


@main.command()
@click.option("--commands", "commands_file", required=True, envvar=_env("COMMANDS"), type=click.Path(dir_okay=False),
              help="The command file.")
@click.option("--work-dir", default=".", envvar=_env("WORK_DIR"), type=click.Path(file_okay=False),
              help="Working directory of tasks, and {work_dir}. [default: current directory]")
@click.option("--gpus", "gpu_scope", default="all", show_default=True, envvar=_env("GPUS"),
              help="all, or a comma list of NVML indices and/or UUIDs.")
@click.option("--exclusive/--shared", default=True, show_default=True, envvar=_env("EXCLUSIVE"),
              help="Exclusive: one task per GPU, and none on a GPU where you already run something.")
@click.option("--state-dir", default="script_process", show_default=True, envvar=_env("STATE_DIR"),
              help="Registry, task logs, history, status.json and the pid file.")
@click.option("--registry", "registry_file", envvar=_env("REGISTRY"), type=click.Path(dir_okay=False),
              help="Registry file. [default: STATE_DIR/uni_id.json]")
@click.option("--poll", default=5.0, type=SECONDS, show_default=True, envvar=_env("POLL"),
              help="Seconds between rounds (a task's exit starts one at once).")
@click.option("--settle", default=30.0, type=SECONDS, show_default=True, envvar=_env("SETTLE"),
              help="Longest a new launch holds its GPU before it shows up in NVML.")
@click.option("--retry-burst", default=3, type=click.IntRange(min=1), show_default=True, envvar=_env("RETRY_BURST"),
              help="Failures in a row before a backoff.")
@click.option("--backoff", default=600.0, type=SECONDS, show_default=True, envvar=_env("BACKOFF"),
              help="Seconds to wait after every --retry-burst failures.")
@click.option("--max-retries", type=click.IntRange(min=0), envvar=_env("MAX_RETRIES"),
              help="Give up on a task after this many retries. [default: never]")
@click.option("--status-every", default=60.0, type=SECONDS, show_default=True, envvar=_env("STATUS_EVERY"),
              help="Print status every S seconds (0 = only on SIGUSR1).")
@click.option("--seed", type=int, envvar=_env("SEED"), help="Seed of the shuffle, for a reproducible order.")
@click.option("--pick", type=click.Choice(["longest", "random"]), default="longest", show_default=True,
              envvar=_env("PICK"), help="Order of idle queue heads: longest queues first, or pure shuffle.")
@click.option("--dry-run", is_flag=True, envvar=_env("DRY_RUN"), help="Show what would run where; launch nothing.")
@click.option("--simulate", metavar="SPEC", envvar=_env("SIMULATE"),
              help="Simulated GPUs: NxGB (4x24), NxGB,delay=S, or a JSON file.")
@click.option("--fresh", is_flag=True, envvar=_env("FRESH"), help="Ignore the history: run completed tasks again.")
@click.option("--timeout", "timeout", type=DURATION, envvar=_env("TIMEOUT"),
              help="Time limit of a task without timeout= on its queue line (90s, 30m, 4h, 1h30m): SIGTERM to "
                   "its process group, SIGKILL 10 s later; it fails as `timeout`. Default: none.")
@click.option("--retry-permanent", is_flag=True, envvar=_env("RETRY_PERMANENT"),
              help="Retry not_found, syntax_error and import_error failures like any other (by default such a "
                   "task fails for good at once).")
@click.option("--oom-growth", default=1.25, type=click.FloatRange(min=1.0, max=100.0), show_default=True,
              envvar=_env("OOM_GROWTH"),
              help="After an oom the next attempt needs max(declared, last peak VRAM x this) GB.")
@click.option("--min-free-ram", type=click.FloatRange(min=0), envvar=_env("MIN_FREE_RAM"), metavar="GB",
              help="Start no task while the host has less available RAM than this.")
@click.option("--min-free-disk", type=click.FloatRange(min=0), envvar=_env("MIN_FREE_DISK"), metavar="GB",
              help="Start no task while the work directory's filesystem has less free space than this.")
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]), default="auto", show_default=True,
              envvar=_env("LOG_FORMAT"), help="Logs go to stderr: readable, or one JSON object a line.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), envvar=_env("METRICS_PORT"),
              help="Serve Prometheus metrics on http://HOST:PORT/metrics while the daemon runs.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, envvar=_env("METRICS_HOST"),
              help="Address the metrics server listens on.")
@click.option("--on-event", metavar="CMD", envvar=_env("ON_EVENT"),
              help="Shell command run (never waited for) on task_start, task_end, task_failed, gave_up, all_done, "
                   "with GPU_COMPETE_EVENT, _UNI_ID, _QUEUE, _GPU, _STATE, _ERROR_TYPE, _EXIT_STATUS set.")
@click.option("--hook-timeout", default=30.0, type=SECONDS, show_default=True, envvar=_env("HOOK_TIMEOUT"),
              help="Kill an --on-event command still running after this many seconds.")
@click.option("--follow", is_flag=True, envvar=_env("FOLLOW"),
              help="Don't exit when every task is done: wait for the command file to grow, like tail -f.")
@click.option("--ray", "ray_address", metavar="ADDRESS", envvar=_env("RAY"),
              help="Run across the Ray cluster at ADDRESS (host:port, or `auto`): one agent per node, GPUs "
                   "named node/index. Needs pip install 'gpu-compete[ray]'.")
@click.option("--node-timeout", default=30.0, type=SECONDS, show_default=True, envvar=_env("NODE_TIMEOUT"),
              help="With --ray: a node not heard from for --poll + 2 s + this + 2 s is given up; its running "
                   "tasks, ended there by then (a node's tasks end once its agent has not heard from the "
                   "coordinator for --poll + 2 s + this), are lost and run again elsewhere.")
def run(commands_file: str, work_dir: str, gpu_scope: str, exclusive: bool, state_dir: str,
        registry_file: str | None, poll: float, settle: float, retry_burst: int, backoff: float,
        max_retries: int | None, status_every: float, seed: int | None, pick: str, dry_run: bool,
        simulate: str | None, fresh: bool, timeout: float | None, retry_permanent: bool, oom_growth: float,
        min_free_ram: float | None, min_free_disk: float | None, log_format: str, metrics_port: int | None,
        metrics_host: str, on_event: str | None, hook_timeout: float, follow: bool, ray_address: str | None,
        node_timeout: float) -> None:
    """Run the command file's queues until every task has completed (or failed for good).

    Exit status: 0 all completed, 1 some failed for good, 2 bad input, 130 stopped first.
    SIGINT/SIGTERM drain (a second one ends the tasks); SIGUSR1 prints status; SIGHUP reloads
    the command file (which is also followed: edits apply within a round).
    Every option can also be set in the environment as GPU_COMPETE_<NAME>, e.g.
    GPU_COMPETE_POLL=0.5 or GPU_COMPETE_STATE_DIR=/scratch/me/state.
    """
    from .commandbook import CommandBook
    from .daemon import Config, Daemon, DaemonError
    from .hostguard import HostGuard
    from .logs import configure
    from .policy import RetryPolicy

    configure(log_format)
    if poll <= 0:
        _fail("--poll must be more than 0 seconds")
    parsed = _load_commands(commands_file)
    work = Path(work_dir).resolve()
    if not work.is_dir():
        _fail(f"--work-dir {work_dir} is not a directory")
    state = _state_dir(state_dir).resolve()
    config = Config(work_dir=work, state_dir=state, registry=_registry_path(registry_file, state).resolve(),
                    exclusive=exclusive, poll=poll, settle=settle,
                    retry=RetryPolicy(retry_burst, backoff, max_retries), status_every=status_every,
                    seed=seed, pick=pick, fresh=fresh, on_event=on_event or None, hook_timeout=hook_timeout,
                    timeout_s=timeout, retry_permanent=retry_permanent, oom_growth=oom_growth,
                    guard=HostGuard(min_free_ram, min_free_disk))
    if ray_address:
        if registry_file is not None:
            _fail("--registry cannot be used with --ray (each node keeps STATE_DIR/nodes/NODE/uni_id.json)")
        from .cluster_run import run_on_cluster

        metrics_at = (metrics_host, metrics_port) if metrics_port is not None else None
        sys.exit(run_on_cluster(ray_address, config, parsed.tasks, simulate=simulate, gpu_scope=gpu_scope,
                                node_timeout=node_timeout, fail=_fail,
                                serve_metrics=lambda: _serve_metrics(*metrics_at, state) if metrics_at else None,
                                dry_run=dry_run, book=CommandBook(Path(commands_file).resolve(), parsed),
                                follow=follow))
    probe = _open_probe(simulate, gpu_scope, namespace=str(state))
    try:
        book = CommandBook(Path(commands_file).resolve(), parsed)
        daemon = Daemon(config, parsed.tasks, probe, book=book, follow=follow)
        if dry_run:
            try:
                click.echo(daemon.dry_run())
            except OSError as exc:
                _fail(f"cannot read the state directory: {exc}")
            return
        try:
            daemon.acquire()
        except DaemonError as exc:
            _fail(str(exc))
        server = None
        try:
            if metrics_port is not None:
                server = _serve_metrics(metrics_host, metrics_port, state)
            try:
                daemon.resume()
            except DaemonError as exc:
                _fail(str(exc))
            code = daemon.run()
        finally:
            if server is not None:
                server.stop()
            daemon.release()
    finally:
        probe.close()
    sys.exit(code)


def _serve_metrics(host: str, port: int, state: Path) -> Any:
    """The metrics server's process (metrics.py), serving what `state` holds; exit 2 when the
    port can't be used."""
    from . import metrics

    try:
        server = metrics.Server(metrics.bind(host, port), state)
    except metrics.MetricsError as exc:
        _fail(str(exc))
    import structlog

    host, port = server.address
    host = f"[{host}]" if ":" in host else host
    structlog.get_logger("gpu_compete").info("serving metrics", url=f"http://{host}:{port}/metrics")
    return server


from .steer_cli import register as _register_steering  # noqa: E402  (needs `main`)

_register_steering(main)


def entry() -> None:
    """The console script. With `--log-format json` (or GPU_COMPETE_LOG_FORMAT=json) even
    click's own usage errors are one JSON line on stderr."""
    argv = sys.argv[1:]
    wants_json = os.environ.get("GPU_COMPETE_LOG_FORMAT") == "json" or "--log-format=json" in argv or any(
        a == "--log-format" and b == "json" for a, b in zip(argv, argv[1:]))
    if not wants_json:
        main()
        return
    from .logs import configure, error_line

    configure("json")
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        error_line("aborted")
        sys.exit(1)
    except click.ClickException as exc:
        error_line(exc.format_message())
        sys.exit(exc.exit_code)


from . import cli_view  # noqa: E402,F401  (registers report, logs, watch, completion)

if __name__ == "__main__":  # pragma: no cover
    entry()
