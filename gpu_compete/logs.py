"""structlog set-up: logs go to stderr (data such as status goes to stdout).

With `--log-format json` every line gpu-compete writes on stderr is one JSON object: its own
logs, Python warnings (a registry set aside, a GPU lost), messages of the standard `logging`
module (the NVML probe's), and the one-line errors the command line exits with.
"""

from __future__ import annotations

import logging
import sys
import warnings

import structlog

_state = {"json": False}


def json_mode() -> bool:
    return _state["json"]


def configure(fmt: str = "auto", level: int = logging.INFO) -> None:
    """`console` is readable (colour on a terminal), `json` one object a line; `auto` picks
    console. Both carry a timestamp and the level."""
    json_lines = fmt == "json"
    _state["json"] = json_lines
    processors: list = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso" if json_lines else "%H:%M:%S", utc=False),
    ]
    if json_lines:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # The standard library's loggers (the NVML probe's) go through the same renderer.
    root = logging.getLogger()
    root.handlers[:] = [_ToStructlog()]
    root.setLevel(level)
    if json_lines:
        warnings.showwarning = _warning_as_json


class _ToStructlog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            structlog.get_logger(record.name).log(record.levelno, record.getMessage())
        except Exception:  # noqa: BLE001 - a log line must never take the daemon down
            self.handleError(record)


def _warning_as_json(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    structlog.get_logger("gpu_compete").warning(str(message), category=category.__name__)


def error_line(message: str) -> None:
    """The one-line error a command exits with, in the chosen format."""
    _line("error", message, "gpu-compete: ")


def warning_line(message: str) -> None:
    _line("warning", message, "gpu-compete: warning: ")


def _line(level: str, message: str, prefix: str) -> None:
    if json_mode():
        getattr(structlog.get_logger("gpu_compete"), level)(message)
    else:
        sys.stderr.write(f"{prefix}{message}\n")
        sys.stderr.flush()
