"""OAUTHBEARER (RFC 7628) and XOAUTH2 (Google's): a client proves who it is
with an OAuth 2.0 bearer token; the server verifies it (relaygate/oauth/).

OAUTHBEARER's message is a GS2 header then key/value pairs, each ended by ^A:

    n,a=user@example.com,^Ahost=...^Aport=...^Aauth=Bearer <token>^A^A

XOAUTH2's is ``user=<address>^Aauth=Bearer <token>^A^A``. Both may come as the
AUTH line's initial response or after an empty 334. On a bad token the server
sends an error challenge (a JSON document, ``failure_challenge``), the client
answers with a dummy response (^A for OAUTHBEARER, an empty line for
XOAUTH2), and only then does the 535 come (RFC 7628 section 3.2.3); the SMTP
session runs that last step.
"""

from __future__ import annotations

import json

from relaygate.sasl.steps import BearerToken, Challenge, Malformed, Step, StoredKeys

BEARER_MECHANISMS = ("OAUTHBEARER", "XOAUTH2")
_MAX_USER = 320


def _pairs(text: str) -> dict[str, str] | None:
    """``key=value^A...^A^A`` (the final empty pair ends it) as a dict."""
    if not text.endswith("\x01\x01"):
        return None
    found: dict[str, str] = {}
    for item in text[:-2].split("\x01"):
        key, sep, value = item.partition("=")
        if not sep or not key or not key.isalpha() or key in found:
            return None
        found[key] = value
    return found


def _bearer(pairs: dict[str, str]) -> str | None:
    scheme, _, token = pairs.get("auth", "").partition(" ")
    token = token.strip(" ")
    if scheme.lower() != "bearer" or not token or not token.isascii() or not token.isprintable():
        return None
    return token


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _plausible_user(user: str) -> bool:
    return len(user) <= _MAX_USER and user.isprintable()


class _BearerMechanism:
    name = ""

    def start(self, initial: bytes | None) -> Step:
        if initial is None or initial == b"":
            return Challenge(b"")  # RFC 4954: "=" is an empty initial response
        return self.respond(initial)

    def respond(self, response: bytes) -> Step:
        text = _text(response)
        if text is None:
            return Malformed(f"{self.name} response is not UTF-8")
        return self.parse(text)

    def parse(self, text: str) -> Step:
        raise NotImplementedError

    def provide(self, keys: StoredKeys) -> Step:
        return Malformed("unexpected key look-up")


class OAuthBearer(_BearerMechanism):
    name = "OAUTHBEARER"

    def parse(self, text: str) -> Step:
        # gs2-header: cbind-flag "," [authzid] ","; channel binding is not offered.
        flag, sep, rest = text.partition(",")
        if not sep or flag not in ("n", "y"):
            return Malformed("OAUTHBEARER needs a GS2 header n,... (no channel binding)")
        authzid, sep, rest = rest.partition(",")
        if not sep or not rest.startswith("\x01"):
            return Malformed("OAUTHBEARER GS2 header is malformed")
        user = ""
        if authzid:
            if not authzid.startswith("a="):
                return Malformed("OAUTHBEARER authzid must be a=...")
            named = _saslname(authzid[2:])
            if not named or not _plausible_user(named):
                return Malformed("OAUTHBEARER authzid is malformed")
            user = named
        pairs = _pairs(rest[1:])
        token = _bearer(pairs) if pairs is not None else None
        if token is None:
            return Malformed("OAUTHBEARER needs auth=Bearer <token>")
        return BearerToken(user, token)


class XOAuth2(_BearerMechanism):
    name = "XOAUTH2"

    def parse(self, text: str) -> Step:
        pairs = _pairs(text)
        if pairs is None or not pairs.get("user") or not _plausible_user(pairs["user"]):
            return Malformed("XOAUTH2 needs user=<address>^Aauth=Bearer <token>^A^A")
        token = _bearer(pairs)
        if token is None:
            return Malformed("XOAUTH2 needs auth=Bearer <token>")
        return BearerToken(pairs["user"], token)


def _saslname(text: str) -> str | None:
    """RFC 5801: "=2C" is ",", "=3D" is "="; any other "=" is an error."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "=":
            code = text[i + 1 : i + 3]
            if code not in ("2C", "3D"):
                return None
            out.append("," if code == "2C" else "=")
            i += 3
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def failure_challenge(mechanism: str, scope: str | None, issuer: str | None) -> bytes:
    """The error challenge sent on a bad token, before the final 535.

    OAUTHBEARER: RFC 7628 section 3.2.2 (status, scope, openid-configuration).
    XOAUTH2: what Gmail sends (status 401, schemes, scope).
    """
    document: dict[str, str]
    if mechanism.upper() == "XOAUTH2":
        document = {"status": "401", "schemes": "Bearer"}
        if scope:
            document["scope"] = scope
    else:
        document = {"status": "invalid_token", "schemes": "bearer"}
        if scope:
            document["scope"] = scope
        if issuer:
            document["openid-configuration"] = (
                issuer.rstrip("/") + "/.well-known/openid-configuration"
            )
    return json.dumps(document, separators=(",", ":")).encode()
