#!/usr/bin/env python3
"""DKIM signing speed: relaygate's signer (OpenSSL through ``cryptography``)
against dkimpy's (pure-Python RSA, PyNaCl Ed25519), same message, same run.

Every case signs the same 4 KB message (``--size``) for ``--seconds`` of wall
time, one signature per call, after a short warm-up; each case's signature is
checked once with dkimpy's verifier (against the key record, no DNS) before it
is timed. Cases:

* ``relaygate rsa-sha256``, ``relaygate ed25519-sha256``: one signature;
* ``relaygate rsa+ed25519``: both, as sent for a domain with two keys;
* ``relaygate hashing only``: header parsing, canonicalization and the body
  hash, without the signature maths (the part written in Python); ``WSP body``
  the same for a body with a tab, a double and a trailing space in every line;
* ``dkimpy rsa-sha256``, ``dkimpy ed25519-sha256``: ``dkim.sign`` with the same
  keys, ``c=relaxed/relaxed`` and the same header list.

Prints a table and then one JSON object (``--json FILE`` writes it to a file
too). Usage: ``.venv/bin/python bench/dkim_bench.py [--seconds 3] [--size 4096]``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relaygate.delivery.dkim import (
    SIGNED_FIELDS,
    DKIMKey,
    Signer,
    body_hash,
    header_fields,
    select_fields,
    split_message,
    txt_value,
)

DOMAIN = "example.com"
WARMUP_CALLS = 5


WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "mail",
    "relay",
    "submission",
    "server",
    "message",
    "delivery",
    "queue",
    "signature",
    "header",
    "body",
    "domain",
    "selector",
    "record",
)


def make_message(size: int, whitespace: bool = False) -> bytes:
    """Headers and a plain-text body, ``size`` bytes in all, CRLF line ends.

    Ordinary text has single spaces; ``whitespace`` puts a tab, a double space
    and a trailing space in every line, the most relaxed canonicalization does.
    """
    header = (
        "From: Bench Sender <sender@example.com>\r\n"
        "To: Someone <rcpt@example.org>\r\n"
        "Subject: DKIM benchmark message with a subject of ordinary length\r\n"
        "Date: Sun, 29 Nov 2026 02:00:00 +0000\r\n"
        "Message-ID: <bench.1@example.com>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
    ).encode("ascii")
    lines = []
    length = len(header)
    number = 0
    while length < size:
        number += 1
        words = [WORDS[(number * 7 + i * 3) % len(WORDS)] for i in range(10 + number % 4)]
        text = " ".join(words)
        if whitespace:
            text = text.replace(" ", "\t", 1).replace(" ", "  ", 1) + " "
        line = text.encode("ascii") + b"\r\n"
        lines.append(line)
        length += len(line)
    body = b"".join(lines)
    excess = len(header) + len(body) - size
    if excess > 0:  # shorten the last line to hit the size exactly
        last = lines[-1]
        cut = last[: max(len(last) - 2 - excess, 1)]
        if not whitespace and cut.endswith(b" "):
            cut = cut[:-1] + b"."
        body = body[: -len(last)] + cut + b"\r\n"
    return header + body


def dkimpy_signer(key: DKIMKey) -> Callable[[bytes], bytes]:
    """dkim.sign with the same key, canonicalization and header list."""
    if isinstance(key.private_key, rsa.RSAPrivateKey):
        private = key.private_key.private_bytes(  # dkimpy reads PKCS#1 PEM only
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    else:
        private = base64.b64encode(
            key.private_key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )
    algorithm = key.algorithm.encode()
    selector = key.selector.encode()
    include = [name.decode() for name in SIGNED_FIELDS]

    def sign(message: bytes) -> bytes:
        return bytes(
            dkim.sign(
                message,
                selector,
                DOMAIN.encode(),
                private,
                signature_algorithm=algorithm,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=include,
            )
        )

    return sign


def hashing_only(message: bytes) -> bytes:
    header, body = split_message(message)
    _, hashed = select_fields(header_fields(header), SIGNED_FIELDS)
    return body_hash(body).encode() + b"".join(hashed)


def measure(function: Callable[[], object], seconds: float) -> dict[str, float]:
    for _ in range(WARMUP_CALLS):
        function()
    calls = 0
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    deadline = wall_start + seconds
    while True:
        function()
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            break
    wall = now - wall_start
    cpu = time.process_time() - cpu_start
    return {
        "calls": calls,
        "wall_s": round(wall, 3),
        "per_s": round(calls / wall, 1),
        "us_per_call": round(wall / calls * 1e6, 1),
        "cpu_us_per_call": round(cpu / calls * 1e6, 1),
    }


def check(signature: bytes, message: bytes, keys: dict[str, DKIMKey]) -> bool:
    records = {key.dns_name.encode(): txt_value(key).encode() for key in keys.values()}
    signed = signature + message
    count = signature.count(b"DKIM-Signature:")
    verifier = dkim.DKIM(signed)
    return all(
        verifier.verify(idx=i, dnsfunc=lambda name, timeout=5: records.get(name))
        for i in range(count)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="per case (default: 3)")
    parser.add_argument("--size", type=int, default=4096, help="message bytes (default: 4096)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 60:
        parser.error("--seconds must be more than 0 and at most 60")

    message = make_message(args.size)
    spaced = make_message(args.size, whitespace=True)
    keys = {
        "rsa": DKIMKey(
            DOMAIN,
            "bench-rsa",
            "rsa-sha256",
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ),
        "ed25519": DKIMKey(
            DOMAIN, "bench-ed25519", "ed25519-sha256", ed25519.Ed25519PrivateKey.generate()
        ),
    }
    now = time.time()
    ours = {name: Signer({DOMAIN: [key]}) for name, key in keys.items()}
    dual = Signer({DOMAIN: list(keys.values())})
    cases: list[tuple[str, Callable[[], bytes], bool]] = [
        ("relaygate rsa-sha256", lambda: ours["rsa"].sign(message, DOMAIN, now), True),
        ("relaygate ed25519-sha256", lambda: ours["ed25519"].sign(message, DOMAIN, now), True),
        ("relaygate rsa+ed25519", lambda: dual.sign(message, DOMAIN, now), True),
        ("relaygate hashing only", lambda: hashing_only(message), False),
        ("relaygate hashing, WSP body", lambda: hashing_only(spaced), False),
    ]
    dkimpy_rsa = dkimpy_signer(keys["rsa"])
    cases.append(("dkimpy rsa-sha256", lambda: dkimpy_rsa(message), True))
    try:
        import nacl.signing  # noqa: F401  (dkimpy signs Ed25519 with PyNaCl)
    except ImportError:
        print("PyNaCl not installed: skipping dkimpy ed25519-sha256", file=sys.stderr)
    else:
        dkimpy_ed = dkimpy_signer(keys["ed25519"])
        cases.append(("dkimpy ed25519-sha256", lambda: dkimpy_ed(message), True))

    results: dict[str, dict[str, Any]] = {}
    for name, function, signs in cases:
        if signs and not check(function(), message, keys):
            print(f"{name}: dkimpy does not verify this signature", file=sys.stderr)
            return 1
        results[name] = measure(function, args.seconds)

    print(f"DKIM signing, {len(message)}-byte message, {args.seconds:g} s per case")
    print(f"{'case':<30}{'signs/s':>10}{'us/sign':>11}{'cpu us':>10}")
    for name, figures in results.items():
        print(
            f"{name:<30}{figures['per_s']:>10.1f}{figures['us_per_call']:>11.1f}"
            f"{figures['cpu_us_per_call']:>10.1f}"
        )
    report = {
        "benchmark": "dkim_sign",
        "message_bytes": len(message),
        "seconds_per_case": args.seconds,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "versions": {
            "cryptography": _version("cryptography"),
            "dkimpy": _version("dkimpy"),
            "pynacl": _version("pynacl"),
        },
        "cases": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
