"""The HTTP edge as one ASGI application (Starlette): the admin API under
/api/v1 (http/api*.py) and the web UI (http/ui/). An edge like cli.py: it parses requests, calls the
admin use cases (services/admin.py) and serialises what they return; no rule
and no SQL here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from relaygate.accounts.passwords import PasswordHasher
from relaygate.config import Config
from relaygate.http import (
    api_admin,
    api_check,
    api_held,
    api_messages,
    api_stats,
    api_verify,
    api_webhooks,
    health,
    openapi,
)
from relaygate.http import metrics as metrics_route
from relaygate.http.api import error_handlers
from relaygate.http.context import HttpContext
from relaygate.http.limits import BodyLimit
from relaygate.http.ui import auth, dashboard, held, manage, messages, webhooks
from relaygate.services.admin import admin_services
from relaygate.services.login import LoginService
from relaygate.services.web_login import WebLogin
from relaygate.storage.node import HTTP_POOL_SIZE, open_admin_storage, open_login_failures


def create_app(config: Config) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        store = await open_admin_storage(config, HTTP_POOL_SIZE)
        failures, close_failures = await open_login_failures(config, loop)
        logins = LoginService(
            accounts=store.accounts,
            credentials=store.credentials,
            failures=failures,
            throttle_config=config.auth_throttle,
            hasher=PasswordHasher(config.password_hash),
            decoy_key=await LoginService.decoy_key(store.secrets),
            loop=loop,
        )
        app.state.context = HttpContext(
            config,
            admin_services(
                store,
                config.password_hash,
                config.webhooks,
                config.http is not None and config.http.allow_private_targets,
            ),
            logins,
            failures,
            WebLogin(store.accounts, store.sessions, store.secrets, logins),
        )
        try:
            yield
        finally:
            logins.close()
            await close_failures()
            await store.close()

    routes: list[BaseRoute] = [
        *api_messages.routes(),
        *api_stats.routes(),
        *api_admin.routes(),
        *api_webhooks.routes(),
        *api_check.routes(),
        *api_held.routes(),
        *api_verify.routes(),
        *openapi.routes(),
        *health.routes(),
        *metrics_route.routes(config),
        *auth.routes(),
        *dashboard.routes(),
        *messages.routes(),
        *manage.routes(),
        *webhooks.routes(),
        *held.routes(),
        Mount("/ui/static", StaticFiles(packages=[("relaygate.http.ui", "static")]), name="static"),
    ]
    return Starlette(
        routes=routes,
        exception_handlers=error_handlers(),
        lifespan=lifespan,
        middleware=[Middleware(BodyLimit)],
    )
