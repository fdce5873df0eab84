"""Webhook admin use cases (list, add, change, remove, test, attempts), for
every edge: the HTTP API today, a CLI or the web UI next."""

from __future__ import annotations

import builtins
import secrets
import time
from collections.abc import Sequence

from relaygate.config import WebhookConfig
from relaygate.storage.api import WebhookAttempt, WebhookNotFound, Webhooks
from relaygate.webhooks import events as ev
from relaygate.webhooks.configured import config_endpoints
from relaygate.webhooks.events import Endpoint
from relaygate.webhooks.notices import enqueue
from relaygate.webhooks.signing import SecretError, new_secret, secret_key
from relaygate.webhooks.targets import TargetError, check_url

MAX_ATTEMPTS_SHOWN = 200


class WebhookError(ValueError):
    """Input a user can fix (a bad URL, event name or secret); the text says what."""


class WebhookMissing(LookupError):
    """No webhook of that id."""


class ConfigDefined(PermissionError):
    """A [[webhooks]] entry of the config: change it there."""


def check_events(events: object) -> tuple[str, ...]:
    if events is None:
        return ()
    if not isinstance(events, list | tuple) or not all(isinstance(e, str) for e in events):
        raise WebhookError("events must be a list of event names")
    unknown = [e for e in events if e not in ev.EVENTS]
    if unknown:
        raise WebhookError(f"unknown event {unknown[0]!r} (known: {', '.join(ev.EVENTS)})")
    return tuple(dict.fromkeys(events))


class WebhooksAdmin:
    def __init__(
        self, store: Webhooks, configured: Sequence[WebhookConfig], allow_private: bool
    ) -> None:
        self._store = store
        self._configured = config_endpoints(configured, with_secrets=False)
        self._allow_private = allow_private

    def reconfigure(self, configured: Sequence[WebhookConfig]) -> None:
        """A reload: the [[webhooks]] the file lists now."""
        self._configured = config_endpoints(configured, with_secrets=False)

    def _check_url(self, url: object) -> str:
        if not isinstance(url, str) or not url.strip():
            raise WebhookError("url must be an http:// or https:// URL")
        try:
            check_url(url.strip(), self._allow_private)
        except TargetError as exc:
            raise WebhookError(str(exc)) from None
        return url.strip()

    async def list(self) -> list[Endpoint]:
        """Config-defined first, then those made through the API (secrets not shown)."""
        made = [_public(e) for e in await self._store.endpoints()]
        return [*self._configured, *made]

    async def get(self, endpoint_id: str) -> Endpoint:
        for endpoint in await self.list():
            if endpoint.id == endpoint_id:
                return endpoint
        raise WebhookMissing(f"no webhook {endpoint_id!r}")

    async def create(
        self, url: object, events: object, secret: object = None
    ) -> tuple[Endpoint, str]:
        """The new webhook and its secret (shown to the caller this once)."""
        checked = self._check_url(url)
        wanted = check_events(events)
        if secret is None:
            secret = new_secret()
        elif not isinstance(secret, str):
            raise WebhookError("secret must be a string like whsec_<base64>")
        try:
            secret_key(secret)
        except SecretError as exc:
            raise WebhookError(str(exc)) from None
        endpoint = Endpoint(
            "wh_" + secrets.token_hex(8), checked, wanted, secret.strip(), "api", time.time()
        )
        await self._store.add(endpoint)
        return _public(endpoint), secret.strip()

    async def update(self, endpoint_id: str, url: object = None, events: object = None) -> Endpoint:
        await self._writable(endpoint_id)
        checked = None if url is None else self._check_url(url)
        wanted = None if events is None else check_events(events)
        try:
            return _public(await self._store.update(endpoint_id, checked, wanted))
        except WebhookNotFound:
            raise WebhookMissing(f"no webhook {endpoint_id!r}") from None

    async def delete(self, endpoint_id: str) -> None:
        await self._writable(endpoint_id)
        if not await self._store.remove(endpoint_id):
            raise WebhookMissing(f"no webhook {endpoint_id!r}")

    async def test(self, endpoint_id: str) -> str:
        """Queue a webhook.test event for this endpoint only; its webhook-id."""
        await self.get(endpoint_id)
        event = ev.ping_event(endpoint_id)
        await self._store.enqueue(endpoint_id, event, time.time())
        return event.id

    async def announce(self, event_type: str, key: str, data: dict[str, object]) -> None:
        """Queue an event an admin's action raised for every webhook that wants it
        (config-defined and API-made); the sender delivers it like any other."""
        now = time.time()
        event = ev.keyed_event(event_type, key, int(now * 1000), data, now)
        await enqueue(self._store, await self.list(), event, now)

    async def attempts(self, endpoint_id: str, limit: int = 50) -> builtins.list[WebhookAttempt]:
        await self.get(endpoint_id)
        return await self._store.attempts(endpoint_id, min(limit, MAX_ATTEMPTS_SHOWN))

    async def _writable(self, endpoint_id: str) -> None:
        if any(e.id == endpoint_id for e in self._configured):
            raise ConfigDefined(f"webhook {endpoint_id} is defined in the config; change it there")


def _public(endpoint: Endpoint) -> Endpoint:
    return Endpoint(
        endpoint.id, endpoint.url, endpoint.events, "", endpoint.source, endpoint.created_at
    )
