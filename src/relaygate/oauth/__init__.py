"""OAuth 2.0 bearer tokens (JWTs) for OAUTHBEARER and XOAUTH2 logins.

- ``keys``: a JWKS document read into public keys, bounded and filtered.
- ``tokens``: the verdict on one token against a key set at a given time
  (no I/O, no clock of its own).
- ``jwks``: where the key set comes from (``[oauth] jwks_url`` or ``jwks_file``)
  and how it is kept fresh: refreshed now and then, fetched again for an
  unknown key id at most once per ``jwks_min_interval``, the last good set
  kept when a fetch fails.

``OAuthTokens`` joins them for the login service.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from relaygate.config import OAuthConfig
from relaygate.oauth.jwks import JwksSource
from relaygate.oauth.keys import KeySet
from relaygate.oauth.tokens import TokenCheck, TokenVerifier

__all__ = ["JwksSource", "KeySet", "OAuthTokens", "TokenCheck", "TokenVerifier"]

# Runs the signature check somewhere (a thread pool): it costs 100-200 us of CPU.
Offload = Callable[
    [Callable[[str, KeySet, float], TokenCheck], str, KeySet, float], Awaitable[TokenCheck]
]


class OAuthTokens:
    """Verify a bearer token: header first (cheap), then the keys, then the signature."""

    def __init__(self, config: OAuthConfig, source: JwksSource | None = None) -> None:
        self.config = config
        self.verifier = TokenVerifier(config)
        self.source = source if source is not None else JwksSource(config)

    async def start(self, wait: bool = True) -> None:
        await self.source.start(wait)

    async def close(self) -> None:
        await self.source.close()

    async def check(self, token: str, offload: Offload | None = None) -> TokenCheck:
        header = self.verifier.header(token)
        if isinstance(header, TokenCheck):
            return header  # too large, malformed, or an algorithm we never accept
        keys = await self.source.keys_for(header.kid)
        if not keys:
            return TokenCheck("keys_unavailable")
        if offload is None:
            return self.verifier.verify(token, keys, time.time())
        return await offload(self.verifier.verify, token, keys, time.time())
