"""POST /api/v1/verify {"addresses": [...], "smtp": false}: the same checks and
objects as ``relaygate verify --json`` (docs/verify.md), for at most
[verify] max_api_addresses addresses a request. Any token may ask for the DNS
checks; SMTP probes reach out to other people's servers, so ``smtp: true``
needs a token that is not read-only."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from relaygate.http.api import ApiError, api_route, json_body
from relaygate.http.context import Caller, HttpContext
from relaygate.verify.verifier import Verifier

MAX_ADDRESS_TEXT = 1000  # characters of one item: longer is no address


def _verifier(request: Request, ctx: HttpContext) -> Verifier:
    """One per HTTP process, made again when a reload brings a new config."""
    found: Verifier | None = getattr(request.app.state, "verifier", None)
    if found is None or found.config is not ctx.config:
        found = Verifier(ctx.config)
        request.app.state.verifier = found
    return found


async def verify(request: Request, ctx: HttpContext, caller: Caller) -> Response:
    data = await json_body(request)
    unknown = sorted(set(data) - {"addresses", "smtp"})
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r} (fields: addresses, smtp)")
    addresses = data.get("addresses")
    smtp = data.get("smtp", False)
    if not isinstance(smtp, bool):
        raise ApiError(400, "smtp must be true or false")
    if (
        not isinstance(addresses, list)
        or not addresses
        or not all(isinstance(a, str) and 0 < len(a) <= MAX_ADDRESS_TEXT for a in addresses)
    ):
        raise ApiError(400, "addresses must be a non-empty list of address strings")
    limit = ctx.config.verify.max_api_addresses
    if len(addresses) > limit:
        raise ApiError(
            400,
            f"at most {limit} addresses a request ([verify] max_api_addresses)",
            {"given": len(addresses), "max": limit},
        )
    if smtp and caller.read_only:
        raise ApiError(403, f"token {caller.name} is read-only: SMTP probes need a write token")
    verdicts = await _verifier(request, ctx).verify(addresses, smtp=smtp)
    return JSONResponse({"results": [v.as_json() for v in verdicts]})


def routes() -> list[BaseRoute]:
    return [api_route("/api/v1/verify", verify, methods=("POST",))]
