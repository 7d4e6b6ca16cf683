"""Options of a queue line, `QUEUE_ID,VRAM_GB[,key=value...]`: parsed into validated values.

Keys: `gpus=N`, `timeout=DURATION` (`90s`, `30m`, `4h`, `1h30m`), `priority=N`, `retries=N`,
`after=QUEUE[+QUEUE...]`. Every problem is a `ValueError` whose text says what is wrong; the
command-file parser adds `FILE:LINE`. `after=` is checked against the whole file (unknown
queues, cycles) by `after_problems`, before anything runs.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from .tasks import is_safe_id

KEYS = ("gpus", "timeout", "priority", "retries", "after")
MAX_GPUS = 64
MAX_DURATION_S = 366 * 24 * 3600.0  # as --poll and friends: past a year a clock overflows

_DURATION = re.compile(r"^(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$")
_INT = re.compile(r"^[+-]?\d+$")


def parse_duration(text: str) -> float:
    """`90s`, `30m`, `4h`, `1h30m`, `2d` -> seconds. A bare number is refused: is `90` seconds
    or minutes? Written out, nobody has to guess."""
    text = text.strip()
    match = _DURATION.match(text) if text.isascii() else None
    if not text or match is None or not any(match.groupdict().values()):
        hint = f"; did you mean {text}s or {text}m?" if _INT.match(text) else ""
        raise ValueError(f"bad duration {text!r}: write it like 90s, 30m, 4h or 1h30m{hint}")
    parts = {k: float(v) for k, v in match.groupdict().items() if v}
    seconds = parts.get("d", 0) * 86400 + parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0)
    if seconds <= 0:
        raise ValueError(f"bad duration {text!r}: must be more than 0")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"bad duration {text!r}: more than a year")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as the command file writes them: 5400 -> 1h30m."""
    whole = int(seconds)
    if whole != seconds or whole < 60:
        return f"{seconds:g}s"
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v)


def _int(key: str, text: str, low: int | None = None, high: int | None = None) -> int:
    if not _INT.match(text):
        raise ValueError(f"bad {key}={text!r}: expected an integer")
    value = int(text)
    if low is not None and value < low:
        raise ValueError(f"bad {key}={text}: must be at least {low}")
    if high is not None and value > high:
        raise ValueError(f"bad {key}={text}: must be at most {high}")
    return value


def parse(items: list[str]) -> dict[str, Any]:
    """The `key=value` items after `QUEUE_ID,VRAM_GB` -> TaskSpec fields."""
    fields: dict[str, Any] = {}
    seen: set[str] = set()
    for item in items:
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq:
            raise ValueError(f"bad option {item.strip()!r}: after QUEUE_ID,VRAM_GB come only key=value options "
                             f"({', '.join(KEYS)})")
        if key not in KEYS:
            close = difflib.get_close_matches(key.lower(), KEYS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(KEYS)})"
            raise ValueError(f"unknown option {key!r}{hint}")
        if key in seen:
            raise ValueError(f"option {key} is given twice")
        seen.add(key)
        if not value:
            raise ValueError(f"option {key} has no value")
        if key == "gpus":
            fields["gpus"] = _int(key, value, 1, MAX_GPUS)
        elif key == "timeout":
            fields["timeout_s"] = parse_duration(value)
        elif key == "priority":
            fields["priority"] = _int(key, value, -10**6, 10**6)
        elif key == "retries":
            fields["retries"] = _int(key, value, 0, 10**6)
        else:
            queues = value.split("+")
            for q in queues:
                if not is_safe_id(q):
                    raise ValueError(f"bad after={value!r}: {q!r} is not a queue id (write after=1+2 for several)")
            if len(set(queues)) != len(queues):
                raise ValueError(f"bad after={value!r}: a queue is named twice")
            fields["after"] = tuple(queues)
    return fields


def looks_like_options(items: list[str]) -> bool:
    """True when every item is `known_key=...`: how a queue line with options is told from a
    command line that merely has commas (`a,1,b` stays a command, as it always was)."""
    return bool(items) and all(i.partition("=")[1] and i.partition("=")[0].strip() in KEYS for i in items)


def after_problems(waits: dict[str, set[str]], known: set[str]) -> tuple[str, str, str] | None:
    """The first problem with `after=` over the whole file: (queue, the queue its after=
    names that is the problem, message), or None.

    `waits[q]` is the queues some task of q waits for. A queue waiting for itself, for a queue
    the file lacks, or any cycle (1 waits for 2 waits for 1) can never start: every queue in it
    waits for the others to be done, and none can be.
    """
    for q, deps in waits.items():
        for dep in sorted(deps):
            if dep == q:
                return q, dep, f"after={dep}: a task cannot wait for its own queue to be done"
            if dep not in known:
                return q, dep, f"after={dep}: there is no queue {dep} in this file"
    state: dict[str, int] = {}  # 1 visiting, 2 done
    for start in waits:
        if state.get(start):
            continue
        stack = [(start, iter(sorted(waits.get(start, ()))))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                return cycle[0], cycle[1], "after= makes a cycle, so none of these queues could start: " + " waits for ".join(
                    f"queue {c}" for c in cycle)
            if not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(waits.get(nxt, ())))))
                path.append(nxt)
    return None
