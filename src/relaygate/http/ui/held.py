"""The held-accounts page (admins): accounts whose mail the compromised-account
defence holds, with release and purge buttons. Each POST goes through the CSRF
check (auth.ui_page) and leaves an admin.change log line."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from relaygate.accounts.store import AccountError
from relaygate.http.api import audit
from relaygate.http.context import HttpContext
from relaygate.http.ui.auth import Viewer, form_text, ui_page
from relaygate.http.ui.manage import redirect_to
from relaygate.http.ui.render import page
from relaygate.services.held import NotHeld


async def _held(request: Request, ctx: HttpContext, who: Viewer, error: str = "") -> Response:
    return page(
        "held.html",
        400 if error else 200,
        viewer=who,
        held=await ctx.admin.held.accounts(),
        error=error,
        done=request.query_params.get("done", ""),
        now=time.time(),
    )


async def _held_action(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    form = await request.form()
    action = form_text(form, "action")
    account = form_text(form, "account")
    try:
        if action == "release":
            ids = await ctx.admin.held.release(account, ctx.config.defence.expect_hours * 3600)
        elif action == "purge":
            ids = await ctx.admin.held.purge(account)
        else:
            return await _held(request, ctx, who, "unknown action")
    except (NotHeld, AccountError) as exc:
        return await _held(request, ctx, who, str(exc))
    audit(who.caller, f"held.{action}", account=account.lower(), messages=len(ids))
    verb = "released" if action == "release" else "purged"
    return redirect_to("/held", done=f"{account.lower()}: {len(ids)} message(s) {verb}")


def routes() -> list[BaseRoute]:
    return [
        ui_page("/held", _held, admin=True),
        ui_page("/held/action", _held_action, admin=True, methods=("POST",)),
    ]
