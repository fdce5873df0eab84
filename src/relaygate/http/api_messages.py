"""/api/v1/messages: the message log, one message, its raw bytes."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relaygate import mail_parts
from relaygate.http.api import ApiError, api_route
from relaygate.http.context import Caller, HttpContext
from relaygate.http.downloads import attachment_response
from relaygate.json_views import attachment_json, attempt_json, message_json
from relaygate.services.admin import decode_cursor, no_body_text
from relaygate.storage.message_query import MessageQuery

MAX_LIST = 1000  # messages per page


def _time(request: Request, name: str) -> float | None:
    """A time parameter: unix seconds or RFC 3339 (2026-12-04T10:00:00Z)."""
    text = request.query_params.get(name)
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ApiError(
            400, f"{name} must be unix seconds or an RFC 3339 time", {name: text[:100]}
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


async def _list(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    """GET /api/v1/messages?account=&status=&q=&from=&to=&subject=&since=&until=&limit=&cursor="""
    params = request.query_params
    known = {"account", "status", "q", "from", "to", "subject", "since", "until", "limit", "cursor"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ApiError(400, f"unknown parameter: {unknown[0][:40]}", {"known": sorted(known)})
    text = params.get("limit", "50")
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIST:
        raise ApiError(400, f"limit must be a whole number from 1 to {MAX_LIST}", text)
    cursor = params.get("cursor")
    try:
        before = decode_cursor(cursor) if cursor else None
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    query = MessageQuery(
        account=params.get("account") or None,
        status=params.get("status") or None,
        text=(params.get("q") or None),
        mail_from=params.get("from") or None,
        rcpt_to=params.get("to") or None,
        subject=params.get("subject") or None,
        since=_time(request, "since"),
        until=_time(request, "until"),
        before=before,
        limit=int(text),
    )
    records, next_cursor = await ctx.admin.messages.search(query)
    return JSONResponse(
        {"messages": [message_json(r) for r in records], "next_cursor": next_cursor}
    )


async def _one(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    """The record, its delivery history and its decoded header fields."""
    view = await ctx.admin.messages.show(request.path_params["message_id"])
    headers = mail_parts.headers(view.body) if view.body is not None else []
    return JSONResponse(
        {
            **message_json(view.record),
            "history": [attempt_json(a) for a in view.history],
            "headers": [[name, value] for name, value in headers],
        }
    )


async def _parts(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    view = await ctx.admin.messages.show(request.path_params["message_id"])
    if view.body is None:
        raise ApiError(404, no_body_text(view.record))
    found = mail_parts.parts(view.body)
    return JSONResponse(
        {
            "text": found.text,
            "html": found.html,
            "attachments": [attachment_json(a) for a in found.attachments],
        }
    )


async def _part(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    view = await ctx.admin.messages.show(request.path_params["message_id"])
    text = request.path_params["index"]
    found = (
        mail_parts.attachment(view.body, int(text))
        if view.body is not None and text.isdigit() and len(text) < 6
        else None
    )
    if found is None:
        raise ApiError(404, f"message {view.record.id} has no attachment {text[:20]}")
    return attachment_response(*found)


async def _raw(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    view = await ctx.admin.messages.show(request.path_params["message_id"])
    if view.body is None:
        raise ApiError(404, no_body_text(view.record))
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
        api_route("/api/v1/messages/{message_id}/parts", _parts),
        api_route("/api/v1/messages/{message_id}/parts/{index}", _part),
    ]
