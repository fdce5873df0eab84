"""/api/v1/held: accounts whose mail the compromised-account defence holds.

The CLI's ``held list|release|purge|expect`` over HTTP, through the same use
cases (services/held.py). Writes need a read-write token and leave an
admin.change log line.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from relaygate.durations import parse_duration
from relaygate.http.api import ApiError, api_route, audit, json_body
from relaygate.http.context import Caller, HttpContext
from relaygate.services.held import NotHeld, held_json, watch_json
from relaygate.times import rfc3339

MAX_EXPECTED = 10_000_000  # messages an hour: anything more is a typo


async def _held(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    return JSONResponse({"held": [held_json(h) for h in await ctx.admin.held.accounts()]})


async def _show(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    try:
        watch = await ctx.admin.held.show(request.path_params["account"])
    except NotHeld as exc:
        raise ApiError(404, str(exc)) from None
    return JSONResponse(watch_json(watch, time.time()))


async def _release(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    account = request.path_params["account"]
    seconds = ctx.config.defence.expect_hours * 3600
    try:
        ids = await ctx.admin.held.release(account, seconds)
    except NotHeld as exc:
        raise ApiError(404, str(exc)) from None
    audit(caller, "held.release", account=account.lower(), messages=len(ids))
    return JSONResponse({"account": account.lower(), "released": ids})


async def _purge(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    account = request.path_params["account"]
    try:
        ids = await ctx.admin.held.purge(account)
    except NotHeld as exc:
        raise ApiError(404, str(exc)) from None
    audit(caller, "held.purge", account=account.lower(), messages=len(ids))
    return JSONResponse({"account": account.lower(), "purged": ids})


async def _expect(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    account = request.path_params["account"]
    data = await json_body(request) if await request.body() else {}
    unknown = sorted(set(data) - {"for", "messages"})
    if unknown:
        raise ApiError(400, f"unknown field: {unknown[0][:60]}", {"allowed": ["for", "messages"]})
    seconds: float = ctx.config.defence.expect_hours * 3600
    duration = data.get("for")
    if duration is not None:
        if not isinstance(duration, str):
            raise ApiError(400, "for must be a duration such as 12h or 1d")
        try:
            seconds = parse_duration(duration)
        except ValueError as exc:
            raise ApiError(400, f"for: {exc}") from None
        if seconds <= 0:
            raise ApiError(400, "for must be longer than 0s")
    messages = data.get("messages")
    if messages is not None and (
        isinstance(messages, bool)
        or not isinstance(messages, int)
        or not 0 <= messages <= MAX_EXPECTED
    ):
        raise ApiError(400, f"messages must be a whole number from 0 to {MAX_EXPECTED}")
    try:
        done = await ctx.admin.held.expect(account, seconds, messages)
    except NotHeld as exc:
        raise ApiError(404, str(exc)) from None
    audit(caller, "held.expect", account=done.account, messages=done.messages)
    return JSONResponse(
        {"account": done.account, "until": rfc3339(done.until), "messages": done.messages}
    )


def routes() -> list[BaseRoute]:
    return [
        api_route("/api/v1/held", _held),
        api_route("/api/v1/held/{account}", _show),
        api_route("/api/v1/held/{account}/release", _release, methods=("POST",), write=True),
        api_route("/api/v1/held/{account}/purge", _purge, methods=("POST",), write=True),
        api_route("/api/v1/held/{account}/expect", _expect, methods=("POST",), write=True),
    ]
