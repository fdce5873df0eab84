"""The webhooks page (admins): the endpoints from the config and those made
here, their recent attempts; add one (its secret is shown once), send a test
event, remove one. Through services/webhooks.WebhooksAdmin, as the API."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from relaygate.http.api import audit
from relaygate.http.context import HttpContext
from relaygate.http.ui.auth import Viewer, form_text, ui_page
from relaygate.http.ui.manage import redirect_to
from relaygate.http.ui.render import page
from relaygate.services.webhooks import ConfigDefined, WebhookError, WebhookMissing
from relaygate.webhooks.events import EVENTS

ATTEMPTS_SHOWN = 10


async def _webhooks(request: Request, ctx: HttpContext, who: Viewer, **extra: Any) -> Response:
    endpoints = await ctx.admin.webhooks.list()
    attempts = {e.id: await ctx.admin.webhooks.attempts(e.id, ATTEMPTS_SHOWN) for e in endpoints}
    error = extra.get("error", "")
    return page(
        "webhooks.html",
        400 if error else 200,
        viewer=who,
        endpoints=endpoints,
        attempts=attempts,
        events=EVENTS,
        error=error,
        created=extra.get("created"),
        secret=extra.get("secret", ""),
        tested=request.query_params.get("tested", "")[:100],
        now=time.time(),
    )


async def _create(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    form = await request.form()
    url = form_text(form, "url").strip()
    events = [e for e in EVENTS if form_text(form, f"event-{e}") == "on"]
    try:
        endpoint, secret = await ctx.admin.webhooks.create(url, events)
    except WebhookError as exc:
        return await _webhooks(request, ctx, who, error=str(exc))
    audit(who.caller, "webhook.add", webhook=endpoint.id, url=endpoint.url)
    return await _webhooks(request, ctx, who, created=endpoint, secret=secret)


async def _action(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    form = await request.form()
    action = form_text(form, "action")
    endpoint_id = form_text(form, "id")
    try:
        if action == "test":
            event_id = await ctx.admin.webhooks.test(endpoint_id)
            audit(who.caller, "webhook.test", webhook=endpoint_id, id=event_id)
            return redirect_to("/webhooks", tested=event_id)
        if action == "delete":
            await ctx.admin.webhooks.delete(endpoint_id)
            audit(who.caller, "webhook.remove", webhook=endpoint_id)
            return redirect_to("/webhooks")
        raise WebhookError("unknown webhook action")
    except (WebhookError, WebhookMissing, ConfigDefined) as exc:
        return await _webhooks(request, ctx, who, error=str(exc))


def routes() -> list[BaseRoute]:
    return [
        ui_page("/webhooks", _webhooks, admin=True),
        ui_page("/webhooks/create", _create, admin=True, methods=("POST",)),
        ui_page("/webhooks/action", _action, admin=True, methods=("POST",)),
    ]
