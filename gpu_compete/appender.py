"""`gpu-compete add`: append one task block to the command file, so that concurrent `add`s and
a person editing the file lose no block.

Under an exclusive flock on the command file itself (every `add` takes it; an editor takes
none), the file is read, the block validated together with it, and appended with one
`write` on an O_APPEND descriptor, then fsynced. If the file was replaced meanwhile (an
editor saves by writing a new file and renaming it over the old one) and the new file lacks
the block, it is appended again to the new file. A file that does not parse is not touched:
the error names its line.
"""

from __future__ import annotations

import fcntl
import os
import shlex
from pathlib import Path

from .commandbook import decode
from .commandfile import CommandFileError, parse

ATTEMPTS = 20


class AddError(Exception):
    """Bad input for `add` (exit status 2)."""


def block_text(argv: list[str], queue: str, vram: str, line_options: str | None = None) -> str:
    """The block for CMD: one argument is shell text as it is (it may hold `&&`, pipes,
    several lines); several are quoted so they reach the program exactly."""
    if not argv:
        raise AddError("no command: give it after `--`, e.g. gpu-compete add --queue 1 --vram 20 -- python train.py")
    text = argv[0] if len(argv) == 1 else shlex.join(argv)
    lines = [line.rstrip("\r") for line in text.strip("\n").split("\n")]
    for line in lines:
        if not line.strip():
            raise AddError("the command has a blank line, which would end the task block; remove it")
        if line.lstrip().startswith("#"):
            raise AddError(f"command line {line.strip()!r} starts with '#' and would be read as a comment")
    queue_line = f"{queue},{vram}" + (f",{line_options}" if line_options else "")
    block = "\n".join([*lines, queue_line]) + "\n"
    try:
        parsed = parse(block, "<add>")
    except CommandFileError as exc:
        raise AddError(exc.message) from None
    if len(parsed.tasks) != 1:
        raise AddError("the command would make more than one task block")
    return block


def append(path: str | os.PathLike[str], block: str) -> tuple[str, int]:
    """Append `block` to the command file at `path` (created 0600 if missing); return the new
    task's uni_id and the line of its first command."""
    path = Path(path)
    encoded = block.encode()
    for _ in range(ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not _same_file(fd, path):
                continue  # replaced while we waited for the lock: lock the new one
            data = _read_all(fd)
            # Always a blank line first (an extra one is harmless): someone may append a block
            # without a trailing blank line between this read and our write.
            prefix = b"" if not data else b"\n" if data.endswith(b"\n") else b"\n\n"
            try:  # one parse of the file as it will be: the block alone was checked already,
                new = decode(data + prefix + encoded, str(path))  # so an error is the file's own
            except CommandFileError as exc:
                raise AddError(f"{exc}; fix the command file first, nothing was added") from None
            task = new.tasks[-1]
            os.write(fd, prefix + encoded)
            os.fsync(fd)
            if _same_file(fd, path) or _has_block(path, encoded, data.count(encoded)):
                return task.uni_id, task.line
        finally:
            os.close(fd)  # drops the lock
    raise AddError(f"{path} kept being replaced while adding; nothing certain was added, try again")


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _has_block(path: Path, block: bytes, before: int) -> bool:
    """The file that replaced ours already holds our block (its writer read it after we wrote)."""
    try:
        return path.read_bytes().count(block) > before
    except OSError:
        return False
