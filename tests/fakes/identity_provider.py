"""A stand-in OAuth identity provider: signing keys, tokens, and a JWKS over HTTP.

``SigningKey`` makes a key pair (RSA, EC P-256 or Ed25519) and signs JWTs
with it; ``JwksServer`` serves a JWKS document on 127.0.0.1 over plain HTTP
(relaygate allows http:// jwks_url on loopback only) from a thread, counts the
requests, and can be told to fail, to answer slowly, or to serve other keys
(rotation)::

    key = SigningKey.rsa("k1")
    with JwksServer([key]) as idp:
        token = key.token(ISSUER, AUDIENCE, "alice@example.test")
        ...  # [oauth] jwks_url = idp.url

Tokens are made with PyJWT for valid ones and by hand for the hostile ones
(``alg: none``, HS256 with the public key as the HMAC secret): PyJWT itself
refuses to sign those.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ISSUER = "https://sso.example.test/realms/mail"
AUDIENCE = "relaygate"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    @classmethod
    def rsa(cls, kid: str, alg: str = "RS256", bits: int = 2048) -> SigningKey:
        return cls(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=bits))

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def ed25519(cls, kid: str) -> SigningKey:
        return cls(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())

    def jwk(self, with_alg: bool = True) -> dict[str, Any]:
        """The public JWK, as a provider publishes it."""
        algorithm = jwt.get_algorithm_by_name(self.alg)
        document: dict[str, Any] = json.loads(algorithm.to_jwk(self.private.public_key()))
        document.update(kid=self.kid, use="sig")
        if with_alg:
            document["alg"] = self.alg
        return document

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(  # type: ignore[no-any-return]
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(
        self,
        issuer: str = ISSUER,
        audience: str | list[str] = AUDIENCE,
        email: Any = "alice@example.test",
        *,
        lifetime: float = 300.0,
        now: float | None = None,
        kid: str | None = "",
        **claims: Any,
    ) -> str:
        """A token signed by this key (``kid=""``: this key's id; None: no kid)."""
        now = time.time() if now is None else now
        payload: dict[str, Any] = {
            "iss": issuer,
            "aud": audience,
            "sub": "user-1",
            "iat": int(now),
            "exp": int(now + lifetime),
        }
        if email is not None:
            payload["email"] = email
        payload.update(claims)
        headers = {} if kid is None else {"kid": kid or self.kid}
        token: str = jwt.encode(payload, self.private, algorithm=self.alg, headers=headers)
        if kid is None:
            # PyJWT adds no kid unless asked; make sure none is there.
            header = json.loads(base64.urlsafe_b64decode(token.split(".", maxsplit=1)[0] + "=="))
            assert "kid" not in header
        return token


def unsigned_token(claims: dict[str, Any], kid: str = "k1") -> str:
    """``alg: none``: a token anyone can make."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


def hmac_token(claims: dict[str, Any], secret: bytes, kid: str = "k1") -> str:
    """HS256 with ``secret`` (the classic attack: the public key's PEM as the secret)."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64url(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64url(signature)}"


def claims(email: str = "alice@example.test", lifetime: float = 300.0) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "email": email, "iat": now, "exp": now + lifetime}


class JwksServer:
    """Serves ``/jwks.json`` on 127.0.0.1 from a thread; bounded in every wait."""

    def __init__(self, keys: Sequence[SigningKey] = ()) -> None:
        self.document: bytes = b""
        self.status = 200
        self.delay = 0.0  # seconds before answering (a slow provider)
        self.requests = 0
        self._lock = threading.Lock()
        self.serve(keys)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.requests += 1
                    status, body, delay = owner.status, owner.document, owner.delay
                if delay:
                    time.sleep(delay)
                if self.path != "/jwks.json":
                    status, body = 404, b"not found"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}/jwks.json"

    def serve(self, keys: Sequence[SigningKey], *, with_alg: bool = True) -> None:
        """Publish these keys from now on (a rotation)."""
        self.serve_raw(json.dumps({"keys": [k.jwk(with_alg) for k in keys]}).encode())

    def serve_raw(self, document: bytes, status: int = 200) -> None:
        with self._lock:
            self.document = document
            self.status = status

    def __enter__(self) -> JwksServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
