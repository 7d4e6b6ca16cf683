"""A timeline picture of a run as plain SVG: one row per GPU, one bar per attempt.

Written by hand (a few dozen elements; no library needed) so that it opens in any browser
and embeds in a README. Each bar carries a <title> (its uni_id, attempt, times, outcome), which
browsers show on hover.
"""

from __future__ import annotations

import time
from typing import Iterable
from xml.sax.saxutils import escape, quoteattr

from .report import Attempt, duration_text, gpu_order

COLORS = {"completed": "#4caf50", "failed": "#e53935", "oom": "#fb8c00", "stopped": "#9e9e9e"}
LEGEND = (("completed", "completed"), ("failed", "failed"), ("oom", "out of memory"), ("stopped", "stopped"))
ROW_H, BAR_H, LEFT, RIGHT, TOP, FONT_W = 30, 22, 70, 20, 40, 6.6


def outcome(a: Attempt) -> str:
    if a.state == "normal_exit":
        return "completed"
    if a.error_type in ("oom", "stopped"):
        return a.error_type
    return "failed"


def render(atts: Iterable[Attempt], gpus: Iterable[str] = (), width: int = 900, title: str = "") -> str:
    """The SVG document as text. Attempts without a start or an end can't be placed: left out."""
    timed = [a for a in atts if a.start is not None and a.end is not None]
    rows = sorted({*gpus, *(a.gpu or "?" for a in timed)}, key=gpu_order)
    t0 = min((a.start for a in timed), default=0.0)
    t1 = max((a.end for a in timed), default=1.0)
    span = max(t1 - t0, 1e-6)
    plot_w = width - LEFT - RIGHT
    height = TOP + ROW_H * max(len(rows), 1) + 50

    def x(t: float) -> float:
        return LEFT + (t - t0) / span * plot_w

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="11">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{LEFT}" y="18" font-size="13">{escape(title or _title(timed, t0, span))}</text>']
    for i, key in enumerate(rows):
        y = TOP + i * ROW_H
        out.append(f'<rect x="{LEFT}" y="{y}" width="{plot_w}" height="{ROW_H - 2}" fill="#f5f5f5"/>')
        out.append(f'<text x="8" y="{y + ROW_H / 2 + 4:.1f}">GPU {escape(key)}</text>')
    for a in timed:
        row = rows.index(a.gpu or "?")
        x0, x1 = x(a.start), x(a.end)
        w = max(x1 - x0, 1.0)
        y = TOP + row * ROW_H + (ROW_H - 2 - BAR_H) / 2
        kind = outcome(a)
        tip = (f"{a.uni_id} attempt {a.attempt if a.attempt is not None else '?'}: {kind}"
               f"{f' ({a.error_type})' if a.error_type and kind == 'failed' else ''}, "
               f"{duration_text(a.duration)} from {time.strftime('%H:%M:%S', time.localtime(a.start))}"
               + (f", peak {a.peak_vram_gb:g} GB" if a.peak_vram_gb is not None else ""))
        out.append(f'<g class="attempt"><title>{escape(tip)}</title>'
                   f'<rect class="attempt" x="{x0:.1f}" y="{y:.1f}" width="{w:.1f}" height="{BAR_H}" '
                   f'fill="{COLORS[kind]}" stroke="#ffffff" stroke-width="1"/>')
        if len(a.uni_id) * FONT_W + 6 <= w:
            out.append(f'<text x="{x0 + 3:.1f}" y="{y + BAR_H / 2 + 4:.1f}" fill="#ffffff">{escape(a.uni_id)}</text>')
        out.append("</g>")
    axis_y = TOP + ROW_H * max(len(rows), 1) + 4
    for k in range(6):
        t = span * k / 5
        tx = LEFT + plot_w * k / 5
        anchor = "start" if k == 0 else "end" if k == 5 else "middle"
        out.append(f'<line x1="{tx:.1f}" y1="{axis_y - 4}" x2="{tx:.1f}" y2="{axis_y + 2}" stroke="#757575"/>')
        out.append(f'<text x="{tx:.1f}" y="{axis_y + 14}" text-anchor={quoteattr(anchor)}>'
                   f'{escape("+" + duration_text(t))}</text>')
    lx = LEFT
    for kind, label in LEGEND:
        out.append(f'<rect x="{lx}" y="{axis_y + 24}" width="10" height="10" fill="{COLORS[kind]}"/>')
        out.append(f'<text x="{lx + 14}" y="{axis_y + 33}">{escape(label)}</text>')
        lx += 24 + len(label) * FONT_W + 10
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _title(timed: list[Attempt], t0: float, span: float) -> str:
    if not timed:
        return "gpu-compete: no attempts yet"
    return (f"gpu-compete run from {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t0))}: "
            f"{len(timed)} attempts, makespan {duration_text(span)}")
