"""SASL mechanisms as sans-IO step machines (RFC 4422).

A mechanism is fed decoded client responses and answers with the next step:
a challenge to send, credentials for the server to check, a request for the
user's stored SCRAM keys, a verdict, or a syntax failure. It never touches
sockets, the database or the clock; base64 framing and the ``*`` cancel rule
belong to the SMTP session, which owns the AUTH dialogue.
"""

from __future__ import annotations

from relaygate.sasl.mechanisms import Login, Plain
from relaygate.sasl.oauth import BEARER_MECHANISMS, OAuthBearer, XOAuth2, failure_challenge
from relaygate.sasl.scram import SCRAM_NAMES, Scram, stored_keys_for_password
from relaygate.sasl.steps import (
    BearerToken,
    Challenge,
    Credentials,
    Malformed,
    Mechanism,
    NeedKeys,
    Rejected,
    Step,
    StoredKeys,
    Verified,
)

__all__ = [
    "BEARER_MECHANISMS",
    "SCRAM_NAMES",
    "BearerToken",
    "Challenge",
    "Credentials",
    "Malformed",
    "Mechanism",
    "NeedKeys",
    "Rejected",
    "Step",
    "StoredKeys",
    "Verified",
    "create",
    "failure_challenge",
    "stored_keys_for_password",
]


def create(name: str, channel_bindings: tuple[bytes, ...] = ()) -> Mechanism | None:
    """A fresh mechanism object for ``name``; None if we do not offer it.

    ``channel_bindings``: tls-server-end-point data of every certificate the
    listener may have shown (RFC 5929); SCRAM-...-PLUS needs at least one.
    """
    name = name.upper()
    if name == "PLAIN":
        return Plain()
    if name == "LOGIN":
        return Login()
    if name == "OAUTHBEARER":
        return OAuthBearer()
    if name == "XOAUTH2":
        return XOAuth2()
    if name in SCRAM_NAMES:
        plus = name.endswith("-PLUS")
        if plus and not channel_bindings:
            return None
        return Scram(plus=plus, channel_bindings=channel_bindings)
    return None
