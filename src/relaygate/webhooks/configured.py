"""The [[webhooks]] of the config as endpoints (read-only ones: ``source = "config"``)."""

from __future__ import annotations

from collections.abc import Sequence

from relaygate.config import WebhookConfig
from relaygate.webhooks.events import Endpoint


def config_endpoints(hooks: Sequence[WebhookConfig], *, with_secrets: bool) -> list[Endpoint]:
    """The config's webhooks; their secrets read from their files when asked
    (the sender; the admin side never shows them)."""
    return [
        Endpoint(
            hook.id,
            hook.url,
            hook.events,
            hook.secret_file.read_text().strip() if with_secrets else "",
            "config",
        )
        for hook in hooks
    ]
