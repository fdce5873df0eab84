"""Templates (Jinja2 with autoescape on everywhere: every value a message or a
user supplied is text, never markup) and the page response."""

from __future__ import annotations

import time
from typing import Any

import jinja2
from starlette.responses import HTMLResponse, Response

from relaygate.http.ui.security import harden

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("relaygate.http.ui", "templates"),
    autoescape=True,  # .html or not: our templates are all HTML
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


_env.filters["when"] = _when
_env.filters["size"] = _size


def page(template: str, status: int = 200, /, **values: Any) -> Response:
    body = _env.get_template(template).render(**values)
    return harden(HTMLResponse(body, status_code=status))
