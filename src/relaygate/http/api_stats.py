"""GET /api/v1/stats?hours=24: the hourly stats (stats.py), every hour of the
range present, oldest first. Read-only tokens may read them."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from relaygate.http.api import ApiError, api_route
from relaygate.http.context import Caller, HttpContext
from relaygate.stats import MAX_HOURS

DEFAULT_HOURS = 24


def _hours(request: Request) -> int:
    text = request.query_params.get("hours", str(DEFAULT_HOURS))
    try:
        hours = int(text)
    except ValueError:
        hours = 0
    if not 1 <= hours <= MAX_HOURS:
        raise ApiError(400, f"hours must be a whole number from 1 to {MAX_HOURS}", {"hours": text})
    return hours


async def hourly(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    report = await ctx.admin.stats.hourly(_hours(request))
    return JSONResponse({"hours": [hour.as_json() for hour in report]})


def routes() -> list[BaseRoute]:
    return [api_route("/api/v1/stats", hourly)]
