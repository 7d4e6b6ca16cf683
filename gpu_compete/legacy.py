"""Resuming a state directory written by a version whose uni_ids carried the queue position
(`q1-2-3fa9c1d2`); ids are now the queue, the commands and an occurrence number (`q1-3fa9c1d2`).

At start-up each task whose new id has no trace, but whose old id (same queue, position and
commands, as that version computed it) has one, is carried over: its history lines are copied
under the new id (marked `migrated_from`), so a completed task is not run again and one that
failed for good stays failed; its registry record is renamed. A task still running under its
old id keeps that id for this daemon's life (`aliases`): its supervisor records its end under
the old id, and renaming it under its feet would lose that end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import structlog

from . import journal
from .records import Records
from .tasks import TaskSpec

log = structlog.get_logger("gpu_compete")


def migrate(specs: list[TaskSpec], history: Path, records: Records,
            alive: Callable[[str, dict[str, Any]], bool], *, write: bool = True) -> dict[str, str]:
    """Carry old-id history and records over to the new ids; return {new id: old id} for the
    tasks that still run under their old id. With `write=False` (a dry run) nothing is
    written and the old ids are returned for every task that has a trace under one."""
    lines: dict[str, list[dict[str, Any]]] = {}
    for entry in journal.entries(history):
        uid = entry.get("uni_id")
        if isinstance(uid, str):
            lines.setdefault(uid, []).append(entry)
    found_records = records.read_or_empty()
    wanted = {s.legacy_uni_id: s.uni_id for s in specs
              if s.uni_id not in lines and s.uni_id not in found_records}
    found = {old: new for old, new in wanted.items() if old in lines or old in found_records}
    if not found:
        return {}
    if not write:
        return {new: old for old, new in found.items()}
    aliases, renamed, copied = {}, {}, 0
    for old, new in found.items():
        record = found_records.get(old)
        if record is not None and record.get("state") == "running" and alive(old, record):
            aliases[new] = old
            continue
        for entry in lines.get(old, ()):
            journal.append(history, {**entry, "uni_id": new, "migrated_from": old})
            copied += 1
        if record is not None:
            renamed[old] = new
    if renamed:  # (a disk that refuses it: the agent writes it with a later round)
        records.renamed(renamed)
    log.info("carried tasks over from position-based uni_ids", tasks=len(found) - len(aliases),
             history_lines=copied, records=len(renamed), still_running_under_old_id=sorted(aliases.values()))
    return aliases
