"""/api/v1/messages: the message log, one message, its raw bytes."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relaygate.http.api import ApiError, api_route
from relaygate.http.context import Caller, HttpContext
from relaygate.json_views import attempt_json, message_json

MAX_LIST = 1000  # messages per page


async def _list(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    text = request.query_params.get("limit", "50")
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIST:
        raise ApiError(400, f"limit must be a whole number from 1 to {MAX_LIST}", text)
    records = await ctx.admin.messages.recent(int(text))
    return JSONResponse({"messages": [message_json(r) for r in records]})


async def _one(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    view = await ctx.admin.messages.show(request.path_params["message_id"], body=False)
    return JSONResponse(
        {**message_json(view.record), "history": [attempt_json(a) for a in view.history]}
    )


async def _raw(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    view = await ctx.admin.messages.show(request.path_params["message_id"])
    if view.body is None:
        raise ApiError(404, f"message {view.record.id} has no stored body")
    return Response(
        view.body,
        media_type="message/rfc822",
        headers={"Content-Disposition": f'attachment; filename="{view.record.id}.eml"'},
    )


def routes() -> list[Route]:
    return [
        api_route("/api/v1/messages", _list),
        api_route("/api/v1/messages/{message_id}", _one),
        api_route("/api/v1/messages/{message_id}/raw", _raw),
    ]
