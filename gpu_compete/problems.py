"""Failing writes, said once: when they start failing (or fail differently) and when they
work again, not every round (a full disk at --poll 0.2 would otherwise log five a second)."""

from __future__ import annotations

import structlog

log = structlog.get_logger("gpu_compete")


class Problems:
    def __init__(self) -> None:
        self._now: dict[str, str] = {}  # what is failing now -> how

    def report(self, what: str, message: str | None = None, error: object = None) -> None:
        """`message` given: `what` fails now (logged if it did not, or failed differently);
        none: `what` worked (logged if it had been failing)."""
        before = self._now.get(what)
        if message is None:
            if before is not None:
                del self._now[what]
                log.info(f"{what} writable again")
            return
        problem = f"{message}: {error}"
        if problem != before:
            self._now[what] = problem
            log.error(message, error=str(error), retry="each round")
