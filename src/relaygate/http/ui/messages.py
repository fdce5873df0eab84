"""The message log and one message: headers, text, the HTML in a sandboxed
frame, attachments, raw source, delivery history. Accounts that are not admins
see only their own messages (another's is "not found", not "forbidden")."""

from __future__ import annotations

import base64
import functools
import re
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute

from relaygate import mail_parts
from relaygate.http.context import HttpContext
from relaygate.http.downloads import attachment_response
from relaygate.http.ui.auth import Viewer, ui_page
from relaygate.http.ui.render import page
from relaygate.http.ui.security import harden, mail_csp
from relaygate.json_views import message_json
from relaygate.services.admin import NotFound
from relaygate.storage.api import MessageRecord
from relaygate.storage.bodies import BodyMissing
from relaygate.storage.message_query import MessageQuery

PAGE_SIZE = 100
MAX_RAW_SHOWN = 512 * 1024  # bytes of source shown in the page (the download has all)
MAX_INLINE_IMAGE = 2 * 1024 * 1024  # bytes of one cid: image shown inline
_REMOTE_IMAGE = re.compile(rb"""<img[^>]+src\s*=\s*["']?\s*(https?:)?//""", re.IGNORECASE)


async def _visible(
    ctx: HttpContext, who: Viewer, q: str, status: str, limit: int
) -> list[MessageRecord]:
    """The newest messages this viewer may see that match: an account that is
    not an admin gets its own only, filtered by the database."""
    query = MessageQuery(
        account=None if who.admin else who.account.address,
        status=status or None,
        text=q or None,
        limit=limit,
    )
    records, _ = await ctx.admin.messages.search(query)
    return records


async def _log(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    q = request.query_params.get("q", "")[:200]
    status = request.query_params.get("status", "")[:40]
    records = await _visible(ctx, who, q, status, PAGE_SIZE)
    return page("messages.html", viewer=who, messages=records, q=q, status=status)


async def _log_json(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    """What the log page polls for new messages (and status changes)."""
    q = request.query_params.get("q", "")[:200]
    status = request.query_params.get("status", "")[:40]
    records = await _visible(ctx, who, q, status, PAGE_SIZE)
    return harden(JSONResponse({"messages": [message_json(r) for r in records]}))


async def _record_for(ctx: HttpContext, who: Viewer, message_id: str, body: bool = True) -> Any:
    view = await ctx.admin.messages.show(message_id, body=body)
    if not who.may_see(view.record.account):
        raise NotFound(f"no such message: {message_id}")
    return view


def _not_found(who: Viewer, message_id: str) -> Response:
    return page(
        "error.html", 404, viewer=who, title="Not found", message=f"No such message: {message_id}"
    )


async def _message(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    message_id = request.path_params["message_id"]
    try:
        view = await _record_for(ctx, who, message_id)
    except (NotFound, BodyMissing):
        return _not_found(who, message_id)
    parts = mail_parts.parts(view.body) if view.body is not None else mail_parts.MessageParts()
    raw = (view.body or b"")[:MAX_RAW_SHOWN].decode("utf-8", "replace")
    images = request.query_params.get("images") == "1"
    remote = bool(parts.html and _REMOTE_IMAGE.search(parts.html.encode("utf-8", "replace")))
    tab = request.query_params.get("tab", "html" if parts.html else "text")
    return page(
        "message.html",
        viewer=who,
        record=view.record,
        history=view.history,
        parts=parts,
        raw=raw,
        raw_cut=view.body is not None and len(view.body) > MAX_RAW_SHOWN,
        images=images,
        remote_images=remote,
        tab=tab if tab in ("html", "text", "headers", "raw") else "text",
        quoted_id=quote(view.record.id, safe=""),
    )


def _constant(text: str, match: re.Match[str]) -> str:
    return text


def _with_inline_images(raw: bytes) -> str | None:
    """The HTML with its cid: images (logos, inline pictures sent with the
    message) turned into data: URIs, which the frame's CSP allows: they come
    with the message, so showing them tells the sender nothing."""
    html, images = mail_parts.inline_images(raw, MAX_INLINE_IMAGE)
    if html is None:
        return None
    for content_id, (kind, content) in images.items():
        uri = f"data:{kind};base64," + base64.b64encode(content).decode("ascii")
        pattern = re.compile("cid:" + re.escape(content_id), re.IGNORECASE)
        html = pattern.sub(functools.partial(_constant, uri), html)
    return html


async def _message_html(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    """The sender's HTML, for the sandboxed frame only: CSP forbids every
    script and, unless asked, every remote image (tracking pixels)."""
    message_id = request.path_params["message_id"]
    try:
        view = await _record_for(ctx, who, message_id)
    except (NotFound, BodyMissing):
        return harden(Response("not found", 404, media_type="text/plain"))
    html = _with_inline_images(view.body) if view.body is not None else None
    response = HTMLResponse(html or "")
    return harden(response, mail_csp(request.query_params.get("images") == "1"))


async def _attachment(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    message_id = request.path_params["message_id"]
    try:
        view = await _record_for(ctx, who, message_id)
        index = int(request.path_params["index"])
    except (NotFound, BodyMissing, ValueError):
        return _not_found(who, message_id)
    found = mail_parts.attachment(view.body, index) if view.body is not None else None
    if found is None:
        return _not_found(who, message_id)
    return harden(attachment_response(*found), "default-src 'none'; sandbox")


async def _raw(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    message_id = request.path_params["message_id"]
    try:
        view = await _record_for(ctx, who, message_id)
    except (NotFound, BodyMissing):
        return _not_found(who, message_id)
    response = Response(view.body or b"", media_type="message/rfc822")
    safe_id = "".join(c for c in view.record.id if c.isalnum())[:64]
    response.headers["Content-Disposition"] = f'attachment; filename="{safe_id}.eml"'
    return harden(response, "default-src 'none'; sandbox")


def routes() -> list[BaseRoute]:
    return [
        ui_page("/messages", _log),
        ui_page("/ui/messages.json", _log_json),
        ui_page("/messages/{message_id}", _message),
        ui_page("/messages/{message_id}/html", _message_html),
        ui_page("/messages/{message_id}/raw", _raw),
        ui_page("/messages/{message_id}/parts/{index}", _attachment),
    ]
