"""``GET /healthz``: the node's health for a load balancer or a container
runtime, the same checks as ``relaygate health`` (relaygate/health.py).

No token: a health probe has none, and the answer names no account, address
or secret - only listener addresses, queue size and certificate dates.
200 when healthy (warnings included; ``?strict=1`` counts them), else 503.
"""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from relaygate import health
from relaygate.http.api import context
from relaygate.http.context import HttpContext

CACHE_SECONDS = 1.0  # a flood of probes costs one round of checks a second


class _Recent:
    """The last round of checks, shared by every request within CACHE_SECONDS
    (and one round in flight at a time): each round opens a connection to
    every listener and queries the storage, which no unauthenticated caller
    should be able to multiply."""

    def __init__(self) -> None:
        self.at = -CACHE_SECONDS
        self.round: asyncio.Future[list[health.Check]] | None = None

    async def checks(self, ctx: HttpContext) -> list[health.Check]:
        now = time.monotonic()
        if self.round is None or (self.round.done() and now - self.at >= CACHE_SECONDS):
            self.at = now
            self.round = asyncio.ensure_future(
                health.run_checks(ctx.config, ctx.admin.queue.summary)
            )
        return await asyncio.shield(self.round)


_recent = _Recent()


async def healthz(request: Request) -> Response:
    ctx = context(request)
    strict = request.query_params.get("strict", "") not in ("", "0", "false")
    checks = await _recent.checks(ctx)
    body = health.check_json(checks, strict)
    return JSONResponse(
        body,
        status_code=503 if body["status"] == "fail" else 200,
        headers={"Cache-Control": "no-store"},
    )


def routes() -> list[BaseRoute]:
    return [Route("/healthz", healthz, methods=["GET", "HEAD"])]
