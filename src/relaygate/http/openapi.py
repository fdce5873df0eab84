"""The API's OpenAPI 3.1 document (GET /api/v1/openapi.json, no token needed)
and a browsable page of it (GET /api/v1/docs). Written by hand from one table
of operations: adding an endpoint is adding a row here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from relaygate import __version__
from relaygate.http.ui.render import page

_STR = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_NUM = {"type": "number"}
_STRS = {"type": "array", "items": _STR}
_LIMITS = {
    "type": "object",
    "properties": {
        "messages_per_hour": _INT,
        "messages_per_day": _INT,
        "recipients_per_day": _INT,
        "new_recipients_per_day": _INT,
        "clear": {**_BOOL, "description": "remove every override first"},
    },
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    summary: str
    tag: str
    write: bool = False
    query: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    created: bool = False  # 201
    no_content: bool = False  # 204
    binary: str | None = None  # a media type instead of JSON


OPERATIONS: list[Op] = [
    Op(
        "get",
        "/api/v1/messages",
        "The message log, newest first, filtered, a page at a time",
        "messages",
        query={
            "account": (_STR, "sent by this account (any case)"),
            "status": (_STR, "captured, queued, delivered, partly delivered, failed, ..."),
            "q": (_STR, "text in the subject, envelope sender or recipients, account or id"),
            "from": (_STR, "text in the envelope sender (any case)"),
            "to": (_STR, "text in an envelope recipient (any case)"),
            "subject": (_STR, "text in the subject (any case)"),
            "since": (_STR, "received at or after: unix seconds or RFC 3339"),
            "until": (_STR, "received before: unix seconds or RFC 3339"),
            "limit": (_INT, "1 to 1000, default 50"),
            "cursor": (_STR, "next_cursor of the previous page"),
        },
    ),
    Op(
        "get",
        "/api/v1/messages/{message_id}",
        "One message: record, delivery history, headers",
        "messages",
    ),
    Op(
        "get",
        "/api/v1/messages/{message_id}/raw",
        "The stored bytes",
        "messages",
        binary="message/rfc822",
    ),
    Op(
        "get",
        "/api/v1/messages/{message_id}/parts",
        "Text, HTML and the list of attachments",
        "messages",
    ),
    Op(
        "get",
        "/api/v1/messages/{message_id}/parts/{index}",
        "One attachment, decoded, as a download",
        "messages",
        binary="application/octet-stream",
    ),
    Op("get", "/api/v1/accounts", "Every account with its limits", "accounts"),
    Op(
        "post",
        "/api/v1/accounts",
        "Create an account; without a password one is generated and returned once",
        "accounts",
        write=True,
        created=True,
        body={
            "type": "object",
            "required": ["address"],
            "properties": {"address": _STR, "password": _STR, "senders": _STRS, "admin": _BOOL},
            "additionalProperties": False,
        },
    ),
    Op("get", "/api/v1/accounts/{address}", "One account", "accounts"),
    Op(
        "patch",
        "/api/v1/accounts/{address}",
        "Change senders, disable or enable, admin on or off, set a password",
        "accounts",
        write=True,
        body={
            "type": "object",
            "properties": {"senders": _STRS, "disabled": _BOOL, "admin": _BOOL, "password": _STR},
            "additionalProperties": False,
        },
    ),
    Op(
        "delete",
        "/api/v1/accounts/{address}",
        "Delete an account",
        "accounts",
        write=True,
        no_content=True,
    ),
    Op(
        "get",
        "/api/v1/accounts/{address}/limits",
        "The account's sending-limit overrides",
        "accounts",
    ),
    Op(
        "patch",
        "/api/v1/accounts/{address}/limits",
        "Set sending-limit overrides (0: unlimited)",
        "accounts",
        write=True,
        body=_LIMITS,
    ),
    Op(
        "get",
        "/api/v1/accounts/{address}/credentials",
        "The account's app credentials",
        "credentials",
    ),
    Op(
        "post",
        "/api/v1/accounts/{address}/credentials",
        "Create an app credential; its secret is returned this once",
        "credentials",
        write=True,
        created=True,
        body={
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": _STR,
                "expires_at": {**_NUM, "description": "unix time"},
                "senders": _STRS,
                "networks": _STRS,
            },
            "additionalProperties": False,
        },
    ),
    Op(
        "delete",
        "/api/v1/accounts/{address}/credentials/{name}",
        "Revoke an app credential (at once, on every node)",
        "credentials",
        write=True,
    ),
    Op(
        "patch",
        "/api/v1/accounts/{address}/credentials/{name}/limits",
        "Set the credential's sending-limit overrides",
        "credentials",
        write=True,
        body=_LIMITS,
    ),
    Op("get", "/api/v1/queue", "Deliveries waiting, with the last reply and next attempt", "queue"),
    Op("post", "/api/v1/queue/retry", "Make every queued delivery due now", "queue", write=True),
    Op(
        "post",
        "/api/v1/queue/{message_id}/retry",
        "Make one message's deliveries due now",
        "queue",
        write=True,
    ),
    Op(
        "delete",
        "/api/v1/queue/{message_id}",
        "Stop delivering a message (no bounce)",
        "queue",
        write=True,
    ),
    Op(
        "get",
        "/api/v1/held",
        "Accounts whose outbound mail is held (compromised-account defence), and why",
        "held",
    ),
    Op(
        "get",
        "/api/v1/held/{account}",
        "One account's hold (or null) and the networks and client names it logged in with",
        "held",
    ),
    Op(
        "post",
        "/api/v1/held/{account}/release",
        "Deliver the account's held mail (each message once) and lift the hold",
        "held",
        write=True,
    ),
    Op(
        "post",
        "/api/v1/held/{account}/purge",
        "Drop the account's held mail (status purged, no bounce) and lift the hold",
        "held",
        write=True,
    ),
    Op(
        "post",
        "/api/v1/held/{account}/expect",
        "Mark a burst as expected: raise the account's baseline for a while",
        "held",
        write=True,
        body={
            "type": "object",
            "properties": {
                "for": {**_STR, "description": "a duration: 12h, 1d (default expect_hours)"},
                "messages": {**_NUM, "description": "messages an hour (default 1000)"},
            },
            "additionalProperties": False,
        },
    ),
    Op("get", "/api/v1/dkim", "DKIM keys and the TXT records to publish", "dkim"),
    Op(
        "post",
        "/api/v1/dkim",
        "Generate a key for a domain",
        "dkim",
        write=True,
        created=True,
        body={
            "type": "object",
            "required": ["domain"],
            "properties": {
                "domain": _STR,
                "selector": _STR,
                "algorithm": {"enum": ["rsa", "ed25519"]},
            },
            "additionalProperties": False,
        },
    ),
    Op("get", "/api/v1/dkim/{domain}", "A domain's keys and whether DNS publishes them", "dkim"),
    Op(
        "get",
        "/api/v1/stats",
        "Counts per hour: accepted, delivered, deferred, bounced, refused by reason, failed logins",
        "stats",
        query={"hours": (_INT, "1 to 2160, default 24")},
    ),
    Op(
        "post",
        "/api/v1/check",
        "Audit a submission server as relaygate check --json does (502: no SMTP session)",
        "check",
        write=True,
        body={
            "type": "object",
            "required": ["target"],
            "properties": {
                "target": {**_STR, "description": "host, host:port or [v6]:port (587, 465)"},
                "implicit": {**_BOOL, "description": "TLS at connect (465 style)"},
                "servername": {**_STR, "description": "the name the certificate must carry"},
                "ca_pem": {**_STR, "description": "CA certificates (PEM) to trust as well"},
                "user": {**_STR, "description": "with password: the smuggling probe"},
                "password": _STR,
                "timeout": {"type": "number", "description": "seconds a step, at most 60"},
            },
            "additionalProperties": False,
        },
    ),
    Op("get", "/api/v1/tokens", "API tokens (never their secrets)", "tokens"),
    Op(
        "post",
        "/api/v1/verify",
        "Check addresses as relaygate verify --json does (smtp: true needs a write token)",
        "verify",
        body={
            "type": "object",
            "required": ["addresses"],
            "properties": {
                "addresses": {**_STRS, "minItems": 1},
                "smtp": {**_BOOL, "description": "also ask each domain's MX (RCPT, never DATA)"},
            },
            "additionalProperties": False,
        },
    ),
    Op("get", "/api/v1/webhooks", "Webhooks, from the config and made here", "webhooks"),
    Op(
        "post",
        "/api/v1/webhooks",
        "Add a webhook; its signing secret (whsec_...) is returned this once",
        "webhooks",
        write=True,
        created=True,
        body={
            "type": "object",
            "required": ["url"],
            "properties": {"url": _STR, "events": _STRS, "secret": _STR},
            "additionalProperties": False,
        },
    ),
    Op("get", "/api/v1/webhooks/{webhook_id}", "One webhook", "webhooks"),
    Op(
        "patch",
        "/api/v1/webhooks/{webhook_id}",
        "Change its URL or events",
        "webhooks",
        write=True,
        body={
            "type": "object",
            "properties": {"url": _STR, "events": _STRS},
            "additionalProperties": False,
        },
    ),
    Op("delete", "/api/v1/webhooks/{webhook_id}", "Remove a webhook", "webhooks", write=True),
    Op(
        "post",
        "/api/v1/webhooks/{webhook_id}/test",
        "Queue a webhook.test event to this webhook only",
        "webhooks",
        write=True,
    ),
    Op("get", "/api/v1/webhooks/{webhook_id}/attempts", "Its recent delivery attempts", "webhooks"),
]

_ERROR = {
    "description": "an error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": _STR, "detail": {}},
            }
        }
    },
}


_NO_BRACES = str.maketrans("", "", "{}")


def _operation(op: Op) -> dict[str, Any]:
    params = [
        {"name": name, "in": "path", "required": True, "schema": _STR}
        for name in (part[1:-1] for part in op.path.split("/") if part.startswith("{"))
    ]
    params += [
        {"name": name, "in": "query", "required": False, "schema": schema, "description": text}
        for name, (schema, text) in op.query.items()
    ]
    ok = "201" if op.created else "204" if op.no_content else "200"
    schema = {"type": "string", "format": "binary"} if op.binary else {"type": "object"}
    content = {op.binary or "application/json": {"schema": schema}}
    responses: dict[str, Any] = {
        ok: {"description": "done", **({} if ok == "204" else {"content": content})},
        "400": _ERROR,
        "401": _ERROR,
        "404": _ERROR,
        "429": _ERROR,
    }
    if op.write:
        responses["403"] = {**_ERROR, "description": "a read-only token"}
    found: dict[str, Any] = {
        "summary": op.summary,
        "operationId": op.method + "_" + op.path[8:].replace("/", "_").translate(_NO_BRACES),
        "tags": [op.tag],
        "parameters": params,
        "responses": responses,
    }
    if op.body is not None:
        found["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": op.body}},
        }
    return found


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "relaygate admin API",
            "version": __version__,
            "description": "Bearer tokens from `relaygate token add NAME [--read-only]`. Times in"
            " answers are RFC 3339 strings in UTC (2026-12-04T06:12:30Z); time parameters take"
            " those or unix seconds."
            ' Errors are JSON {"error": ..., "detail": ...}.',
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }


async def _openapi(request: Request) -> Response:
    return JSONResponse(document())


async def _docs(request: Request) -> Response:
    return page("api_docs.html", viewer=None, operations=OPERATIONS)


def routes() -> list[BaseRoute]:
    return [Route("/api/v1/openapi.json", _openapi), Route("/api/v1/docs", _docs)]
