"""The admin API as an ASGI application (Starlette).

An edge like cli.py: it parses requests, calls the admin use cases
(services/admin.py) and serialises what they return; no rule and no SQL here.
Every /api/v1 request carries ``Authorization: Bearer <token>`` (``relaygate
token add``): none or an unknown one is 401, a read-only token on a write 403.
Errors are JSON ``{"error": "...", "detail": ...}``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relaygate.config import Config
from relaygate.json_views import attempt_json, message_json
from relaygate.services.admin import MessagesAdmin, NotFound, TokensAdmin
from relaygate.storage import bodies
from relaygate.storage.api import ApiToken
from relaygate.storage.errors import STORAGE_ERRORS
from relaygate.storage.node import open_admin_storage

MAX_LIST = 1000  # messages per page


@dataclass
class _Services:
    messages: MessagesAdmin
    tokens: TokensAdmin


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail


Handler = Callable[[Request, _Services, ApiToken], Awaitable[Response]]


def _endpoint(handler: Handler, *, write: bool = False) -> Callable[[Request], Awaitable[Response]]:
    """The token check every API route shares, then the handler."""

    async def endpoint(request: Request) -> Response:
        services: _Services = request.app.state.services
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        found = None
        if scheme.lower() == "bearer" and token.strip():
            found = await services.tokens.verify(token.strip())
        if found is None:
            raise ApiError(401, "a valid API token is needed (Authorization: Bearer <token>)")
        if write and found.read_only:
            raise ApiError(403, f"token {found.name} is read-only")
        return await handler(request, services, found)

    return endpoint


async def _messages(request: Request, services: _Services, token: ApiToken) -> Response:
    text = request.query_params.get("limit", "50")
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIST:
        raise ApiError(400, f"limit must be a whole number from 1 to {MAX_LIST}", text)
    records = await services.messages.recent(int(text))
    return JSONResponse({"messages": [message_json(r) for r in records]})


async def _message(request: Request, services: _Services, token: ApiToken) -> Response:
    view = await services.messages.show(request.path_params["message_id"], body=False)
    return JSONResponse(
        {**message_json(view.record), "history": [attempt_json(a) for a in view.history]}
    )


async def _message_raw(request: Request, services: _Services, token: ApiToken) -> Response:
    view = await services.messages.show(request.path_params["message_id"])
    if view.body is None:
        raise ApiError(404, f"message {view.record.id} has no stored body")
    return Response(
        view.body,
        media_type="message/rfc822",
        headers={"Content-Disposition": f'attachment; filename="{view.record.id}.eml"'},
    )


def _json_error(status: int, error: str, detail: Any = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    response = _json_error(exc.status, exc.error, exc.detail)
    if headers:
        response.headers.update(headers)
    return response


async def _not_found(request: Request, exc: Exception) -> Response:
    return _json_error(404, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _json_error(exc.status_code, str(exc.detail))


async def _storage_error(request: Request, exc: Exception) -> Response:
    return _json_error(503, "the database is unavailable, try again", type(exc).__name__)


async def _body_missing(request: Request, exc: Exception) -> Response:
    return _json_error(404, str(exc))


def create_app(config: Config) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = await open_admin_storage(config)
        app.state.services = _Services(
            MessagesAdmin(store.messages), TokensAdmin(store.tokens, store.secrets)
        )
        try:
            yield
        finally:
            await store.close()

    routes = [
        Route("/api/v1/messages", _endpoint(_messages)),
        Route("/api/v1/messages/{message_id}", _endpoint(_message)),
        Route("/api/v1/messages/{message_id}/raw", _endpoint(_message_raw)),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        ApiError: _api_error,
        NotFound: _not_found,
        HTTPException: _http_error,
        bodies.BodyMissing: _body_missing,
    }
    for error in STORAGE_ERRORS:
        handlers[error] = _storage_error
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
