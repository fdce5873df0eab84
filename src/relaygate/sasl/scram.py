"""SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802, RFC 7677), server side.

The SCRAM maths and message syntax come from ``scramp``; this module only
fits it into our step protocol:

    client-first  -> NeedKeys(user)        the driver looks up the stored keys
    provide(keys) -> Challenge(server-first)
    client-final  -> Challenge(server-final) or Rejected
    "" (empty)    -> Verified(user)         RFC 4954: success data rides on a 334

For an unknown user the driver provides decoy keys, so the exchange looks
the same and fails only at the proof. Channel binding is tls-server-end-point
(RFC 5929): the hash of the certificate the server showed. A listener may
hold two certificates (ECDSA and RSA) and Python cannot tell which one a
handshake used, so we accept the client's binding if it names either of our
own certificates; a man in the middle would have shown a certificate of his.
"""

from __future__ import annotations

import base64

import scramp

from relaygate.sasl.steps import (
    Challenge,
    Malformed,
    NeedKeys,
    Rejected,
    Step,
    StoredKeys,
    Verified,
)

SCRAM_NAMES = ("SCRAM-SHA-256", "SCRAM-SHA-256-PLUS")
CHANNEL_BINDING = "tls-server-end-point"
DEFAULT_ITERATIONS = 10000


def stored_keys_for_password(password: str, iterations: int = DEFAULT_ITERATIONS) -> StoredKeys:
    """Derive what the server keeps for SCRAM when a password is set."""
    salt, stored_key, server_key, count = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=iterations
    )
    return StoredKeys(salt, stored_key, server_key, count)


def _unescape(name: str) -> str:
    return name.replace("=2C", ",").replace("=3D", "=")


class Scram:
    def __init__(self, *, plus: bool, channel_bindings: tuple[bytes, ...]) -> None:
        self.name = "SCRAM-SHA-256-PLUS" if plus else "SCRAM-SHA-256"
        self._plus = plus
        self._bindings = channel_bindings
        self._client_first = ""
        self._username = ""
        self._keys: StoredKeys | None = None
        self._server: scramp.core.ScramServer | None = None
        self._nonce = ""
        self._done = False

    def start(self, initial: bytes | None) -> Step:
        if initial is None or initial == b"":
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, response: bytes) -> Step:
        try:
            text = response.decode("utf-8")
        except UnicodeDecodeError:
            return Malformed("SCRAM message is not UTF-8")
        if not self._client_first:
            return self._first(text)
        if self._done:
            if text:
                return Malformed("expected an empty response after server-final")
            return Verified(self._username)
        return self._final(text)

    def _first(self, text: str) -> Step:
        parts = text.split(",", 3)
        if len(parts) < 4 or not parts[2].startswith("n="):
            return Malformed("malformed SCRAM client-first message")
        self._client_first = text
        self._username = _unescape(parts[2][2:])
        if not self._username:
            return Malformed("empty SCRAM user name")
        return NeedKeys(self._username)

    def _make_server(self, binding: bytes | None) -> scramp.core.ScramServer:
        keys = self._keys
        assert keys is not None

        def auth_fn(_: str) -> tuple[bytes, bytes, bytes, int]:
            return keys.salt, keys.stored_key, keys.server_key, keys.iterations

        mechanism = scramp.ScramMechanism(self.name)
        cb = (CHANNEL_BINDING, binding) if binding is not None else None
        server = mechanism.make_server(auth_fn, channel_binding=cb, s_nonce=self._nonce or None)
        server.set_client_first(self._client_first)
        return server

    def provide(self, keys: StoredKeys) -> Step:
        self._keys = keys
        binding = self._bindings[0] if self._bindings else None
        try:
            server = self._make_server(binding)
            server_first = server.get_server_first()
        except scramp.ScramException as exc:
            return Rejected(self._username, f"client-first: {exc}")
        self._server = server
        self._nonce = str(server.s_nonce)  # scramp gives a Nonce; make_server wants str
        return Challenge(server_first.encode())

    def _final(self, text: str) -> Step:
        server = self._server
        if server is None:
            return Malformed("SCRAM exchange out of order")
        chosen = self._binding_named_by(text)
        try:
            if chosen is not None and chosen != (self._bindings[0] if self._bindings else None):
                # The client bound to our other certificate: replay with it.
                server = self._make_server(chosen)
                server.get_server_first()
            server.set_client_final(text)
            server_final = server.get_server_final()
        except scramp.ScramException as exc:
            return Rejected(self._username, f"client-final: {exc}")
        self._done = True
        return Challenge(server_final.encode())

    def _binding_named_by(self, client_final: str) -> bytes | None:
        """Which of our certificates' bindings the client's c= attribute carries."""
        for attribute in client_final.split(","):
            if attribute.startswith("c="):
                try:
                    data = base64.b64decode(attribute[2:], validate=True)
                except ValueError:
                    return None
                for binding in self._bindings:
                    if data.endswith(binding) and data.startswith(b"p="):
                        return binding
                return None
        return None
