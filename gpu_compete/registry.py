"""`uni_id.json`: the registry that launched scripts and people share.

Format (the seed's, kept): `{uni_id: {"pid": int, "state": "running"|"normal_exit"|
"abnormal_exit", "retry_count": int, "error_type": str}}` plus optional extra fields.

Writers take an exclusive lock on a sidecar `uni_id.json.lock` (never deleted, so two writers
can never hold locks on two different inodes), write a temp file in the same directory, fsync
it and `os.replace` it over the registry. Readers take no lock: a rename is atomic, so they see
the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from . import atomic
from .tasks import is_safe_id
from .timefmt import iso

STATES = ("running", "normal_exit", "abnormal_exit")
_ENCODE = json.JSONEncoder(sort_keys=True, ensure_ascii=False).encode
_SCALARS = (str, int, float, bool, type(None))
DEFAULT_PATH = Path("script_process") / "uni_id.json"
ENV_VAR = "GPU_COMPETE_REGISTRY"


class RegistryError(Exception):
    """The registry cannot be written (permissions, full disk, a directory in the way)."""


class RegistryWarning(UserWarning):
    pass


def private_dirs(path: Path) -> None:
    """Create `path` (and parents) readable by the user only: logs and records echo commands,
    which may carry tokens. An existing directory keeps the mode it has."""
    if path.is_dir():  # the common case, on every registry write: one stat
        return
    for directory in [*reversed(path.parents), path]:
        if not directory.exists():
            directory.mkdir(mode=0o700, exist_ok=True)
        elif not directory.is_dir():
            raise NotADirectoryError(f"Not a directory: {directory} is a file")


def default_path() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)


def check_uni_id(uni_id: str) -> str:
    if not isinstance(uni_id, str) or not is_safe_id(uni_id):
        raise ValueError(f"bad uni_id {uni_id!r}: use only letters, digits, '_', '.' and '-'")
    return uni_id


def normalize(value: Any) -> dict[str, Any] | None:
    """One record as the daemon sees it, or None when it cannot be understood.

    A bare int is a legacy record (`"exp001": 12345`, as old wrappers wrote): a running pid.
    Fields of the wrong type are dropped or clamped rather than trusted.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return {"pid": value, "state": "running", "retry_count": 0, "legacy": True}
    if not isinstance(value, dict):
        return None
    record = dict(value)
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        record["pid"] = None
    if record.get("state") not in STATES:
        record["state"] = "running" if record.get("pid") else "abnormal_exit"
        if record["state"] == "abnormal_exit":  # error_type belongs to abnormal records only
            record.setdefault("error_type", "unknown")
    retries = record.get("retry_count")
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        record["retry_count"] = 0
    return record


class _SidecarLock:
    """An exclusive flock on a sidecar file that is never deleted.

    The kernel queues the waiters of a blocking flock and wakes one when the holder lets go;
    filelock (which we used first) polls instead, and with 50 contending writers some waited
    24 s while others came and went (bench/registry.py). Its import also cost 28 ms of every
    task's start-up. The lock is released by the kernel if its holder dies.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> "_SidecarLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


class _Changed(Exception):
    """Another writer (one that takes no lock) changed the file while we were writing."""


class Registry:
    """One registry file. An object remembers the last whole content it read, so that a file
    caught empty or half written by a writer that takes no lock (the old wrapper scripts:
    `open(F, 'w')` truncates, then writes) is never taken for the truth."""

    #: How long a bad file is read again before it is taken as bad: a legacy write ends in
    #: milliseconds.
    SETTLE_S = 0.25
    #: Copies of distinct bad contents kept beside the registry, oldest removed first.
    MAX_ASIDE = 5

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.lock_path = Path(str(self.path) + ".lock")
        self._lock = _SidecarLock(self.lock_path)
        self._last: tuple[tuple[int, int, int] | None, dict[str, Any]] | None = None
        self._lines: dict[str, tuple[dict[str, Any], str]] = {}
        self._good: bytes | None = None  # the last whole content read or written
        self._aside: set[str] = set()  # digests of bad contents already copied aside
        self._bad: tuple[int, int, int] | None = None  # identity of the file last found bad

    # --- reading -------------------------------------------------------------------------

    def read_raw(self) -> dict[str, Any]:
        """The file's object as stored (a fresh copy); `{}` for a missing file."""
        return json.loads(json.dumps(self._load()))

    def _identity(self) -> tuple[int, int, int] | None:
        return _fingerprint_path(self.path)

    def _load(self, updating: bool = False) -> dict[str, Any]:
        """The file's object; the one we wrote last, unparsed, while the file is still that one
        (same inode, mtime and size: any other writer's rename or in-place write changes them).
        Callers must not mutate it outside `update`.

        A file that is empty, half written or not a JSON object is read again for up to
        SETTLE_S (a writer without a lock may be in the middle of its write). If it stays bad,
        the last whole content this object read stands in for it (or `{}` if none): an update
        then writes back that content plus its change, never less. Only an update copies the
        bad bytes aside, once per distinct content; a plain read creates no file.
        """
        if self._last is not None and self._identity() == self._last[0]:
            return self._last[1]
        self._last = None
        deadline = time.monotonic() + self.SETTLE_S
        while True:
            ident = self._identity()
            data = self._read_bytes()
            if data is None:
                return {}
            obj, problem = _parse(data)
            if obj is not None:
                self._good = data
                return obj
            if ident == self._bad or time.monotonic() >= deadline:
                break  # (the same bad file as last time: waited for it once already)
            time.sleep(0.005)
        if ident != self._bad or updating:
            self._bad = ident
            where = self._set_aside(data) if updating else "left as it is"
            stand_in = "the last whole content read" if self._good is not None else "empty"
            warnings.warn(f"{self.path} {problem}; {where}; reading it as {stand_in}", RegistryWarning, stacklevel=3)
        return _parse(self._good)[0] if self._good is not None else {}

    def _read_bytes(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise RegistryError(f"{self.path} is a directory, not a registry file") from None
        except OSError as exc:
            raise RegistryError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    def read(self) -> dict[str, dict[str, Any]]:
        """Every understandable record, normalized; records that cannot be understood are
        skipped with a warning (and left in the file untouched)."""
        out = {}
        for uni_id, value in self._load().items():
            record = normalize(value)
            if record is None:
                warnings.warn(f"{self.path}: record {uni_id!r} is not a pid or an object; ignored",
                              RegistryWarning, stacklevel=2)
                continue
            out[uni_id] = record
        return out

    def get(self, uni_id: str) -> dict[str, Any] | None:
        return normalize(self._load().get(uni_id))

    def _set_aside(self, data: bytes, problem: str = "") -> str:
        """Keep the bad bytes for a person to look at: once per distinct content, and no more
        than MAX_ASIDE copies (the oldest go)."""
        digest = hashlib.sha1(data).hexdigest()
        if digest in self._aside:
            return "already copied aside"
        existing = sorted(self.path.parent.glob(self.path.name + ".corrupt-*"))
        for old in existing:
            try:
                if old.stat().st_size == len(data) and old.read_bytes() == data:
                    self._aside.add(digest)
                    return f"already copied to {old}"
            except OSError:
                continue
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{time.time_ns() % 1_000_000_000:09d}"
        aside = Path(f"{self.path}.corrupt-{stamp}")
        try:
            with open(aside, "xb") as fh:
                fh.write(data)
            os.chmod(aside, 0o600)
        except OSError as exc:
            return f"could not copy it aside ({exc})"
        self._aside.add(digest)
        for old in existing[: max(0, len(existing) + 1 - self.MAX_ASIDE)]:
            try:
                old.unlink()
            except OSError:
                pass
        return f"copied to {aside}"

    # --- writing -------------------------------------------------------------------------

    def update(self, change: Callable[[dict[str, Any]], None], vital: bool = True) -> None:
        """Lock, read, let `change` edit the raw dict in place, write atomically. The dict is
        kept as the cache of what is on disk, so it is not handed back.

        `vital=False`: the change only says what runs now, which a power cut makes untrue
        anyway (nothing runs after it); its rename is not waited for on disk (`atomic.write`).

        Writers that take no lock are guarded against on both sides of the rename: if the
        file changed since we read it, we read and apply `change` again; if a writer had
        opened the file we replaced and wrote into it after our rename, what it wrote is read
        back through our open descriptor and merged in, so no record of theirs is lost.
        """
        try:
            private_dirs(self.path.parent)
            with self._lock:
                for _ in range(20):
                    try:
                        self._update_once(change, vital=vital)
                        return
                    except _Changed:
                        self._last = None
                self._update_once(change, check=False, vital=vital)  # a writer that never stops: ours goes last
        except OSError as exc:
            raise RegistryError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def _update_once(self, change: Callable[[dict[str, Any]], None], check: bool = True, vital: bool = True) -> None:
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            fh = None
        with fh if fh is not None else contextlib.nullcontext():
            before = _fingerprint(fh) if fh is not None else None
            data = self._load(updating=True)
            read_bytes = self._good
            self._last = None  # `change` edits it in place: not what is on disk until written
            change(data)

            def unchanged() -> None:
                if check and before is not None and self._identity() != before:
                    raise _Changed()

            self._write(data, unchanged, vital)
            self._last = (self._identity(), data)
            if fh is not None:
                self._rescue(fh, before, read_bytes)

    def _rescue(self, fh: Any, before: tuple[int, int, int], read_bytes: bytes | None) -> None:
        """A writer without a lock that opened the file before our rename writes into the
        inode we replaced. Read what it wrote (through our descriptor) and apply its changes."""
        if _fingerprint(fh) == before:
            return
        deadline = time.monotonic() + self.SETTLE_S
        while True:
            fh.seek(0)
            theirs, _ = _parse(fh.read())
            if theirs is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        if theirs is None:
            return
        base = _parse(read_bytes)[0] if read_bytes is not None else {}
        changed = {k: v for k, v in theirs.items() if base.get(k) != v}
        if changed:
            data = self._last[1] if self._last is not None else {}
            self._last = None
            data.update(changed)
            self._write(data, lambda: None)
            self._last = (self._identity(), data)

    def _write(self, data: dict[str, Any], before_replace: Callable[[], None] | None = None, vital: bool = True) -> None:
        """One record per line, keys sorted: readable by hand and by `grep`, and fast to write.
        A record's line is encoded again only when the record changed, so updating one record
        among a thousand costs little more than the write itself."""
        lines, cache = [], {}
        for uni_id in sorted(data):
            value = data[uni_id]
            hit = self._lines.get(uni_id)
            if hit is not None and type(value) is dict and hit[0] == value:
                line = hit[1]
            else:
                line = f"  {_ENCODE(uni_id)}: {_ENCODE(value)}"
            if type(value) is dict and all(type(v) in _SCALARS for v in value.values()):
                cache[uni_id] = (dict(value), line)  # a shallow copy is a true snapshot of scalars
            lines.append(line)
        text = "{\n" + ",\n".join(lines) + "\n}\n" if lines else "{}\n"
        payload = text.encode()
        atomic.write(self.path, payload, before_replace=before_replace, sync_rename=vital)
        self._lines = cache
        self._good = payload

    def set(self, uni_id: str, vital: bool = True, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into one record (None deletes a field); other records untouched.
        `vital`: as for `update`."""
        check_uni_id(uni_id)
        result: dict[str, Any] = {}

        def change(data: dict[str, Any]) -> None:
            record = normalize(data.get(uni_id)) or {"retry_count": 0}
            record.pop("legacy", None)
            for key, value in fields.items():
                if value is None:
                    record.pop(key, None)
                else:
                    record[key] = value
            record["updated_at"] = _now_iso()
            data[uni_id] = record
            result.update(record)

        self.update(change, vital)
        return result

    def remove(self, *uni_ids: str) -> None:
        def change(data: dict[str, Any]) -> None:
            for uni_id in uni_ids:
                data.pop(uni_id, None)

        self.update(change)


def _parse(data: bytes) -> tuple[dict[str, Any] | None, str]:
    """(the object, "") or (None, what is wrong with it)."""
    try:
        obj = json.loads(data.decode("utf-8-sig"))  # a BOM from a Windows editor is fine
        if isinstance(obj, dict):
            return obj, ""
        return None, f"holds a JSON {type(obj).__name__}, not an object"
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        # RecursionError: garbage nested deeper than the parser can follow ("[[[[...").
        return None, "is empty" if not data.strip() else f"is not valid JSON ({exc})"


def _fingerprint(fh: Any) -> tuple[int, int, int]:
    st = os.fstat(fh.fileno())
    return st.st_ino, st.st_mtime_ns, st.st_size


def _fingerprint_path(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _now_iso() -> str:
    return iso(time.time())  # as every other writer of ours stamps a record (local, to the second)
