"""Shell completion of uni_ids, for any command that takes one (`logs`; `skip`, `retry`,
`kill` and `registry` can use it too): `click.argument("uni_id", shell_complete=complete_uni_id)`.

Kept apart from the commands so that cli.py can import it without a cycle; it imports
nothing heavy, since it runs at every Tab.
"""

from __future__ import annotations

import os
from pathlib import Path

import click


def known_uni_ids(state_dir: str | os.PathLike[str]) -> list[str]:
    """uni_ids a user may mean: the registry's records and the tasks that have a log."""
    from .registry import Registry, RegistryError

    state = Path(state_dir)
    ids: set[str] = set()
    try:
        ids |= set(Registry(state / "uni_id.json").read())
    except (RegistryError, OSError):
        pass
    try:
        ids |= {p.name[:-4] for p in (state / "logs").iterdir() if p.name.endswith(".log")}
    except OSError:
        pass
    return sorted(ids)


def complete_uni_id(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of a uni_id argument, from the state directory named on the line so far."""
    state = ctx.params.get("state_dir") or os.environ.get("GPU_COMPETE_STATE_DIR") or "script_process"
    return [u for u in known_uni_ids(state) if u.startswith(incomplete)]
