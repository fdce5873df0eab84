"""The first page after logging in: what happened lately and what waits."""

from __future__ import annotations

import time
from collections import Counter

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from relaygate.http.context import HttpContext
from relaygate.http.ui.auth import Viewer, ui_page
from relaygate.http.ui.messages import SCAN
from relaygate.http.ui.render import page

DAY = 86400.0


async def _dashboard(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    now = time.time()
    records = [r for r in await ctx.admin.messages.recent(SCAN) if who.may_see(r.account)]
    today = [r for r in records if now - r.created_at <= DAY]
    statuses = Counter(r.status for r in today)
    queue = await ctx.admin.queue.entries() if who.admin else []
    oldest = min((e.created_at for e in queue), default=None)
    return page(
        "dashboard.html",
        viewer=who,
        statuses=sorted(statuses.items()),
        accepted_today=len(today),
        recent=records[:10],
        queue_rows=len(queue),
        queue_messages=len({e.id for e in queue}),
        oldest=oldest,
        now=now,
    )


def routes() -> list[BaseRoute]:
    return [ui_page("/", _dashboard)]
