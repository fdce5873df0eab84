"""POST /api/v1/check {"target": "host[:port]", ...}: `relaygate check` over HTTP,
the same probes and the same document as ``relaygate check --json`` (docs/check.md).

It makes this server connect to other servers, so it needs a token that is not
read-only, and a few checks at a time per HTTP process at most (each may take up
to a minute against a slow server). The password for the smuggling probe comes
in the body and goes nowhere else: not in the answer, not in the log.
"""

from __future__ import annotations

import ssl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from relaygate import logs
from relaygate.audit.findings import evaluate, report
from relaygate.audit.probe import Settings, Unreachable, gather
from relaygate.audit.target import has_control, parse_target
from relaygate.audit.text import clean
from relaygate.http.api import ApiError, api_route, json_body
from relaygate.http.context import Caller, HttpContext

FIELDS = ("target", "implicit", "servername", "ca_pem", "user", "password", "timeout")
AT_ONCE = 4  # checks running at once in one HTTP process; more get 429
MAX_TEXT = 1000  # characters of target, servername, user, password
MAX_CA_PEM = 256 * 1024

_running = 0


def _text(data: dict[str, object], name: str, limit: int = MAX_TEXT) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ApiError(400, f"{name} must be a non-empty string of at most {limit} characters")
    if name != "ca_pem" and has_control(value):
        raise ApiError(400, f"{name} must not hold control characters (CR, LF, ...)")
    return value


def settings_from(data: dict[str, object]) -> Settings:
    """The probe's settings from a request body; ApiError 400 for anything wrong,
    worded as the CLI words it."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    implicit = data.get("implicit", False)
    if not isinstance(implicit, bool):
        raise ApiError(400, "implicit must be true or false")
    target_text = _text(data, "target")
    if target_text is None:
        raise ApiError(400, "target is required: host, host:port or [v6]:port")
    try:
        target = parse_target(target_text, implicit=implicit)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    timeout = data.get("timeout", 10)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 60:
        raise ApiError(400, "timeout must be a number of seconds, more than 0 and at most 60")
    user, password = _text(data, "user"), _text(data, "password")
    if (user is None) != (password is None):
        raise ApiError(400, "user and password go together")
    ca_pem = _text(data, "ca_pem", MAX_CA_PEM)
    if ca_pem is not None:
        try:
            ssl.create_default_context(cadata=ca_pem)
        except (ssl.SSLError, ValueError):
            raise ApiError(400, "ca_pem holds no PEM certificate") from None
    return Settings(
        target=target,
        timeout=float(timeout),
        servername=_text(data, "servername"),
        ca_pem=ca_pem,
        user=user,
        password=password,
    )


async def check(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    global _running
    settings = settings_from(await json_body(request))
    if _running >= AT_ONCE:
        raise ApiError(429, f"{AT_ONCE} checks are running already; try again when one ends")
    _running += 1
    logs.event("check.run", target=str(settings.target), by=caller.who)
    try:
        observations = await gather(settings)
    except Unreachable as exc:
        raise ApiError(502, f"cannot check {settings.target}: {clean(str(exc), 200)}") from None
    finally:
        _running -= 1
    document = report(settings.target.host, settings.target.port, evaluate(observations))
    return JSONResponse(document)


def routes() -> list[BaseRoute]:
    return [api_route("/api/v1/check", check, methods=("POST",), write=True)]
