"""`uni_id.json`: the registry that launched scripts and people share.

Format (the seed's, kept): `{uni_id: {"pid": int, "state": "running"|"normal_exit"|
"abnormal_exit", "retry_count": int, "error_type": str}}` plus optional extra fields.

Writers take an exclusive lock on a sidecar `uni_id.json.lock` (never deleted, so two writers
can never hold locks on two different inodes), write a temp file in the same directory, fsync
it and `os.replace` it over the registry. Readers take no lock: a rename is atomic, so they see
the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from . import atomic
from .tasks import is_safe_id

STATES = ("running", "normal_exit", "abnormal_exit")
DEFAULT_PATH = Path("script_process") / "uni_id.json"
ENV_VAR = "GPU_COMPETE_REGISTRY"


class RegistryError(Exception):
    """The registry cannot be written (permissions, full disk, a directory in the way)."""


class RegistryWarning(UserWarning):
    pass


def private_dirs(path: Path) -> None:
    """Create `path` (and parents) readable by the user only: logs and records echo commands,
    which may carry tokens. An existing directory keeps the mode it has."""
    for directory in [*reversed(path.parents), path]:
        if not directory.exists():
            directory.mkdir(mode=0o700, exist_ok=True)


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


class Registry:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.lock_path = Path(str(self.path) + ".lock")
        self._lock = FileLock(str(self.lock_path), mode=0o600)

    # --- reading -------------------------------------------------------------------------

    def read_raw(self) -> dict[str, Any]:
        """The file's object as stored; `{}` for a missing file. A corrupt file (empty, not
        JSON, not an object) is copied aside as `uni_id.json.corrupt-<timestamp>` with a
        warning and read as `{}`."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except IsADirectoryError:
            raise RegistryError(f"{self.path} is a directory, not a registry file") from None
        except OSError as exc:
            raise RegistryError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            obj = json.loads(data.decode("utf-8-sig"))  # a BOM from a Windows editor is fine
            if isinstance(obj, dict):
                return obj
            problem = f"holds a JSON {type(obj).__name__}, not an object"
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            # RecursionError: garbage nested deeper than the parser can follow ("[[[[...").
            problem = "is empty" if not data.strip() else f"is not valid JSON ({exc})"
        self._set_aside(data, problem)
        return {}

    def read(self) -> dict[str, dict[str, Any]]:
        """Every understandable record, normalized; records that cannot be understood are
        skipped with a warning (and left in the file untouched)."""
        out = {}
        for uni_id, value in self.read_raw().items():
            record = normalize(value)
            if record is None:
                warnings.warn(f"{self.path}: record {uni_id!r} is not a pid or an object; ignored",
                              RegistryWarning, stacklevel=2)
                continue
            out[uni_id] = record
        return out

    def get(self, uni_id: str) -> dict[str, Any] | None:
        return normalize(self.read_raw().get(uni_id))

    def _set_aside(self, data: bytes, problem: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{time.time_ns() % 1_000_000_000:09d}"
        aside = Path(f"{self.path}.corrupt-{stamp}")
        try:
            with open(aside, "xb") as fh:
                fh.write(data)
            os.chmod(aside, 0o600)
            where = f"copied to {aside}"
        except OSError as exc:
            where = f"could not copy it aside ({exc})"
        warnings.warn(f"{self.path} {problem}; {where}; reading it as empty", RegistryWarning, stacklevel=3)

    # --- writing -------------------------------------------------------------------------

    def update(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Lock, read, let `change` edit the raw dict in place, write atomically. Returns it."""
        try:
            private_dirs(self.path.parent)
            with self._lock:
                data = self.read_raw()
                change(data)
                self._write(data)
        except OSError as exc:
            raise RegistryError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        return data

    def _write(self, data: dict[str, Any]) -> None:
        atomic.write(self.path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    def set(self, uni_id: str, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into one record (None deletes a field); other records untouched."""
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

        self.update(change)
        return result

    def remove(self, *uni_ids: str) -> None:
        def change(data: dict[str, Any]) -> None:
            for uni_id in uni_ids:
                data.pop(uni_id, None)

        self.update(change)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime())
