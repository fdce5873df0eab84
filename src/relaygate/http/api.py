"""The plumbing every /api/v1 route shares: the bearer-token check (throttled
like SMTP logins), JSON errors ``{"error": "...", "detail": ...}``, and the log
line every write leaves behind with who made it."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relaygate import logs
from relaygate.accounts.credentials import CredentialError
from relaygate.accounts.store import AccountError
from relaygate.delivery.dkim import DKIMError
from relaygate.http.context import Caller, HttpContext
from relaygate.services.admin import NotFound, TokenError
from relaygate.services.errors import error_kind
from relaygate.storage import bodies
from relaygate.storage.errors import STORAGE_ERRORS
from relaygate.throttle import Reservation, Verdict, Wait

# Failed token attempts count in the failed-login windows under this user name:
# the per-address and per-network rules apply as to SMTP AUTH, and the
# "account" rule limits guessing from networks that never used a good token.
TOKEN_USER = "<api-token>"
SUCCESS_EVERY = 60.0  # seconds between "this network used a good token" writes


class ApiError(Exception):
    def __init__(
        self, status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers


Handler = Callable[[Request, HttpContext, Caller], Awaitable[Response]]


def context(request: Request) -> HttpContext:
    found: HttpContext = request.app.state.context
    return found


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "0.0.0.0"


def _throttled(verdict: Verdict) -> ApiError:
    seconds = max(1, int(verdict.retry_after + 0.999))
    return ApiError(
        429,
        "too many failed logins from your address; try again later",
        {"retry_after": seconds},
        {"Retry-After": str(seconds)},
    )


_successes: dict[str, float] = {}  # client ip -> when its good token was last recorded


async def token_caller(request: Request, ctx: HttpContext) -> Caller:
    """The token's caller; ApiError 401 (none or a bad one) or 429 (throttled)."""
    scheme, _, text = request.headers.get("authorization", "").partition(" ")
    text = text.strip()
    ip = client_ip(request)
    now = time.time()
    found = None
    if scheme.lower() == "bearer" and text:
        found = await ctx.admin.tokens.verify(text)
    if found is not None:
        verdict = await ctx.failures.check(ip, TOKEN_USER, now)
        if verdict is not None:
            raise _throttled(verdict)
        if now - _successes.get(ip, 0.0) > SUCCESS_EVERY:
            _successes[ip] = now
            if len(_successes) > 10000:
                _successes.clear()
            await ctx.failures.record_success(ip, TOKEN_USER, now)
        return Caller("token", found.name, read_only=found.read_only)
    if text:  # a token was offered and is wrong: a failed login
        answer = await ctx.failures.reserve(ip, TOKEN_USER, now)
        if isinstance(answer, Verdict):
            logs.event("api.auth_failed", logging.WARNING, ip=ip, result="throttled")
            raise _throttled(answer)
        if isinstance(answer, Reservation):
            await ctx.failures.fail(answer)
        elif isinstance(answer, Wait):
            pass  # others' attempts in flight: this one is refused all the same
        logs.event("api.auth_failed", logging.WARNING, ip=ip, result="failed")
    raise ApiError(
        401,
        "a valid API token is needed (Authorization: Bearer <token>)",
        headers={"WWW-Authenticate": "Bearer"},
    )


def api_route(
    path: str, handler: Handler, *, methods: Sequence[str] = ("GET",), write: bool = False
) -> Route:
    """A route under the token check: a read-only token on a write is 403."""

    async def endpoint(request: Request) -> Response:
        ctx = context(request)
        caller = await token_caller(request, ctx)
        if write and caller.read_only:
            raise ApiError(403, f"token {caller.name} is read-only")
        return await handler(request, ctx, caller)

    return Route(path, endpoint, methods=list(methods))


def audit(caller: Caller, action: str, **fields: Any) -> None:
    """Every change made over HTTP leaves one log line naming who made it."""
    logs.event("admin.change", action=action, by=caller.who, **fields)


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; ApiError 400 when it is not one."""
    try:
        data = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can parse
        raise ApiError(400, "the request body must be a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def json_error(status: int, error: str, detail: Any = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    response = json_error(exc.status, exc.error, exc.detail)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _not_found(request: Request, exc: Exception) -> Response:
    return json_error(404, str(exc))


async def _bad_request(request: Request, exc: Exception) -> Response:
    # The use cases word their errors for people; error_kind says what kind they are.
    status = {"missing": 404, "conflict": 409, "invalid": 400}[error_kind(exc)]
    return json_error(status, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return json_error(exc.status_code, str(exc.detail))


async def _storage_error(request: Request, exc: Exception) -> Response:
    return json_error(503, "the database is unavailable, try again", type(exc).__name__)


ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


def error_handlers() -> dict[Any, ErrorHandler]:
    handlers: dict[Any, ErrorHandler] = {
        ApiError: _api_error,
        NotFound: _not_found,
        HTTPException: _http_error,
        bodies.BodyMissing: _not_found,
        AccountError: _bad_request,
        CredentialError: _bad_request,
        DKIMError: _bad_request,
        TokenError: _bad_request,
    }
    for error in STORAGE_ERRORS:
        handlers[error] = _storage_error
    return handlers
