"""Who is looking: the session cookie resolved to an account, the login and
logout pages, and the wrappers every other page goes through (a login
required, admins only, CSRF and Origin checked on every POST)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from relaygate import logs
from relaygate.accounts.store import Account
from relaygate.http.api import client_ip, context
from relaygate.http.context import Caller, HttpContext
from relaygate.http.ui.render import page
from relaygate.http.ui.security import (
    COOKIE,
    clear_session_cookie,
    harden,
    same_origin,
    set_session_cookie,
)
from relaygate.services.web_login import MAX_SECONDS

MAX_FORM_FIELD = 10_000  # characters; a login form needs far fewer


@dataclass(frozen=True, slots=True)
class Viewer:
    account: Account
    token: str  # the session cookie
    csrf: str  # the token every form of this session carries

    @property
    def admin(self) -> bool:
        return self.account.admin

    @property
    def caller(self) -> Caller:
        return Caller("account", self.account.address, admin=self.account.admin)

    def may_see(self, account: str) -> bool:
        return self.admin or account.lower() == self.account.address.lower()


async def viewer(request: Request, ctx: HttpContext) -> Viewer | None:
    token = request.cookies.get(COOKIE, "")
    if not token:
        return None
    account = await ctx.web.resolve(token)
    if account is None:
        return None
    return Viewer(account, token, await ctx.web.csrf_token(token))


def _safe_next(target: str) -> str:
    """Only a path on this site (no //host, no scheme): not an open redirect."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _secure(ctx: HttpContext) -> bool:
    return ctx.config.http is not None and ctx.config.http.tls


PageHandler = Callable[[Request, HttpContext, Viewer], Awaitable[Response]]


def forbidden(who: Viewer, what: str = "This page is for admins.") -> Response:
    return page("error.html", 403, viewer=who, title="Not allowed", message=what)


def ui_page(
    path: str, handler: PageHandler, *, admin: bool = False, methods: tuple[str, ...] = ("GET",)
) -> Route:
    """A page behind the login. POSTs must carry the session's CSRF token
    (form field ``csrf``) and come from our own origin."""

    async def endpoint(request: Request) -> Response:
        ctx = context(request)
        who = await viewer(request, ctx)
        if who is None:
            if request.method != "GET":
                return harden(Response("log in first", 401, media_type="text/plain"))
            return RedirectResponse(f"/login?next={quote(request.url.path)}", 303)
        if request.method == "POST":
            form = await request.form(max_fields=50, max_files=0)
            offered = form.get("csrf")
            if (
                not isinstance(offered, str)
                or not same_origin(request)
                or not await ctx.web.csrf_valid(who.token, offered)
            ):
                logs.event(
                    "ui.csrf_refused",
                    logging.WARNING,
                    ip=client_ip(request),
                    account=who.account.address,
                )
                return page(
                    "error.html",
                    403,
                    viewer=who,
                    title="Form expired",
                    message="This form is from another page or an old session."
                    " Go back, reload and try again.",
                )
        if admin and not who.admin:
            return forbidden(who)
        return await handler(request, ctx, who)

    return Route(path, endpoint, methods=list(methods))


def form_text(form: Any, name: str, default: str = "") -> str:
    value = form.get(name, default)
    if not isinstance(value, str):
        return default
    return value[:MAX_FORM_FIELD]


async def _login_page(request: Request) -> Response:
    ctx = context(request)
    target = _safe_next(request.query_params.get("next", "/"))
    if request.method == "GET":
        if await viewer(request, ctx) is not None:
            return RedirectResponse(target, 303)
        return page("login.html", viewer=None, next=target, error="", address="")
    if not same_origin(request):
        return page(
            "login.html",
            403,
            viewer=None,
            next="/",
            error="Log in from this site's own page.",
            address="",
        )
    form = await request.form(max_fields=10, max_files=0)
    address = form_text(form, "address").strip()
    password = form_text(form, "password")
    target = _safe_next(form_text(form, "next", "/"))
    ip = client_ip(request)
    result = await ctx.web.login(address, password, ip)
    if result.token is None or result.account is None:
        status = 429 if result.retry_after else 401
        logs.event(
            "ui.login_failed", logging.WARNING, ip=ip, account=address[:200], reason=result.error
        )
        response = page(
            "login.html", status, viewer=None, next=target, error=result.error, address=address
        )
        if result.retry_after:
            response.headers["Retry-After"] = str(max(1, int(result.retry_after + 0.999)))
        return response
    logs.event("ui.login", ip=ip, account=result.account.address)
    response = RedirectResponse(target, 303)
    set_session_cookie(response, result.token, secure=_secure(ctx), max_age=MAX_SECONDS)
    return harden(response)


async def _logout(request: Request, ctx: HttpContext, who: Viewer) -> Response:
    await ctx.web.logout(who.token)
    logs.event("ui.logout", account=who.account.address)
    response = RedirectResponse("/login", 303)
    clear_session_cookie(response, secure=_secure(ctx))
    return harden(response)


def routes() -> list[BaseRoute]:
    return [
        Route("/login", _login_page, methods=["GET", "POST"]),
        ui_page("/logout", _logout, methods=("POST",)),
    ]
