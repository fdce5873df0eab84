"""The verdict on one bearer token (a JWT), given the keys and the time.

No I/O and no clock of its own, so every failure class is a plain unit test.
The order matters: the header is read without trusting it (size, algorithm,
key id), then the signature is checked with the one key the kid names, and
only a token whose signature holds has its claims looked at. A reason is a
stable code for logs (docs/logging.md); the token itself is never logged.

Reasons: ok, too_large, malformed, algorithm, key_unknown, signature,
issuer, audience, expired, not_before, claim_missing, email_unverified
(and keys_unavailable from OAuthTokens when no key set could be had).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt

from relaygate.config import OAuthConfig
from relaygate.oauth.keys import KeySet, family_of_algorithm

# Real tokens are 1-4 KB; this is about what fits in a 12,288-octet AUTH line.
MAX_TOKEN = 9216
MAX_ADDRESS = 320


@dataclass(frozen=True, slots=True)
class TokenCheck:
    reason: str  # "ok", or why not
    address: str | None = None  # the address claim of a valid token

    @property
    def ok(self) -> bool:
        return self.reason == "ok"


@dataclass(frozen=True, slots=True)
class Header:
    alg: str
    kid: str | None


class TokenVerifier:
    def __init__(self, config: OAuthConfig) -> None:
        self.config = config

    def header(self, token: str) -> Header | TokenCheck:
        """The unverified header's algorithm and key id, or why the token is refused already."""
        if len(token) > MAX_TOKEN:
            return TokenCheck("too_large")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
            return TokenCheck("malformed")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.config.algorithms:
            return TokenCheck("algorithm")  # none, HS*, or one not allowed here
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return TokenCheck("malformed")
        return Header(alg, kid)

    def verify(self, token: str, keys: KeySet, now: float) -> TokenCheck:
        header = self.header(token)
        if isinstance(header, TokenCheck):
            return header
        key = keys.find(header.kid, header.alg)
        if key is None:
            return TokenCheck("key_unknown")
        if key.family != family_of_algorithm(header.alg) or key.alg not in (None, header.alg):
            return TokenCheck("algorithm")  # e.g. an EC key named by an RS256 token
        config = self.config
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[header.alg],
                audience=list(config.audience),
                issuer=config.issuer,
                # Times are checked below against ``now``, not PyJWT's own clock.
                options={
                    "require": ["iss", "aud", "exp"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            return TokenCheck("signature")
        except jwt.InvalidAlgorithmError:
            return TokenCheck("algorithm")
        except jwt.MissingRequiredClaimError as exc:
            return TokenCheck({"iss": "issuer", "aud": "audience"}.get(exc.claim, "claim_missing"))
        except jwt.InvalidIssuerError:
            return TokenCheck("issuer")
        except jwt.InvalidAudienceError:
            return TokenCheck("audience")
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
            return TokenCheck("malformed")
        return self._claims(claims, now)

    def _claims(self, claims: dict[str, Any], now: float) -> TokenCheck:
        leeway = self.config.leeway
        expires = claims.get("exp")
        if not _number(expires):
            return TokenCheck("claim_missing")
        if now > expires + leeway:
            return TokenCheck("expired")
        not_before = claims.get("nbf")
        if not_before is not None:
            if not _number(not_before):
                return TokenCheck("malformed")
            if now + leeway < not_before:
                return TokenCheck("not_before")
        address = claims.get(self.config.address_claim)
        if (
            not isinstance(address, str)
            or not 3 <= len(address) <= MAX_ADDRESS
            or "@" not in address
            or not address.isprintable()
            or " " in address
        ):
            return TokenCheck("claim_missing")
        # An address the identity provider says it has not verified names
        # whoever typed it in: never an account.
        if self.config.address_claim == "email" and claims.get("email_verified") is False:
            return TokenCheck("email_unverified")
        return TokenCheck("ok", address)


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
