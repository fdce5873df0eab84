"""TLS for the listeners: the server context and self-signed certificates.

With no [tls] files configured, relaygate makes an ECDSA P-256 certificate
(cheap handshakes, ~1 ms) and an RSA-2048 one (for old clients) once in
data_dir/tls and serves both from one context: OpenSSL picks per client.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from relaygate.config import Config
from relaygate.storage.files import private_directory
from relaygate.times import rfc3339_of

CertPair = tuple[Path, Path]  # (certificate chain, private key)


class TLSSetupError(Exception):
    """A certificate problem an admin can fix; the message says which file."""


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _self_signed(hostname: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        alt_names.append(x509.DNSName("localhost"))
    alt_names += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def ensure_self_signed(directory: Path, hostname: str) -> list[CertPair]:
    """Create the ECDSA and RSA self-signed pairs once; return both."""
    private_directory(directory)
    pairs: list[CertPair] = []
    for kind in ("ecdsa", "rsa"):
        cert_path = directory / f"selfsigned-{kind}.crt"
        key_path = directory / f"selfsigned-{kind}.key"
        if not (cert_path.exists() and key_path.exists()):
            key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
            if kind == "ecdsa":
                key = ec.generate_private_key(ec.SECP256R1())
            else:
                key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _write_private(
                key_path,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
            _write_private(cert_path, _self_signed(hostname, key))
        pairs.append((cert_path, key_path))
    return pairs


def certificate_pairs(config: Config) -> list[CertPair]:
    if config.tls.cert_file is not None and config.tls.key_file is not None:
        return [(config.tls.cert_file, config.tls.key_file)]
    return ensure_self_signed(config.tls_dir, config.hostname)


def certificate_pairs_quiet(config: Config) -> list[CertPair]:
    """The files ``certificate_pairs`` would use, without making any."""
    if config.tls.cert_file is not None and config.tls.key_file is not None:
        return [(config.tls.cert_file, config.tls.key_file)]
    return [
        (config.tls_dir / f"selfsigned-{kind}.crt", config.tls_dir / f"selfsigned-{kind}.key")
        for kind in ("ecdsa", "rsa")
    ]


def certificate_not_after(cert_file: Path) -> str:
    """When the (first) certificate in ``cert_file`` expires, RFC 3339 UTC."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return rfc3339_of(cert.not_valid_after_utc)


def server_context(pairs: list[CertPair]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5:!DSS")
    for cert, key in pairs:

        def refuse_passphrase(key: Path = key) -> str:
            # Without this OpenSSL would prompt on the terminal (once per worker).
            raise TLSSetupError(f"{key}: the private key is encrypted; give an unencrypted key")

        try:
            context.load_cert_chain(cert, key, password=refuse_passphrase)
        except FileNotFoundError as exc:
            raise TLSSetupError(f"{exc.filename}: file not found") from None
        except (ssl.SSLError, OSError) as exc:
            raise TLSSetupError(f"{cert} / {key}: cannot load certificate and key: {exc}") from None
    return context


def end_point_binding(cert_file: Path) -> bytes:
    """RFC 5929 tls-server-end-point data: the leaf certificate's hash.

    The hash is the certificate's own signature hash, with MD5 and SHA-1
    replaced by SHA-256 (section 4.1).
    """
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    algorithm = cert.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert.public_bytes(serialization.Encoding.DER))
    return digest.finalize()


def cipher_info(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> tuple[str | None, str | None]:
    """(version, cipher) of an established TLS connection, for logs and Received."""
    if ssl_object is None:
        return None, None
    cipher = ssl_object.cipher()
    return ssl_object.version(), (cipher[0] if cipher else None)
