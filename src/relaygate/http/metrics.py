"""GET /metrics: Prometheus text format, summed over every process of this serve.

The SMTP workers and the delivery process write their counters to files
(metrics.py, prometheus_client's multiprocess mode); a scrape reads them all
here, plus two gauges computed now from the delivery queue (one grouped
count query). ``[http] metrics = false``: no route (404);
``metrics_token_file``: the scrape must send ``Authorization: Bearer <its
content>``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from relaygate import logs, metrics
from relaygate.config import Config
from relaygate.http.api import context
from relaygate.storage.api import QueueSummary
from relaygate.storage.errors import STORAGE_ERRORS


class QueueCollector(Collector):
    """relaygate_queue_messages{state} and relaygate_queue_oldest_seconds, as read now."""

    def __init__(self, summary: QueueSummary, now: float) -> None:
        self._summary = summary
        self._now = now

    def collect(self) -> Iterator[Metric]:
        messages = GaugeMetricFamily(
            "relaygate_queue_messages",
            "Delivery queue rows (one per message and recipient domain) by state",
            labels=["state"],
        )
        for state, count in sorted(self._summary.counts.items()):
            messages.add_metric([state], count)
        yield messages
        oldest = self._summary.oldest
        yield GaugeMetricFamily(
            "relaygate_queue_oldest_seconds",
            "Age of the oldest message still to deliver (0: none)",
            value=0.0 if oldest is None else max(0.0, self._now - oldest),
        )


def render(summary: QueueSummary | None, now: float) -> bytes:
    """The exposition: every process's files (or this process's metrics when
    multiprocess mode is off), and the queue when it could be read."""
    path = metrics.directory()
    if path is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
    else:
        registry = metrics.current().registry
    text = generate_latest(registry)
    if summary is not None:
        queue = CollectorRegistry()
        queue.register(QueueCollector(summary, now))
        text += generate_latest(queue)
    return text


def _authorized(request: Request, token_file: Path | None) -> bool | None:
    """True/False; None when the token file cannot be read."""
    if token_file is None:
        return True
    try:
        expected = token_file.read_bytes().strip()
    except OSError as exc:
        logs.event("metrics.error", logging.ERROR, reason=exc.strerror or str(exc))
        return None
    scheme, _, offered = request.headers.get("authorization", "").partition(" ")
    if not expected or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(offered.strip().encode(), expected)


def routes(config: Config) -> list[BaseRoute]:
    if config.http is None or not config.http.metrics:
        return []
    token_file = config.http.metrics_token_file

    async def scrape(request: Request) -> Response:
        allowed = _authorized(request, token_file)
        if allowed is None:
            return PlainTextResponse("metrics token file unreadable\n", status_code=503)
        if not allowed:
            return PlainTextResponse(
                "a valid metrics token is needed (Authorization: Bearer <token>)\n",
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        summary: QueueSummary | None = None
        try:
            summary = await context(request).admin.queue.summary()
        except STORAGE_ERRORS as exc:  # the processes' metrics are still worth a scrape
            logs.event("metrics.error", logging.WARNING, reason=" ".join(str(exc).split()))
        body = await asyncio.to_thread(render, summary, time.time())
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return [Route("/metrics", scrape, methods=["GET"])]
