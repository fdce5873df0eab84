"""SASL mechanisms as sans-IO step machines (RFC 4422).

A mechanism is fed decoded client responses and answers with the next step:
a challenge to send, credentials for the server to check, or a failure.
It never touches sockets, the database or the clock; base64 framing and the
``*`` cancel rule belong to the SMTP session, which owns the AUTH dialogue.
"""

from __future__ import annotations

from relaygate.sasl.mechanisms import (
    MECHANISMS,
    Challenge,
    Credentials,
    Malformed,
    Mechanism,
    Step,
    create,
)

__all__ = ["MECHANISMS", "Challenge", "Credentials", "Malformed", "Mechanism", "Step", "create"]
