"""PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login) mechanisms."""

from __future__ import annotations

from relaygate.sasl.steps import Challenge, Credentials, Malformed, Step, StoredKeys


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class _PasswordMechanism:
    """Mechanisms that hand the password to the server never ask for keys."""

    def provide(self, keys: StoredKeys) -> Step:
        return Malformed("unexpected key look-up")


class Plain(_PasswordMechanism):
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


class Login(_PasswordMechanism):
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
