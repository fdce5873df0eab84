"""``GET /healthz``: the node's health for a load balancer or a container
runtime, the same checks as ``relaygate health`` (relaygate/health.py).

No token: a health probe has none, and the answer names no account, address
or secret - only listener addresses, queue size and certificate dates.
200 when healthy (warnings included; ``?strict=1`` counts them), else 503.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from relaygate import health
from relaygate.http.api import context


async def healthz(request: Request) -> Response:
    ctx = context(request)
    strict = request.query_params.get("strict", "") not in ("", "0", "false")
    checks = await health.run_checks(ctx.config, ctx.admin.queue.summary)
    body = health.check_json(checks, strict)
    return JSONResponse(
        body,
        status_code=503 if body["status"] == "fail" else 200,
        headers={"Cache-Control": "no-store"},
    )


def routes() -> list[BaseRoute]:
    return [Route("/healthz", healthz, methods=["GET", "HEAD"])]
