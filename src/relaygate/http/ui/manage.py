"""Pages that change things: app credentials (every account, its own; admins,
anyone's), and for admins the delivery queue, accounts and DKIM keys. Each
POST goes through the CSRF check (auth.ui_page) and leaves an admin.change log
line naming the account that made it."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute

from relaygate.accounts.credentials import LIMIT_KEYS, MAX_LIMIT, CredentialError
from relaygate.accounts.store import AccountError
from relaygate.delivery.dkim import KEY_TYPES, DKIMError
from relaygate.delivery.dkim_dns import published, resolver_for
from relaygate.http.api import audit
from relaygate.http.context import HttpContext
from relaygate.http.ui.auth import Viewer, forbidden, form_text, ui_page
from relaygate.http.ui.render import page
from relaygate.services.admin import NotFound, TokenError
from relaygate.storage.postgres.nodes import ALIVE_FOR as NODE_ALIVE_FOR

USER_ERRORS = (AccountError, CredentialError, DKIMError, NotFound, ValueError)


def redirect_to(path: str, **params: str) -> Response:
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items() if v)
    return RedirectResponse(path + ("?" + query if query else ""), 303)


# ------------------------------------------------------------------ credentials


def _owner(request: Request, who: Viewer, form: Any = None) -> str | None:
    """Whose credentials: one's own, or (admins) the account asked for."""
    asked = (form_text(form, "account") if form is not None else "") or request.query_params.get(
        "account", ""
    )
    if not asked or asked.lower() == who.account.address.lower():
        return who.account.address
    return asked if who.admin else None


async def _credentials(request: Request, ctx: HttpContext, who: Viewer, **extra: Any) -> Response:
    owner = _owner(request, who)
    if owner is None:
        return forbidden(who, "You can manage only your own credentials.")
    error = extra.pop("error", "")
    try:
        listed = await ctx.admin.credentials.list(owner)
    except USER_ERRORS as exc:
        listed, error = [], str(exc)
    accounts = [a.address for a in await ctx.admin.accounts.list()] if who.admin else []
    return page(
        "credentials.html",
        400 if error else 200,
        viewer=who,
        owner=owner,
        credentials=listed,
        accounts=accounts,
        now=time.time(),
        error=error,
        created=extra.get("created"),
        secret=extra.get("secret", ""),
        limit_keys=LIMIT_KEYS,
    )


async def _credential_create(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    form = await request.form()
    owner = _owner(request, who, form)
    if owner is None:
        return forbidden(who, "You can manage only your own credentials.")
    name = form_text(form, "name").strip()
    days = form_text(form, "expires_days").strip()
    try:
        expires = time.time() + float(days) * 86400 if days else None
        if expires is not None and not (0 < float(days) <= 3650):
            raise ValueError("expiry: give 1 to 3650 days, or leave it empty for none")
        credential, secret = await ctx.admin.credentials.add(owner, name, expires_at=expires)
    except USER_ERRORS as exc:
        return await _credentials(request, ctx, who, error=str(exc))
    audit(who.caller, "credential.create", account=owner, name=credential.name)
    # The secret is in this one response only (not in a URL, not stored).
    return await _credentials(request, ctx, who, created=credential, secret=secret)


async def _credential_revoke(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    form = await request.form()
    owner = _owner(request, who, form)
    if owner is None:
        return forbidden(who, "You can manage only your own credentials.")
    name = form_text(form, "name")
    try:
        await ctx.admin.credentials.revoke(owner, name)
    except USER_ERRORS as exc:
        return await _credentials(request, ctx, who, error=str(exc))
    audit(who.caller, "credential.revoke", account=owner, name=name)
    return redirect_to("/credentials", account=owner if owner != who.account.address else "")


async def _credential_limits(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    form = await request.form()
    owner = _owner(request, who, form)
    if owner is None:
        return forbidden(who, "You can manage only your own credentials.")
    name = form_text(form, "name")
    try:
        changes = _limit_form(form)
        await ctx.admin.credentials.limits(owner, name, changes, clear=True)
    except USER_ERRORS as exc:
        return await _credentials(request, ctx, who, error=str(exc))
    audit(who.caller, "credential.limits", account=owner, name=name)
    return redirect_to("/credentials", account=owner if owner != who.account.address else "")


def _limit_form(form: Any) -> dict[str, int]:
    """The limit fields of a form: empty is "no override", 0 is unlimited."""
    changes = {}
    for key in LIMIT_KEYS:
        text = form_text(form, key).strip()
        if text:
            if not text.isdigit() or int(text) > MAX_LIMIT:
                raise ValueError(f"{key}: give a whole number from 0 to {MAX_LIMIT}")
            changes[key] = int(text)
    return changes


# ------------------------------------------------------------------------ queue


async def _queue(request: Request, ctx: HttpContext, who: Viewer, error: str = "") -> Response:
    entries = await ctx.admin.queue.entries()
    return page(
        "queue.html",
        400 if error else 200,
        viewer=who,
        entries=entries,
        error=error,
        now=time.time(),
    )


async def _queue_action(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    form = await request.form()
    action = form_text(form, "action")
    message_id = form_text(form, "id") or None
    try:
        if action == "retry":
            count = await ctx.admin.queue.retry(message_id)
        elif action == "delete" and message_id is not None:
            count = await ctx.admin.queue.delete(message_id)
        else:
            return await _queue(request, ctx, who, "unknown queue action")
    except USER_ERRORS as exc:
        return await _queue(request, ctx, who, str(exc))
    audit(who.caller, f"queue.{action}", id=message_id or "all", rows=count)
    return redirect_to("/queue")


# --------------------------------------------------------------------- accounts


async def _accounts(request: Request, ctx: HttpContext, who: Viewer, **extra: Any) -> Response:
    error = extra.get("error", "")
    return page(
        "accounts.html",
        400 if error else 200,
        viewer=who,
        accounts=await ctx.admin.accounts.list(),
        error=error,
        added=extra.get("added"),
        password=extra.get("password", ""),
    )


async def _account_action(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    form = await request.form()
    action = form_text(form, "action")
    address = form_text(form, "address").strip()
    try:
        if action == "add":
            password = secrets.token_urlsafe(18)
            senders = [s for s in form_text(form, "senders").replace(",", " ").split() if s]
            account = await ctx.admin.accounts.add(address, password, senders or None)
            if form_text(form, "admin") == "on":
                account = await ctx.admin.accounts.set_admin(account.address, True)
            audit(who.caller, "account.create", account=account.address)
            return await _accounts(request, ctx, who, added=account, password=password)
        if address.lower() == who.account.address.lower() and action in (
            "disable",
            "remove",
            "admin-off",
        ):
            raise ValueError("you cannot do that to the account you are logged in with")
        if action in ("disable", "enable"):
            await ctx.admin.accounts.set_disabled(address, action == "disable")
        elif action in ("admin-on", "admin-off"):
            await ctx.admin.accounts.set_admin(address, action == "admin-on")
        elif action == "remove":
            await ctx.admin.accounts.remove(address)
        else:
            raise ValueError("unknown account action")
    except USER_ERRORS as exc:
        return await _accounts(request, ctx, who, error=str(exc))
    audit(who.caller, f"account.{action}", account=address)
    return redirect_to("/accounts")


async def _account_page(request: Request, ctx: HttpContext, who: Viewer, **extra: Any) -> Response:
    address = request.path_params["address"]
    try:
        account, limits = await ctx.admin.credentials.account_limits(address, {})
    except USER_ERRORS:
        return page(
            "error.html", 404, viewer=who, title="Not found", message=f"No such account: {address}"
        )
    error = extra.get("error", "")
    return page(
        "account.html",
        400 if error else 200,
        viewer=who,
        account=account,
        limits=limits or {},
        limit_keys=LIMIT_KEYS,
        error=error,
        password=extra.get("password", ""),
        saved=extra.get("saved", ""),
    )


async def _account_edit(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    form = await request.form()
    address = request.path_params["address"]
    action = form_text(form, "action")
    try:
        account = await ctx.admin.accounts.get(address)
        if action == "senders":
            patterns = form_text(form, "senders").replace(",", " ").split()
            await ctx.admin.accounts.set_senders(account.address, patterns)
        elif action == "limits":
            changes = _limit_form(form)
            await ctx.admin.credentials.account_limits(account.address, changes, clear=True)
        elif action == "password":
            password = secrets.token_urlsafe(18)
            await ctx.admin.accounts.set_password(account.address, password)
            audit(who.caller, "account.password", account=account.address)
            # Shown in this response only; sessions made with the old one have ended.
            return await _account_page(request, ctx, who, password=password)
        else:
            raise ValueError("unknown account change")
    except USER_ERRORS as exc:
        return await _account_page(request, ctx, who, error=str(exc))
    audit(who.caller, f"account.{action}", account=account.address)
    return await _account_page(request, ctx, who, saved=action)


# ------------------------------------------------------------------------ nodes


async def _nodes(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    now = time.time()
    return page(
        "nodes.html",
        viewer=who,
        shared=ctx.admin.nodes.shared,
        nodes=await ctx.admin.nodes.list(),
        alive_for=NODE_ALIVE_FOR,
        now=now,
    )


# ----------------------------------------------------------------------- tokens


async def _tokens(request: Request, ctx: HttpContext, who: Viewer, **extra: Any) -> Response:
    error = extra.get("error", "")
    return page(
        "tokens.html",
        400 if error else 200,
        viewer=who,
        tokens=await ctx.admin.tokens.list(),
        error=error,
        created=extra.get("created"),
        secret=extra.get("secret", ""),
    )


async def _token_action(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    form = await request.form()
    action = form_text(form, "action")
    name = form_text(form, "name").strip()
    try:
        if action == "add":
            token, secret = await ctx.admin.tokens.add(
                name, read_only=form_text(form, "read_only") == "on"
            )
            audit(who.caller, "token.add", name=token.name, read_only=token.read_only)
            return await _tokens(request, ctx, who, created=token, secret=secret)
        if action == "revoke":
            await ctx.admin.tokens.revoke(name)
            audit(who.caller, "token.revoke", name=name)
            return redirect_to("/tokens")
        raise ValueError("unknown token action")
    except (*USER_ERRORS, TokenError) as exc:
        return await _tokens(request, ctx, who, error=str(exc))


# ------------------------------------------------------------------------- DKIM


async def _dkim(request: Request, ctx: HttpContext, who: Viewer, error: str = "") -> Response:
    keys = await ctx.admin.dkim.all()
    resolver = resolver_for(ctx.config.delivery)
    states = await asyncio.gather(*(published(resolver, k.key) for k in keys))
    return page(
        "dkim.html",
        400 if error else 200,
        viewer=who,
        keys=list(zip(keys, states, strict=True)),
        error=error,
        key_types=KEY_TYPES,
    )


async def _dkim_generate(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    form = await request.form()
    domain = form_text(form, "domain").strip()
    selector = form_text(form, "selector").strip() or None
    algorithm = form_text(form, "algorithm", "rsa")
    try:
        if algorithm not in KEY_TYPES:
            raise ValueError(f"unknown algorithm: {algorithm}")
        stored = await ctx.admin.dkim.generate(domain, selector, algorithm)
    except USER_ERRORS as exc:
        return await _dkim(request, ctx, who, str(exc))
    audit(who.caller, "dkim.generate", domain=stored.key.domain, selector=stored.key.selector)
    return redirect_to("/dkim")


def routes() -> list[BaseRoute]:
    return [
        ui_page("/credentials", _credentials),
        ui_page("/credentials/create", _credential_create, methods=("POST",)),
        ui_page("/credentials/revoke", _credential_revoke, methods=("POST",)),
        ui_page("/queue", _queue, admin=True),
        ui_page("/queue/action", _queue_action, admin=True, methods=("POST",)),
        ui_page("/accounts", _accounts, admin=True),
        ui_page("/accounts/action", _account_action, admin=True, methods=("POST",)),
        ui_page("/accounts/{address}", _account_page, admin=True),
        ui_page("/accounts/{address}/edit", _account_edit, admin=True, methods=("POST",)),
        ui_page("/nodes", _nodes, admin=True),
        ui_page("/credentials/limits", _credential_limits, methods=("POST",)),
        ui_page("/tokens", _tokens, admin=True),
        ui_page("/tokens/action", _token_action, admin=True, methods=("POST",)),
        ui_page("/dkim", _dkim, admin=True),
        ui_page("/dkim/generate", _dkim_generate, admin=True, methods=("POST",)),
    ]
