"""Commands that change the queue while the daemon runs: `add`, `skip`, `unskip`, `retry`,
`kill`, `pause`, `resume`, `reload`.

Each answers in one line (`--json`: one JSON object on stdout) and exits 0 when done, 1 when
the daemon refused (the line says why), 2 on bad input or when no daemon runs there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .completion import complete_uni_id

OK, REFUSED, USAGE = 0, 1, 2

_STATE = click.option("--state-dir", default="script_process", show_default=True, envvar="GPU_COMPETE_STATE_DIR",
                      help="The daemon's state directory.")
_JSON = click.option("--json", "as_json", is_flag=True, help="Answer as one JSON object on stdout.")


def _say(answer: dict[str, Any], as_json: bool) -> None:
    code = OK if answer.get("ok") else int(answer.get("code") or REFUSED)
    if as_json:
        click.echo(json.dumps({**answer, "exit": code}))
    elif code == OK:
        click.echo(answer.get("message", "done"))
    else:
        click.echo(f"gpu-compete: {answer.get('message', 'refused')}", err=True)
    sys.exit(code)


def _error(message: str, as_json: bool, code: int = USAGE) -> None:
    _say({"ok": False, "code": code, "message": message}, as_json)


def _ask(state_dir: str, payload: dict[str, Any], as_json: bool) -> None:
    from .control import ControlError, request
    from .pidfile import running_daemon

    state = Path(state_dir)
    if state.exists() and not state.is_dir():
        _error(f"--state-dir {state_dir} is a file, not a directory", as_json)
    info = running_daemon(state)
    if info is None:
        _error(f"no gpu-compete daemon is running on {state_dir}", as_json)
    try:
        answer = request(state, payload, info["pid"])
    except ControlError as exc:
        _error(str(exc), as_json)
    _say(answer, as_json)


def _check_id(uni_id: str, as_json: bool) -> str:
    from .registry import check_uni_id

    try:
        return check_uni_id(uni_id)
    except ValueError as exc:
        _error(str(exc), as_json)
    return uni_id


def register(main: click.Group) -> None:
    @main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
    @click.option("--commands", "commands_file", type=click.Path(dir_okay=False), envvar="GPU_COMPETE_COMMANDS",
                  help="The command file [default: the one the daemon on --state-dir follows].")
    @click.option("--queue", "-q", required=True, help="QUEUE_ID of the new task.")
    @click.option("--vram", "-v", required=True, help="VRAM_GB it needs, e.g. 20 or 7.5.")
    @click.option("--line-options", help="Options for the queue line, e.g. 'priority=1' (QUEUE,VRAM,OPTIONS).")
    @_STATE
    @_JSON
    @click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
    def add(commands_file: str | None, queue: str, vram: str, line_options: str | None, state_dir: str,
            as_json: bool, cmd: tuple[str, ...]) -> None:
        """Append a task block to the command file and print its uni_id; a running daemon takes
        it up at its next round. One CMD argument is shell text as it is; several are quoted.

        \b
        gpu-compete add --queue 1 --vram 20 -- python train.py --lr 1e-3 --run {uni_id}
        """
        from .appender import AddError, append, block_text

        if commands_file is None:
            try:
                status = json.loads((Path(state_dir) / "status.json").read_text())
                commands_file = status["steering"]["commands_file"]
            except (OSError, ValueError, KeyError, TypeError):
                commands_file = None
            if not commands_file:
                _error(f"--commands FILE is required (no daemon's status on {state_dir} names one)", as_json)
        try:
            block = block_text(list(cmd), queue, vram, line_options)
            uid, line = append(commands_file, block)
        except AddError as exc:
            _error(str(exc), as_json)
        except OSError as exc:
            _error(f"cannot add to {commands_file}: {exc.strerror or exc}", as_json)
        if as_json:
            click.echo(json.dumps({"ok": True, "uni_id": uid, "file": str(commands_file), "line": line, "exit": OK}))
        else:
            click.echo(uid)

    @main.command()
    @click.argument("uni_id", shell_complete=complete_uni_id)
    @_STATE
    @_JSON
    def skip(uni_id: str, state_dir: str, as_json: bool) -> None:
        """A pending, backing-off or failed task will not run; its queue goes on (recorded in
        the history: it holds after a restart)."""
        _ask(state_dir, {"op": "skip", "uni_id": _check_id(uni_id, as_json)}, as_json)

    @main.command()
    @click.argument("uni_id", shell_complete=complete_uni_id)
    @_STATE
    @_JSON
    def unskip(uni_id: str, state_dir: str, as_json: bool) -> None:
        """Undo `skip`: the task runs in its place in its queue."""
        _ask(state_dir, {"op": "unskip", "uni_id": _check_id(uni_id, as_json)}, as_json)

    @main.command()
    @click.argument("uni_id", shell_complete=complete_uni_id)
    @_STATE
    @_JSON
    def retry(uni_id: str, state_dir: str, as_json: bool) -> None:
        """A task that failed for good or is backing off runs at the next round, with a fresh
        retry budget."""
        _ask(state_dir, {"op": "retry", "uni_id": _check_id(uni_id, as_json)}, as_json)

    @main.command()
    @click.argument("uni_id", shell_complete=complete_uni_id)
    @click.option("--skip", is_flag=True, help="Also skip it: it does not run again.")
    @_STATE
    @_JSON
    def kill(uni_id: str, skip: bool, state_dir: str, as_json: bool) -> None:
        """End one running task (SIGTERM to its group, SIGKILL after 10 s), recorded as stopped;
        it runs again at the next round unless --skip."""
        _ask(state_dir, {"op": "kill", "uni_id": _check_id(uni_id, as_json), "skip": skip}, as_json)

    @main.command()
    @click.argument("queues", nargs=-1)
    @_STATE
    @_JSON
    def pause(queues: tuple[str, ...], state_dir: str, as_json: bool) -> None:
        """Start nothing new in QUEUES (no QUEUE: in any queue); running tasks go on."""
        _ask(state_dir, {"op": "pause", "queues": list(queues)}, as_json)

    @main.command()
    @click.argument("queues", nargs=-1)
    @_STATE
    @_JSON
    def resume(queues: tuple[str, ...], state_dir: str, as_json: bool) -> None:
        """Undo `pause` for QUEUES (no QUEUE: for everything)."""
        _ask(state_dir, {"op": "resume", "queues": list(queues)}, as_json)

    @main.command()
    @_STATE
    @_JSON
    def reload(state_dir: str, as_json: bool) -> None:
        """Read the command file again now (the daemon also notices changes each round, and on
        SIGHUP). A file with errors is not applied; the error names its line."""
        _ask(state_dir, {"op": "reload"}, as_json)
