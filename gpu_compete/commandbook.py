"""The command file, followed while the daemon runs: noticed when it changes, parsed, and
compared with what the daemon has, as a plain diff.

Change is noticed cheaply, the way `tail -F` follows a file: the size, mtime and inode are
compared every round, and only when one differs is the file read; its content is then
compared by digest, so a `touch` costs one read and nothing else. An mtime within two seconds
of the read that saw it is "racy" (an edit in the same clock tick keeps size and mtime), so
such a file is read again next time whatever its stat says.

A file that does not parse is never applied: the last good one stays in force, the error
(`FILE:LINE: what is wrong`) is kept for status and logged once per distinct bad content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog

from .commandfile import CommandFileError, ParsedFile, parse
from .tasks import TaskSpec

log = structlog.get_logger("gpu_compete")

RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class Diff:
    """What a new command file changes, by uni_id. `specs` is the new file, in file order."""

    specs: tuple[TaskSpec, ...]
    added: tuple[str, ...]  # new uni_ids, in file order
    removed_pending: tuple[str, ...]  # not running: dropped
    removed_running: tuple[str, ...]  # running: run to their end, then dropped
    unchanged: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed_pending or self.removed_running)

    def summary(self) -> str:
        return (f"{len(self.added)} added, {len(self.removed_pending)} dropped, "
                f"{len(self.removed_running)} running out, {len(self.unchanged)} unchanged")


def diff(current: dict[str, bool], specs: list[TaskSpec] | tuple[TaskSpec, ...]) -> Diff:
    """Pure: `current` maps each uni_id the daemon has to whether it is running now."""
    new_ids = [s.uni_id for s in specs]
    wanted = set(new_ids)
    return Diff(specs=tuple(specs),
                added=tuple(u for u in new_ids if u not in current),
                removed_pending=tuple(u for u, running in current.items() if u not in wanted and not running),
                removed_running=tuple(u for u, running in current.items() if u not in wanted and running),
                unchanged=tuple(u for u in new_ids if u in current))


def decode(data: bytes, path: str) -> ParsedFile:
    """Parse the bytes of a command file (as `commandfile.load` does with a path)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CommandFileError(path, line, f"not UTF-8 text (byte 0x{data[exc.start]:02x})") from None
    return parse(text, path)


class CommandBook:
    """The command file in force: its specs, and whether a newer good one is there."""

    def __init__(self, path: str | Path, parsed: ParsedFile, *, wall_ns: Callable[[], int] = time.time_ns):
        self.path = Path(path)
        self.wall_ns = wall_ns
        self.aliases: dict[str, str] = {}  # new uni_id -> the old one it still runs under
        self.specs: list[TaskSpec] = list(parsed.tasks)
        self.error: str | None = None  # what is wrong with the file on disk now
        # Nothing noted yet: the first check reads the file again, so an edit made between the
        # daemon's first parse and its first round is not missed (it costs one parse).
        self._signature: tuple[int, ...] | None = None
        self._digest: str | None = None
        self._racy = True

    def with_aliases(self, specs: list[TaskSpec]) -> list[TaskSpec]:
        return [dataclasses.replace(s, uni_id=self.aliases[s.uni_id]) if s.uni_id in self.aliases else s
                for s in specs]

    def _note(self, st: os.stat_result, data: bytes) -> bool:
        """Remember what was read; True when the content differs from the last read."""
        self._signature = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        self._racy = st.st_mtime_ns + RACY_NS >= self.wall_ns()
        digest = hashlib.sha256(data).hexdigest()
        changed, self._digest = digest != self._digest, digest
        return changed

    def check(self, force: bool = False) -> list[TaskSpec] | None:
        """The new file's specs when it changed and parses; None when it did not change, or
        is bad (then `error` says why, and the last good specs stay in force)."""
        try:
            st = os.stat(self.path)
            signature = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
            if signature == self._signature and not self._racy and not force:
                return None
            data = self.path.read_bytes()
        except OSError as exc:
            self._bad(CommandFileError(self.path, None, f"cannot read: {exc.strerror or exc}"))
            return None
        if not self._note(st, data) and not force:
            return None
        try:
            parsed = decode(data, str(self.path))
        except CommandFileError as exc:
            self._bad(exc)
            return None
        if self.error is not None:
            log.info("command file fixed; applying it", file=str(self.path))
        self.error = None
        self.specs = self.with_aliases(parsed.tasks)
        for warning in parsed.warnings:
            log.warning(f"{self.path}:{warning.line}: {warning.message}")
        return self.specs

    def _bad(self, exc: CommandFileError) -> None:
        if str(exc) != self.error:
            self.error = str(exc)
            log.error(f"{exc}; the last good command file stays in force until this is fixed")
