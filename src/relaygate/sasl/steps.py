"""The steps a SASL mechanism answers with, and the interface every mechanism has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``data`` to the client (base64-encoded in a 334 reply)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Credentials:
    """The client's claim; the server checks it. ``password`` never gets logged."""

    username: str
    password: str = ""
    authzid: str = ""

    def __repr__(self) -> str:  # keep secrets out of tracebacks and logs
        return f"Credentials(username={self.username!r}, authzid={self.authzid!r})"


@dataclass(frozen=True, slots=True)
class Malformed:
    """The response breaks the mechanism's syntax (501 5.5.2)."""

    reason: str


@dataclass(frozen=True, slots=True)
class NeedKeys:
    """SCRAM: look up the stored keys for ``username`` and call ``provide``."""

    username: str


@dataclass(frozen=True, slots=True)
class Verified:
    """The mechanism itself proved the client knows the password (SCRAM)."""

    username: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """The mechanism itself found the proof wrong (SCRAM): a failed login."""

    username: str
    reason: str


@dataclass(frozen=True, slots=True)
class BearerToken:
    """OAUTHBEARER / XOAUTH2: a token for the server to verify.

    ``user`` is the address the client names (``a=`` / ``user=``; may be empty):
    it must match the token's. The token never gets logged.
    """

    user: str
    token: str

    @property
    def username(self) -> str:
        return self.user

    def __repr__(self) -> str:
        return f"BearerToken(user={self.user!r})"


@dataclass(frozen=True, slots=True)
class StoredKeys:
    """What SCRAM keeps instead of a password (RFC 5802 section 3)."""

    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int

    def __repr__(self) -> str:
        return f"StoredKeys(iterations={self.iterations})"


Step = Challenge | Credentials | Malformed | NeedKeys | Verified | Rejected | BearerToken


class Mechanism(Protocol):
    name: str

    def start(self, initial: bytes | None) -> Step:
        """Begin; ``initial`` is the decoded initial response if one was sent."""
        ...

    def respond(self, response: bytes) -> Step:
        """Continue with the client's decoded answer to our last challenge."""
        ...

    def provide(self, keys: StoredKeys) -> Step:
        """Continue after NeedKeys with the user's stored keys (or decoys)."""
        ...
