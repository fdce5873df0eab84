"""What the SMTP session reports to the code driving it.

Events that ask for a decision (AuthRequest, SenderRequest, RecipientRequest,
MessageReady) pause the session until the driver answers through the matching
``Session`` method; replies for pipelined commands therefore stay in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relaygate.sasl import BearerToken, Credentials, Rejected, Verified


@dataclass(slots=True)
class AuthRequest:
    """Decide a login; answer with ``auth_succeeded`` or ``auth_failed``.

    ``credentials`` is a password claim to check (PLAIN, LOGIN), or the
    verdict of a mechanism that checks the proof itself (SCRAM): Verified
    still needs the account to exist and be enabled; Rejected is a failure;
    BearerToken (OAUTHBEARER, XOAUTH2) is a token to verify: on failure answer
    ``auth_failed`` with the mechanism's error challenge.
    """

    mechanism: str
    credentials: Credentials | Verified | Rejected | BearerToken


@dataclass(slots=True)
class KeysRequest:
    """SCRAM needs the user's stored keys; answer with ``provide_keys``."""

    mechanism: str
    username: str


@dataclass(slots=True)
class SenderRequest:
    """MAIL FROM passed syntax checks; answer with ``accept_sender`` or ``refuse``."""

    address: str
    parameters: dict[str, str | None]


@dataclass(slots=True)
class RecipientRequest:
    """RCPT TO passed syntax checks; answer with ``accept_recipient`` or ``refuse``."""

    address: str


@dataclass(slots=True)
class MessageReady:
    """A complete, dot-unstuffed message; answer with ``message_queued`` or ``refuse``."""

    mail_from: str
    recipients: list[str]
    body: bytes | bytearray  # the session hands over its buffer: no copy of large bodies
    smtputf8: bool = False
    eight_bit: bool = False
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class StartTLS:
    """Send pending output, then upgrade the connection and call ``tls_started``."""


@dataclass(slots=True)
class Close:
    """Send pending output, then close the connection."""

    reason: str


@dataclass(slots=True)
class Refused:
    """A command was refused by the session itself (for logs and counters)."""

    command: str
    reply: bytes


Event = (
    AuthRequest
    | KeysRequest
    | SenderRequest
    | RecipientRequest
    | MessageReady
    | StartTLS
    | Close
    | Refused
)
