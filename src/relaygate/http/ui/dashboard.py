"""The first page after logging in: what happened lately and what waits."""

from __future__ import annotations

import time
from collections import Counter

from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from relaygate.http.context import HttpContext
from relaygate.http.ui.auth import Viewer, ui_page
from relaygate.http.ui.charts import bars
from relaygate.http.ui.render import page
from relaygate.stats import HourStats
from relaygate.storage.message_query import MessageQuery

DAY = 86400.0
DAY_SCAN = 10_000  # messages of the last day counted by status on the page
RANGES = {"24h": 24, "7d": 7 * 24}
# (field of stats.HourStats, title, colour)
SERIES = [
    ("accepted", "Accepted", "#1f6feb"),
    ("delivered", "Delivered", "#1a7f37"),
    ("deferred", "Deferred", "#9a6700"),
    ("bounced", "Bounced", "#b42318"),
    ("refused", "Refused", "#57606a"),
    ("login_failures", "Failed logins", "#8250df"),
]


def _charts(report: list[HourStats]) -> list[tuple[str, int, Markup]]:
    labels = [time.strftime("%Y-%m-%d %H:00 UTC", time.gmtime(h.hour)) for h in report]
    charts = []
    for name, title, colour in SERIES:
        if name == "refused":
            values = [sum(count for _, count in h.refused) for h in report]
        else:
            values = [int(getattr(h, name)) for h in report]
        charts.append((title, sum(values), bars(title, labels, values, colour)))
    return charts


async def _dashboard(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    """Cheap at any size: counts come from the hourly stats and the queue's
    grouped summary for admins; an account's own page counts its own messages."""
    now = time.time()
    span = request.query_params.get("range", "24h")
    span = span if span in RANGES else "24h"
    charts: list[tuple[str, int, Markup]] = []
    reasons: list[tuple[str, int]] = []
    statuses: list[tuple[str, int]] = []
    queued = held = 0
    oldest = None
    if who.admin:  # the stats are the whole server's: for admins only
        report = await ctx.admin.stats.hourly(RANGES[span])
        charts = _charts(report)
        totals = Counter[str]()
        for h in report:
            totals.update(dict(h.refused))
        reasons = totals.most_common()
        accepted_today = sum(h.accepted for h in report[-24:])
        summary = await ctx.admin.queue.summary()
        held = summary.counts.get("held", 0)
        queued = sum(summary.counts.values()) - held
        oldest = summary.oldest
    else:
        today, _ = await ctx.admin.messages.search(
            MessageQuery(account=who.account.address, since=now - DAY, limit=DAY_SCAN)
        )
        accepted_today = len(today)
        statuses = sorted(Counter(r.status for r in today).items())
    latest, _ = await ctx.admin.messages.search(
        MessageQuery(account=None if who.admin else who.account.address, limit=10)
    )
    return page(
        "dashboard.html",
        viewer=who,
        span=span,
        charts=charts,
        reasons=reasons,
        statuses=statuses,
        accepted_today=accepted_today,
        recent=latest,
        queued=queued,
        held=held,
        oldest=oldest,
        now=now,
    )


def routes() -> list[BaseRoute]:
    return [ui_page("/", _dashboard)]
