"""Small bar charts as inline SVG, drawn on the server: no chart library and
no script in the browser (the pages' CSP allows our one script file only).
Colours are SVG attributes, not style attributes, which that CSP would block."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

WIDTH = 336
HEIGHT = 64


def bars(title: str, labels: Sequence[str], values: Sequence[int], colour: str) -> Markup:
    """One bar per value, scaled to the largest; each bar's tooltip says its
    label and count. ``labels`` and ``title`` are escaped here."""
    count = max(len(values), 1)
    step = WIDTH / count
    gap = 1.0 if step >= 4 else 0.0
    top = max(values, default=0) or 1
    rects = []
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        height = 0.0 if value == 0 else max(1.0, (HEIGHT - 2) * value / top)
        rects.append(
            f'<rect x="{i * step:.2f}" y="{HEIGHT - height:.2f}" width="{max(step - gap, 0.5):.2f}"'
            f' height="{height:.2f}" fill="{escape(colour)}">'
            f"<title>{escape(label)}: {value}</title></rect>"
        )
    baseline = f'<line x1="0" y1="{HEIGHT}" x2="{WIDTH}" y2="{HEIGHT}" stroke="#c4ccd4"/>'
    return Markup(  # noqa: S704 - every text inside went through escape(); the rest are numbers
        f'<svg class="bars" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}"'
        f' preserveAspectRatio="none" role="img" aria-label="{escape(title)}">'
        f"{baseline}{''.join(rects)}</svg>"
    )
