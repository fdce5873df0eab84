"""/api/v1 accounts, app credentials, limits, the delivery queue, DKIM keys
and tokens: the CLI's ``user``, ``credential``, ``queue``, ``dkim`` and ``token``
commands over HTTP, through the same use cases (services/admin.py). Writes
need a read-write token and leave an admin.change log line."""

from __future__ import annotations

import math
import secrets
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from relaygate.accounts.credentials import LIMIT_KEYS, MAX_LIMIT
from relaygate.delivery.dkim import KEY_TYPES, DKIMError, txt_value
from relaygate.delivery.dkim_dns import published, resolver_for
from relaygate.http.api import ApiError, api_route, audit, json_body
from relaygate.http.context import Caller, HttpContext
from relaygate.json_views import account_json, credential_json, queue_entry_json, token_json
from relaygate.services.admin import StoredKey

# ------------------------------------------------------------------ validation


def _only(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field: {unknown[0][:60]}", {"allowed": sorted(allowed)})


def _text(data: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"{name} is required")
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string")
    return value


def _flag(data: dict[str, Any], name: str) -> bool | None:
    value = data.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false")
    return value


def _strings(data: dict[str, Any], name: str) -> list[str] | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(400, f"{name} must be a list of strings")
    if len(value) > 1000:
        raise ApiError(400, f"{name}: at most 1000 entries")
    return value


def _limits(data: dict[str, Any]) -> tuple[dict[str, int], bool]:
    """{"messages_per_hour": 100, ..., "clear": false}: the changes and whether to clear."""
    _only(data, {*LIMIT_KEYS, "clear"})
    clear = _flag(data, "clear") or False
    changes = {}
    for key in LIMIT_KEYS:
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT:
            raise ApiError(400, f"{key} must be a whole number from 0 to {MAX_LIMIT}")
        changes[key] = value
    return changes, clear


# --------------------------------------------------------------------- accounts


async def _accounts(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    accounts = await ctx.admin.accounts.list()
    limits = await ctx.admin.credentials.all_account_limits()
    return JSONResponse(
        {"accounts": [account_json(a, limits.get(a.address.lower())) for a in accounts]}
    )


async def _account_create(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    data = await json_body(request)
    _only(data, {"address", "password", "senders", "admin"})
    address = _text(data, "address", required=True) or ""
    password = _text(data, "password")
    senders = _strings(data, "senders")
    admin = _flag(data, "admin") or False
    address = await ctx.admin.accounts.check_new(address, senders)  # cheap checks first
    generated = password is None
    if password is None:
        password = secrets.token_urlsafe(18)
    account = await ctx.admin.accounts.add(address, password, senders)
    if admin:
        account = await ctx.admin.accounts.set_admin(account.address, True)
    audit(caller, "account.create", account=account.address, admin=admin)
    body: dict[str, Any] = {"account": account_json(account, None)}
    if generated:
        body["password"] = password  # shown this once; only its hashes are kept
    return JSONResponse(body, status_code=201)


async def _account(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    account, limits = await ctx.admin.credentials.account_limits(request.path_params["address"], {})
    return JSONResponse(account_json(account, limits))


async def _account_change(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    address = request.path_params["address"]
    data = await json_body(request)
    _only(data, {"senders", "disabled", "admin", "password"})
    account, changed = await ctx.admin.accounts.change(
        address,
        senders=_strings(data, "senders"),
        disabled=_flag(data, "disabled"),
        admin=_flag(data, "admin"),
        password=_text(data, "password"),
    )
    audit(caller, "account.change", account=account.address, fields=",".join(changed))
    account, limits = await ctx.admin.credentials.account_limits(account.address, {})
    return JSONResponse(account_json(account, limits))


async def _account_delete(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    address = request.path_params["address"]
    await ctx.admin.accounts.remove(address)
    audit(caller, "account.remove", account=address)
    return Response(status_code=204)


async def _account_limits(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    address = request.path_params["address"]
    changes: dict[str, int] = {}
    clear = False
    if request.method == "PATCH":
        if caller.read_only:
            raise ApiError(403, f"token {caller.name} is read-only")
        changes, clear = _limits(await json_body(request))
    account, limits = await ctx.admin.credentials.account_limits(address, changes, clear=clear)
    if request.method == "PATCH":
        audit(caller, "account.limits", account=account.address)
    return JSONResponse({"account": account.address, "limits": limits})


# ------------------------------------------------------------------ credentials


async def _credentials(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    address = request.path_params["address"]
    await ctx.admin.accounts.get(address)  # 404 for no such account
    listed = await ctx.admin.credentials.list(address)
    now = time.time()
    return JSONResponse({"credentials": [credential_json(c, now) for c in listed]})


async def _credential_create(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    address = request.path_params["address"]
    data = await json_body(request)
    _only(data, {"name", "expires_at", "senders", "networks"})
    name = _text(data, "name", required=True) or ""
    expires = data.get("expires_at")
    if expires is not None and (
        isinstance(expires, bool)
        or not isinstance(expires, int | float)
        or not math.isfinite(expires)
    ):
        raise ApiError(400, "expires_at must be a unix time (seconds)")
    credential, secret = await ctx.admin.credentials.add(
        address,
        name,
        expires_at=None if expires is None else float(expires),
        senders=_strings(data, "senders"),
        networks=_strings(data, "networks"),
    )
    audit(caller, "credential.create", account=credential.account_address, name=credential.name)
    return JSONResponse(
        {"credential": credential_json(credential, time.time()), "secret": secret}, status_code=201
    )


async def _credential_revoke(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    address, name = request.path_params["address"], request.path_params["name"]
    credential = await ctx.admin.credentials.revoke(address, name)
    audit(caller, "credential.revoke", account=credential.account_address, name=name)
    return JSONResponse(credential_json(credential, time.time()))


async def _credential_limits(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    address, name = request.path_params["address"], request.path_params["name"]
    changes, clear = _limits(await json_body(request))
    credential = await ctx.admin.credentials.limits(address, name, changes, clear=clear)
    audit(caller, "credential.limits", account=credential.account_address, name=name)
    return JSONResponse(credential_json(credential, time.time()))


# ------------------------------------------------------------------------ queue


async def _queue(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    return JSONResponse({"queue": [queue_entry_json(e) for e in await ctx.admin.queue.entries()]})


async def _queue_retry_all(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    rows = await ctx.admin.queue.retry(None)
    audit(caller, "queue.retry", id="all", rows=rows)
    return JSONResponse({"rows": rows})


async def _queue_retry(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    message_id = request.path_params["message_id"]
    rows = await ctx.admin.queue.retry(message_id)
    audit(caller, "queue.retry", id=message_id, rows=rows)
    return JSONResponse({"rows": rows})


async def _queue_delete(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    message_id = request.path_params["message_id"]
    rows = await ctx.admin.queue.delete(message_id)
    audit(caller, "queue.delete", id=message_id, rows=rows)
    return JSONResponse({"rows": rows})


# ------------------------------------------------------------------------- DKIM


def _key_json(stored: StoredKey, dns: str | None = None) -> dict[str, Any]:
    key = stored.key
    found: dict[str, Any] = {
        "domain": key.domain,
        "selector": key.selector,
        "algorithm": key.algorithm,
        "dns_name": key.dns_name.rstrip("."),
        "txt": txt_value(key),
        "zone_line": stored.record,
    }
    if dns is not None:
        found["dns"] = dns
    return found


async def _dkim(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    return JSONResponse({"keys": [_key_json(k) for k in await ctx.admin.dkim.all()]})


async def _dkim_generate(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    data = await json_body(request)
    _only(data, {"domain", "selector", "algorithm"})
    domain = _text(data, "domain", required=True) or ""
    algorithm = _text(data, "algorithm") or "rsa"
    if algorithm not in KEY_TYPES:
        raise DKIMError(f"unknown algorithm: {algorithm!r}: use rsa or ed25519")
    stored = await ctx.admin.dkim.generate(domain, _text(data, "selector"), algorithm)
    audit(caller, "dkim.generate", domain=stored.key.domain, selector=stored.key.selector)
    return JSONResponse(_key_json(stored), status_code=201)


async def _dkim_domain(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    keys = await ctx.admin.dkim.show(request.path_params["domain"])
    resolver = resolver_for(ctx.config.delivery)
    return JSONResponse({"keys": [_key_json(k, await published(resolver, k.key)) for k in keys]})


# ----------------------------------------------------------------------- tokens


async def _tokens(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    return JSONResponse({"tokens": [token_json(t) for t in await ctx.admin.tokens.list()]})


def routes() -> list[BaseRoute]:
    return [
        api_route("/api/v1/accounts", _accounts),
        api_route("/api/v1/accounts", _account_create, methods=("POST",), write=True),
        api_route("/api/v1/accounts/{address}", _account),
        api_route("/api/v1/accounts/{address}", _account_change, methods=("PATCH",), write=True),
        api_route("/api/v1/accounts/{address}", _account_delete, methods=("DELETE",), write=True),
        api_route("/api/v1/accounts/{address}/limits", _account_limits, methods=("GET", "PATCH")),
        api_route("/api/v1/accounts/{address}/credentials", _credentials),
        api_route(
            "/api/v1/accounts/{address}/credentials",
            _credential_create,
            methods=("POST",),
            write=True,
        ),
        api_route(
            "/api/v1/accounts/{address}/credentials/{name}",
            _credential_revoke,
            methods=("DELETE",),
            write=True,
        ),
        api_route(
            "/api/v1/accounts/{address}/credentials/{name}/limits",
            _credential_limits,
            methods=("PATCH",),
            write=True,
        ),
        api_route("/api/v1/queue", _queue),
        api_route("/api/v1/queue/retry", _queue_retry_all, methods=("POST",), write=True),
        api_route("/api/v1/queue/{message_id}/retry", _queue_retry, methods=("POST",), write=True),
        api_route("/api/v1/queue/{message_id}", _queue_delete, methods=("DELETE",), write=True),
        api_route("/api/v1/dkim", _dkim),
        api_route("/api/v1/dkim", _dkim_generate, methods=("POST",), write=True),
        api_route("/api/v1/dkim/{domain}", _dkim_domain),
        api_route("/api/v1/tokens", _tokens),
    ]
