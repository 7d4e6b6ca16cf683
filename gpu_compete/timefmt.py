"""Wall-clock times as the registry and history store them (local, to the second)."""

from __future__ import annotations

import time
from typing import Any


def iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(wall))


def parse_iso(text: Any) -> float | None:
    try:
        return time.mktime(time.strptime(str(text)[:19], "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None
