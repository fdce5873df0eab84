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
from relaygate.services.held import NotHeld, is_new

SHOWN_WITH_SIGHTINGS = 100  # held accounts whose networks and clients the page lists
SIGHTINGS_PER_ROW = 5


async def _held(request: Request, ctx: HttpContext, who: Viewer, error: str = "") -> Response:
    held = await ctx.admin.held.accounts()
    # Where each held account logged in from, and with what: a person judges by these.
    seen = {
        h.account: await ctx.admin.held.sightings(h.account) for h in held[:SHOWN_WITH_SIGHTINGS]
    }
    now = time.time()
    return page(
        "held.html",
        400 if error else 200,
        viewer=who,
        held=held,
        seen={
            account: (
                [(s.value, is_new(s, now)) for s in networks[:SIGHTINGS_PER_ROW]],
                [s.value for s in clients[:SIGHTINGS_PER_ROW]],
            )
            for account, (networks, clients) in seen.items()
        },
        error=error,
        done=request.query_params.get("done", ""),
        now=now,
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
