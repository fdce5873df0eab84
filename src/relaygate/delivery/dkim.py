"""DKIM signing (RFC 6376) with rsa-sha256 and ed25519-sha256 (RFC 8463).

Pure functions on the raw message bytes as spooled (CRLF line endings, the
header section ending at the first empty line), with OpenSSL doing the
signature maths through the ``cryptography`` package. The ``email`` package is
not used: a signature covers the bytes, so it must be computed from the bytes.

What a signature here looks like, and why:

- ``c=relaxed/relaxed``: survives the re-folding and whitespace changes
  relays commonly make (RFC 6376 3.4.2, 3.4.4).
- ``h=`` lists, in a fixed order, the fields of :data:`SIGNED_FIELDS` that the
  message has, each once per instance (so every instance is covered), and
  ``from`` once more than present ("oversigning": a verifier then hashes an
  empty instance for the extra name, and a From field added later no longer
  matches, RFC 6376 5.4.2 and 8.15).
- No ``l=`` (body length) and no ``x=`` (expiry): an ``l=`` lets anyone append
  to the body; keys are rotated instead of signatures expiring.
- One signature per key of the sending domain. A domain with both an RSA and
  an Ed25519 key gets both (dual signing, as RFC 8463 advises while
  Ed25519 support is not universal); the RSA one is placed on top, because
  some verifiers only look at the first signature.

Keys live in ``<data_dir>/dkim/<domain>/<selector>.<rsa|ed25519>.pem``
(PKCS#8 PEM, unencrypted, mode 0600). A key signs mail of exactly its domain:
a message from ``news.example.com`` is not signed with ``example.com``'s key
(generate one for ``news.example.com`` if it should be signed). The input is
expected to end with CRLF, as every message received over SMTP does.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
KeyType = Literal["rsa", "ed25519"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

KEY_TYPES: tuple[KeyType, ...] = ("rsa", "ed25519")
ALGORITHMS: dict[KeyType, Algorithm] = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}
KEY_TYPE_OF: dict[Algorithm, KeyType] = {v: k for k, v in ALGORITHMS.items()}

RSA_BITS = 2048
MIN_RSA_BITS = 1024  # RFC 8301 3.2: verifiers must not accept smaller keys
# A selector names one DNS record, so the RSA and the Ed25519 key of a domain
# need different ones.
DEFAULT_SELECTORS: dict[KeyType, str] = {"rsa": "relaygate", "ed25519": "relaygate-ed25519"}
KEY_DIRECTORY = "dkim"  # under the data directory

# The fields signed when present, in the order they are listed in h=.
SIGNED_FIELDS: tuple[bytes, ...] = (
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"sender",
)
OVERSIGNED_FIELDS: frozenset[bytes] = frozenset({b"from"})

MAX_LINE = 78  # RFC 5322 2.1.1: lines SHOULD be no longer than 78 characters
TXT_STRING_MAX = 255  # one character-string in a DNS TXT record (RFC 1035 3.3)

# Only the runs that change (a tab, or two or more characters): leaving single
# spaces alone makes the substitution several times faster on ordinary text.
_WSP_TO_COMPRESS = re.compile(rb"\t[ \t]*| [ \t]+")
_WSP_BEFORE_CRLF = re.compile(rb"[ \t]+\r\n")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_KEY_FILE = re.compile(r"(?P<selector>[^/]+)\.(?P<type>rsa|ed25519)\.pem\Z")


class DKIMError(ValueError):
    """A problem with a key, a domain or a message that a user can act on."""


@dataclass(frozen=True, slots=True)
class DKIMKey:
    domain: str  # normalized: lowercase A-labels, no final dot
    selector: str
    algorithm: Algorithm
    private_key: PrivateKey

    @property
    def key_type(self) -> KeyType:
        return KEY_TYPE_OF[self.algorithm]

    @property
    def dns_name(self) -> str:
        """The DNS name the public key is published under (with the final dot)."""
        return f"{self.selector}._domainkey.{self.domain}."


# ------------------------------------------------------------- names, paths


def normalize_domain(domain: str) -> str:
    """Lowercase A-label form of a domain name; DKIMError if it is not one."""
    text = domain.strip().rstrip(".").lower()
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            raise DKIMError(f"invalid domain: {domain!r}") from None
    labels = text.split(".")
    if len(text) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise DKIMError(f"invalid domain: {domain!r}: use a name such as example.com")
    return text


def normalize_selector(selector: str) -> str:
    """A selector is one or more DNS labels (RFC 6376 3.1)."""
    text = selector.strip().lower()
    labels = text.split(".")
    if not text or len(text) > 63 or not all(_LABEL.match(label) for label in labels):
        raise DKIMError(
            f"invalid selector: {selector!r}: use letters, digits and '-', such as relaygate"
        )
    return text


def key_directory(data_dir: Path) -> Path:
    """Where the keys of a relaygate data directory live."""
    return data_dir / KEY_DIRECTORY


def key_path(directory: Path, domain: str, selector: str, key_type: KeyType) -> Path:
    return directory / domain / f"{selector}.{key_type}.pem"


# ----------------------------------------------------------------- key files


def new_key(
    domain: str, selector: str | None = None, algorithm: KeyType = "rsa"
) -> tuple[DKIMKey, bytes]:
    """A new key and its private key as PEM (PKCS#8), not stored anywhere yet.

    The selector defaults to :data:`DEFAULT_SELECTORS` of the algorithm.
    """
    if algorithm not in KEY_TYPES:
        raise DKIMError(f"unknown algorithm: {algorithm!r}: use rsa or ed25519")
    domain = normalize_domain(domain)
    selector = normalize_selector(DEFAULT_SELECTORS[algorithm] if selector is None else selector)
    key = DKIMKey(
        domain,
        selector,
        ALGORITHMS[algorithm],
        (
            rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
            if algorithm == "rsa"
            else ed25519.Ed25519PrivateKey.generate()
        ),
    )
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key, pem


def generate_key(
    directory: Path,
    domain: str,
    selector: str | None = None,
    algorithm: KeyType = "rsa",
) -> tuple[DKIMKey, str]:
    """Create a key file under ``directory``; return the key and its DNS TXT record.

    Never replaces an existing key file, nor reuses a selector of the domain's
    other key type (DKIMError): a published key must not change under its selector.
    """
    if algorithm not in KEY_TYPES:
        raise DKIMError(f"unknown algorithm: {algorithm!r}: use rsa or ed25519")
    domain = normalize_domain(domain)
    selector = normalize_selector(DEFAULT_SELECTORS[algorithm] if selector is None else selector)
    for other in KEY_TYPES:
        existing = key_path(directory, domain, selector, other)
        if existing.exists():
            raise DKIMError(
                f"{existing}: {domain} has a key with selector {selector!r} already;"
                " choose another selector (keys are never replaced)"
            )
    key, pem = new_key(domain, selector, algorithm)
    _write_new_file(key_path(directory, key.domain, key.selector, algorithm), pem)
    return key, txt_record(key)


def _write_new_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a file that must not exist yet, mode 0600, all or nothing.

    Written to a temporary name first, then linked into place: a crash leaves
    no half-written key, and link() fails rather than replace a file another
    process created meanwhile.
    """
    path.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise DKIMError(f"{path}: a key already exists") from None
    finally:
        temporary.unlink(missing_ok=True)


def load_key(path: Path, domain: str, selector: str, key_type: KeyType) -> DKIMKey:
    return key_from_pem(path.read_bytes(), domain, selector, key_type, str(path))


def key_from_pem(pem: bytes, domain: str, selector: str, key_type: KeyType, path: str) -> DKIMKey:
    """A key from its PEM text; ``path`` names where it came from in errors."""
    try:
        private_key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise DKIMError(f"{path}: not an unencrypted PEM private key") from None
    if key_type == "rsa":
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise DKIMError(f"{path}: not an RSA private key")
        if private_key.key_size < MIN_RSA_BITS:
            raise DKIMError(
                f"{path}: RSA key of {private_key.key_size} bits; at least {MIN_RSA_BITS} needed"
            )
        return DKIMKey(domain, selector, "rsa-sha256", private_key)
    if not isinstance(private_key, ed25519.Ed25519PrivateKey):
        raise DKIMError(f"{path}: not an Ed25519 private key")
    return DKIMKey(domain, selector, "ed25519-sha256", private_key)


def load_keys(directory: Path) -> dict[str, list[DKIMKey]]:
    """Every key under ``directory``, by domain (RSA before Ed25519, then by selector).

    A missing directory means no keys. Files not named ``<selector>.<rsa|ed25519>.pem``
    (such as a leftover temporary file) are skipped; a key file that cannot be
    used, or a folder whose name is not a domain, is a DKIMError.
    """
    keys: dict[str, list[DKIMKey]] = {}
    if not directory.is_dir():
        return keys
    for domain_dir in sorted(directory.iterdir()):
        if not domain_dir.is_dir() or domain_dir.name.startswith("."):
            continue
        domain = normalize_domain(domain_dir.name)
        if domain != domain_dir.name:
            raise DKIMError(f"{domain_dir}: name the folder {domain!r}")
        for path in sorted(domain_dir.iterdir()):
            match = _KEY_FILE.match(path.name)
            if match is None or path.name.startswith(".") or not path.is_file():
                continue
            key_type: KeyType = "rsa" if match["type"] == "rsa" else "ed25519"
            selector = normalize_selector(match["selector"])
            found = keys.setdefault(domain, [])
            if any(key.selector == selector for key in found):
                raise DKIMError(
                    f"{path}: {domain} has two keys with selector {selector!r};"
                    " a selector names one DNS record: remove or rename one"
                )
            found.append(load_key(path, domain, selector, key_type))
    for found in keys.values():
        found.sort(key=lambda k: (KEY_TYPES.index(k.key_type), k.selector))
    return keys


# ------------------------------------------------------------- DNS records


def public_key_value(key: DKIMKey) -> str:
    """The ``p=`` value: RSA as DER SubjectPublicKeyInfo, Ed25519 as the raw 32
    bytes (RFC 8463), base64."""
    if isinstance(key.private_key, rsa.RSAPrivateKey):
        der = key.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        der = key.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return base64.b64encode(der).decode("ascii")


def txt_value(key: DKIMKey) -> str:
    """The key record's text, as a resolver returns it (the strings joined)."""
    return f"v=DKIM1; k={key.key_type}; p={public_key_value(key)}"


def txt_record(key: DKIMKey) -> str:
    """A zone-file line to publish: the value split into strings of at most 255
    characters, as one TXT record (which a resolver joins back together)."""
    value = txt_value(key)
    strings = [value[i : i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)]
    quoted = " ".join(f'"{s}"' for s in strings)
    return f"{key.dns_name} IN TXT {quoted}"


# ---------------------------------------------------------- canonicalization


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """The header section (each field ending with CRLF) and the body.

    With no empty line, all of it is header and the body is empty.
    """
    if message.startswith(b"\r\n"):
        return b"", message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, b""
    return message[: end + 2], message[end + 4 :]


def header_fields(header: bytes) -> list[tuple[bytes, bytes]]:
    """(lowercase name, whole field without its final CRLF) per field, in order.

    A continuation line (starting with space or tab) belongs to the field
    above; a line without a colon is no field and is left out.
    """
    fields: list[tuple[bytes, bytes]] = []
    lines = header.split(b"\r\n")
    if lines and not lines[-1]:
        lines.pop()
    name: bytes | None = None
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if name is not None:
                fields[-1] = (name, fields[-1][1] + b"\r\n" + line)
            continue
        field_name, colon, _ = line.partition(b":")
        if not colon:
            name = None
            continue
        name = field_name.rstrip(b" \t").lower()
        fields.append((name, line))
    return fields


def relaxed_header(field: bytes) -> bytes:
    """RFC 6376 3.4.2: lowercase name, unfolded, runs of WSP as one space, none
    around the colon or at the end; ends with CRLF."""
    name, _, value = field.partition(b":")
    value = _WSP_TO_COMPRESS.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4: no WSP at line ends, runs of WSP as one space, no empty
    lines at the end; a body of only empty lines is empty.

    A last line without CRLF gets one first, then loses its trailing
    whitespace: that is the body a receiver sees once SMTP has ended it.
    """
    if not body:
        return b""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    # The `in` tests are C-speed scans that spare most bodies the regexes.
    if b" \r\n" in body or b"\t\r\n" in body:
        body = _WSP_BEFORE_CRLF.sub(b"\r\n", body)
    if b"\t" in body or b"  " in body:
        body = _WSP_TO_COMPRESS.sub(b" ", body)
    end = len(body)
    while end >= 4 and body[end - 4 : end] == b"\r\n\r\n":
        end -= 2
    if end == 2:  # nothing but empty lines
        return b""
    return body[:end]


def body_hash(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode("ascii")


def select_fields(
    fields: Sequence[tuple[bytes, bytes]], names: Iterable[bytes]
) -> tuple[list[bytes], list[bytes]]:
    """The h= names and the canonical fields they cover, in that order.

    Each name of ``names`` present is listed once per instance, the last
    instance hashed first (RFC 6376 5.4.2); an oversigned name once more,
    which a verifier hashes as nothing.
    """
    by_name: dict[bytes, list[bytes]] = {}
    for field_name, field in fields:
        by_name.setdefault(field_name, []).append(field)
    listed: list[bytes] = []
    hashed: list[bytes] = []
    for name in names:
        instances = by_name.get(name, ())
        listed.extend([name] * (len(instances) + (name in OVERSIGNED_FIELDS)))
        hashed.extend(relaxed_header(field) for field in reversed(instances))
    return listed, hashed


# ------------------------------------------------------------------ signing


def fold_header(name: str, words: Sequence[tuple[str, str, bool]]) -> str:
    """``name:`` and the words, folded greedily at <= MAX_LINE characters.

    Each word is (separator, text, breakable): the separator joins it to the
    previous word on the same line and is dropped at a fold (a fold is CRLF
    and one space); a breakable word (base64) may be split across lines.
    """
    lines = [name + ":"]
    for separator, text, breakable in words:
        current = lines[-1]
        if len(current) + len(separator) + len(text) <= MAX_LINE:
            lines[-1] = current + separator + text
            continue
        if breakable:
            rest = text
            room = MAX_LINE - len(current) - len(separator)
            if room >= 8:  # not worth splitting for a few characters
                lines[-1] = current + separator + rest[:room]
                rest = rest[room:]
            while rest:
                lines.append(" " + rest[: MAX_LINE - 1])
                rest = rest[MAX_LINE - 1 :]
        else:
            lines.append(" " + text)
    return "\r\n".join(lines) + "\r\n"


def _signature_words(
    key: DKIMKey, timestamp: int, listed: Sequence[bytes], bh: str
) -> list[tuple[str, str, bool]]:
    words: list[tuple[str, str, bool]] = [
        (" ", f"{tag};", False)
        for tag in (
            "v=1",
            f"a={key.algorithm}",
            "c=relaxed/relaxed",
            f"d={key.domain}",
            f"s={key.selector}",
            f"t={timestamp}",
        )
    ]
    names = [name.decode("ascii") for name in listed]
    words.append((" ", f"h={names[0]}", False))
    words.extend(("", f":{name}", False) for name in names[1:])
    words[-1] = (words[-1][0], words[-1][1] + ";", False)
    words.append((" ", f"bh={bh};", False))
    words.append((" ", "b=", False))
    return words


def sign_with_key(
    key: DKIMKey, hashed_fields: Sequence[bytes], listed: Sequence[bytes], bh: str, now: float
) -> bytes:
    """One DKIM-Signature field (ending with CRLF) over prepared parts."""
    words = _signature_words(key, int(now), listed, bh)
    unsigned = fold_header("DKIM-Signature", words)
    # The signature field itself is hashed last, with an empty b= and without
    # its final CRLF (RFC 6376 3.7). Folding is greedy, so the signed field is
    # `unsigned` up to "b=" plus the value: the verifier sees what was hashed.
    own = relaxed_header(unsigned[:-2].encode("ascii"))[:-2]
    data = b"".join(hashed_fields) + own
    private_key = key.private_key
    if isinstance(private_key, rsa.RSAPrivateKey):
        signature = private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        # RFC 8463: Ed25519 (pure, not Ed25519ph) signs the SHA-256 hash of
        # the data, as dkimpy does (the tests verify with dkimpy).
        signature = private_key.sign(hashlib.sha256(data).digest())
    words.append(("", base64.b64encode(signature).decode("ascii"), True))
    return fold_header("DKIM-Signature", words).encode("ascii")


class Signer:
    """Signs messages with the keys of their sender's domain.

    ``keys`` maps a domain (normalized, as :func:`load_keys` returns it) to its
    keys; each key signs mail of exactly that domain, not of its subdomains.
    """

    def __init__(self, keys: Mapping[str, Sequence[DKIMKey]]) -> None:
        self._keys: dict[str, tuple[DKIMKey, ...]] = {}
        for domain, found in keys.items():
            for key in found:
                if key.domain != domain:
                    raise DKIMError(f"key for {key.domain} listed under {domain}")
            if found:
                self._keys[domain] = tuple(
                    sorted(found, key=lambda k: (KEY_TYPES.index(k.key_type), k.selector))
                )

    @classmethod
    def from_directory(cls, directory: Path) -> Signer:
        return cls(load_keys(directory))

    @property
    def domains(self) -> list[str]:
        return sorted(self._keys)

    def keys_for(self, domain: str) -> tuple[DKIMKey, ...]:
        """The keys that sign mail of ``domain`` (any case, U- or A-labels)."""
        try:
            return self._keys.get(normalize_domain(domain), ())
        except DKIMError:
            return ()

    def signing_domain_for(self, from_header_address: str) -> str | None:
        """The domain to sign as for a From address (``user@example.com``, angle
        brackets allowed), if there is a key for exactly that domain."""
        address = from_header_address.strip().removeprefix("<").removesuffix(">")
        _, at, domain = address.rpartition("@")
        if not at:
            return None
        keys = self.keys_for(domain)
        return keys[0].domain if keys else None

    def host_signing_domain(self, hostname: str) -> str | None:
        """The domain our own mail (DSNs, From MAILER-DAEMON@``hostname``) is signed
        as: ``hostname`` if it has keys, else its nearest parent domain that has
        (relay.example.com: example.com, which DMARC's relaxed alignment accepts
        for that From); never a single label. People's mail is signed only with
        the keys of exactly its From domain (``signing_domain_for``)."""
        labels = hostname.strip().rstrip(".").split(".")
        for start in range(len(labels) - 1):
            keys = self.keys_for(".".join(labels[start:]))
            if keys:
                return keys[0].domain
        return None

    def sign(self, message: bytes, domain: str, now: float) -> bytes:
        """The DKIM-Signature fields (each ending with CRLF) to put above ``message``.

        One per key of ``domain``; DKIMError if there is no key for it or the
        message has no From field (RFC 6376 5.4 requires From to be signed).
        """
        keys = self.keys_for(domain)
        if not keys:
            raise DKIMError(f"no DKIM key for {domain}")
        header, body = split_message(message)
        fields = header_fields(header)
        if not any(name == b"from" for name, _ in fields):
            raise DKIMError("message has no From field; it cannot be DKIM-signed")
        listed, hashed = select_fields(fields, SIGNED_FIELDS)
        bh = body_hash(body)
        return b"".join(sign_with_key(key, hashed, listed, bh, now) for key in keys)
