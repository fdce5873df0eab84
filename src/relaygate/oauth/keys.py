"""A JWKS document (RFC 7517) read into the public keys tokens may be signed with.

Only signing keys of the kinds [oauth] algorithms can use are kept: RSA (2048
bits at least), EC P-256 / P-384, Ed25519. Symmetric ("oct") keys and private
key material are dropped: a JWKS published by an identity provider holds
public keys, and an HMAC key in it would let anyone who reads it sign tokens.
At most MAX_KEYS keys and MAX_JWKS_BYTES of JSON are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

MAX_KEYS = 32
MAX_JWKS_BYTES = 256 * 1024
MIN_RSA_BITS = 2048
_MAX_KID = 256


class JwksError(ValueError):
    """The document is not a usable JWKS (the message says why, without its content)."""


def family_of_algorithm(alg: str) -> str:
    """The kind of key an algorithm needs: RSA, EC:P-256, EC:P-384 or OKP."""
    if alg.startswith(("RS", "PS")):
        return "RSA"
    if alg == "ES256":
        return "EC:P-256"
    if alg == "ES384":
        return "EC:P-384"
    if alg == "EdDSA":
        return "OKP"
    return "?"


@dataclass(frozen=True, slots=True)
class PublicKey:
    kid: str | None
    family: str  # as family_of_algorithm names it
    alg: str | None  # the JWK's own "alg", when it names one
    key: Any  # a cryptography public key object

    def __repr__(self) -> str:
        return f"PublicKey(kid={self.kid!r}, family={self.family!r}, alg={self.alg!r})"


class KeySet:
    """Keys by key id; a token without a kid may use the one key of its kind."""

    def __init__(self, keys: tuple[PublicKey, ...] = ()) -> None:
        self.keys = keys
        self._by_kid = {k.kid: k for k in keys if k.kid is not None}

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._by_kid

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._by_kid)

    def find(self, kid: str | None, alg: str) -> PublicKey | None:
        if kid is not None:
            return self._by_kid.get(kid)
        family = family_of_algorithm(alg)
        matching = [k for k in self.keys if k.family == family]
        return matching[0] if len(matching) == 1 else None

    @classmethod
    def parse(cls, data: bytes | str) -> KeySet:
        """Read a JWKS document; JwksError when nothing usable is in it."""
        if len(data) > MAX_JWKS_BYTES:
            raise JwksError(f"larger than {MAX_JWKS_BYTES} bytes")
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            raise JwksError("not JSON") from None
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise JwksError('no "keys" list')
        keys: list[PublicKey] = []
        for entry in entries:
            key = _public_key(entry)
            if key is not None:
                keys.append(key)
            if len(keys) >= MAX_KEYS:
                break
        if not keys:
            raise JwksError("no usable public signing key")
        return cls(tuple(keys))


def _public_key(entry: Any) -> PublicKey | None:
    """One JWK as a public signing key; None when it is not one we use."""
    if not isinstance(entry, dict):
        return None
    if entry.get("use", "sig") != "sig" or "d" in entry or entry.get("kty") == "oct":
        return None
    kid = entry.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > _MAX_KID):
        return None
    alg = entry.get("alg")
    if alg is not None and not isinstance(alg, str):
        return None
    kty, crv = entry.get("kty"), entry.get("crv")
    if kty == "RSA":
        family = "RSA"
    elif kty == "EC" and crv in ("P-256", "P-384"):
        family = f"EC:{crv}"
    elif kty == "OKP" and crv == "Ed25519":
        family = "OKP"
    else:
        return None
    if alg is not None and family_of_algorithm(alg) != family:
        return None  # e.g. an RSA key marked HS256: never
    try:
        # PyJWK turns the JWK into a cryptography key; the algorithm given here
        # only picks the parser, the token's own algorithm is checked later.
        parser = {"RSA": "RS256", "EC:P-256": "ES256", "EC:P-384": "ES384", "OKP": "EdDSA"}[family]
        public = jwt.PyJWK(entry, algorithm=parser).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        return None
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < MIN_RSA_BITS:
        return None
    return PublicKey(kid=kid, family=family, alg=alg, key=public)
