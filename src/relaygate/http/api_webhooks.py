"""/api/v1/webhooks: list, add (the secret shown once), show, change, remove,
send a test event, recent attempts. Config-defined webhooks are listed too,
read-only (``"source": "config"``)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from relaygate.http.api import ApiError, api_route, audit, json_body
from relaygate.http.context import Caller, HttpContext
from relaygate.services.webhooks import ConfigDefined, WebhookError, WebhookMissing
from relaygate.storage.api import WebhookAttempt
from relaygate.times import rfc3339
from relaygate.webhooks.events import Endpoint

T = TypeVar("T")


def endpoint_json(endpoint: Endpoint) -> dict[str, Any]:
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "events": list(endpoint.events) or "all",
        "source": endpoint.source,
        "created_at": rfc3339(endpoint.created_at or None),
    }


def attempt_json(attempt: WebhookAttempt) -> dict[str, Any]:
    return {
        "webhook_id": attempt.event_id,
        "type": attempt.type,
        "ts": rfc3339(attempt.ts),
        "status_code": attempt.status_code,
        "error": attempt.error,
        "duration_ms": round(attempt.duration * 1000, 1),
        "outcome": attempt.outcome,
    }


async def _call(work: Awaitable[T]) -> T:
    """The use case's errors as HTTP answers."""
    try:
        return await work
    except WebhookError as exc:
        raise ApiError(400, str(exc)) from None
    except WebhookMissing as exc:
        raise ApiError(404, str(exc)) from None
    except ConfigDefined as exc:
        raise ApiError(409, str(exc)) from None


async def _list(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    hooks = await ctx.admin.webhooks.list()
    return JSONResponse({"webhooks": [endpoint_json(e) for e in hooks]})


async def _create(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    data = await json_body(request)
    unknown = sorted(set(data) - {"url", "events", "secret"})
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}", unknown)
    endpoint, secret = await _call(
        ctx.admin.webhooks.create(data.get("url"), data.get("events"), data.get("secret"))
    )
    audit(caller, "webhook.add", webhook=endpoint.id, url=endpoint.url)
    return JSONResponse({**endpoint_json(endpoint), "secret": secret}, status_code=201)


async def _one(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    endpoint = await _call(ctx.admin.webhooks.get(request.path_params["webhook_id"]))
    return JSONResponse(endpoint_json(endpoint))


async def _update(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    data = await json_body(request)
    unknown = sorted(set(data) - {"url", "events"})
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r} (url and events can change)", unknown)
    webhook_id = request.path_params["webhook_id"]
    endpoint = await _call(
        ctx.admin.webhooks.update(webhook_id, data.get("url"), data.get("events"))
    )
    audit(caller, "webhook.update", webhook=webhook_id, fields=",".join(sorted(data)))
    return JSONResponse(endpoint_json(endpoint))


async def _delete(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    webhook_id = request.path_params["webhook_id"]
    await _call(ctx.admin.webhooks.delete(webhook_id))
    audit(caller, "webhook.remove", webhook=webhook_id)
    return JSONResponse({"removed": webhook_id})


async def _test(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    webhook_id = request.path_params["webhook_id"]
    event_id = await _call(ctx.admin.webhooks.test(webhook_id))
    audit(caller, "webhook.test", webhook=webhook_id, id=event_id)
    return JSONResponse({"queued": event_id}, status_code=202)


async def _attempts(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    text = request.query_params.get("limit", "50")
    if not text.isdigit() or not 1 <= int(text) <= 200:
        raise ApiError(400, "limit must be a whole number from 1 to 200", text)
    attempts = await _call(
        ctx.admin.webhooks.attempts(request.path_params["webhook_id"], int(text))
    )
    return JSONResponse({"attempts": [attempt_json(a) for a in attempts]})


def routes() -> list[BaseRoute]:
    return [
        api_route("/api/v1/webhooks", _list),
        api_route("/api/v1/webhooks", _create, methods=("POST",), write=True),
        api_route("/api/v1/webhooks/{webhook_id}", _one),
        api_route("/api/v1/webhooks/{webhook_id}", _update, methods=("PATCH",), write=True),
        api_route("/api/v1/webhooks/{webhook_id}", _delete, methods=("DELETE",), write=True),
        api_route("/api/v1/webhooks/{webhook_id}/test", _test, methods=("POST",), write=True),
        api_route("/api/v1/webhooks/{webhook_id}/attempts", _attempts),
    ]
