"""PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login) mechanisms."""

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


Step = Challenge | Credentials | Malformed


class Mechanism(Protocol):
    name: str

    def start(self, initial: bytes | None) -> Step:
        """Begin; ``initial`` is the decoded initial response if one was sent."""
        ...

    def respond(self, response: bytes) -> Step:
        """Continue with the client's decoded answer to our last challenge."""
        ...


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class Plain:
    name = "PLAIN"

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, response: bytes) -> Step:
        parts = response.split(b"\0")
        if len(parts) != 3:
            return Malformed("PLAIN needs authzid NUL authcid NUL password")
        authzid, username, password = (_text(p) for p in parts)
        if authzid is None or username is None or password is None:
            return Malformed("PLAIN response is not UTF-8")
        if not username or not password:
            return Malformed("PLAIN needs a user name and a password")
        return Credentials(username, password, authzid)


class Login:
    name = "LOGIN"

    def __init__(self) -> None:
        self._username: str | None = None

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"Username:")
        return self.respond(initial)

    def respond(self, response: bytes) -> Step:
        text = _text(response)
        if text is None:
            return Malformed("LOGIN response is not UTF-8")
        if self._username is None:
            self._username = text
            return Challenge(b"Password:")
        return Credentials(self._username, text)


MECHANISMS: dict[str, type[Plain] | type[Login]] = {"PLAIN": Plain, "LOGIN": Login}


def create(name: str) -> Mechanism | None:
    factory = MECHANISMS.get(name.upper())
    return factory() if factory is not None else None
