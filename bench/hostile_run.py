"""Hostile clients against a running relaygate, while a legitimate client sends mail.

Loopback only, bounded in time. Each hostile task loops over one kind of abuse:
random bytes, a 200 KB command line, STARTTLS with junk pipelined behind it, an
HTTP request, smuggling-shaped DATA, and (on the implicit-TLS port) junk instead
of a TLS handshake, a truncated handshake and oversized AUTH lines. Meanwhile
one real client logs in and sends a message; the run reports how long it took.
Afterwards check the server's log: no internal.error, and at SIGTERM
``shutdown.start ... connections=0`` (nothing left behind).

    .venv/bin/python bench/hostile_run.py --starttls-port 2587 --implicit-port 2465 \\
        --user dev@example.test --password PASSWORD [--seconds 6] [--clients 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import smtplib
import ssl
import time

HOST = "127.0.0.1"


def _tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # self-signed in quickstart; this is a load tool
    return context


async def _abuse(kind: int, args: argparse.Namespace, stop: float) -> int:
    rnd = random.Random(kind)
    context = _tls_context()
    done = 0
    while time.monotonic() < stop:
        try:
            if kind < 5:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, args.starttls_port), 2
                )
                payload = [
                    os.urandom(rnd.randint(1, 5000)),
                    b"EHLO x\r\n" + b"A" * 200_000,
                    b"EHLO x\r\nSTARTTLS\r\nRSET\r\n" + os.urandom(100),
                    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"EHLO x\r\n" + b"\n.\n" * 1000 + b"MAIL FROM:<a@b.test>\r\n" * 50,
                ][kind]
            elif kind < 7:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, args.implicit_port), 2
                )
                payload = (
                    os.urandom(rnd.randint(1, 3000))
                    if kind == 5
                    else (b"\x16\x03\x01\x02\x00" + os.urandom(50))
                )
            else:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, args.implicit_port, ssl=context), 3
                )
                payload = b"EHLO x\r\nAUTH PLAIN " + b"A" * 20_000 + b"\r\n"
            writer.write(payload)
            await writer.drain()
            try:
                await asyncio.wait_for(reader.read(65536), 0.5)
            except (TimeoutError, OSError, ssl.SSLError):
                pass
            writer.close()
            done += 1
        except (TimeoutError, OSError, ssl.SSLError):
            await asyncio.sleep(0.01)
    return done


def _legitimate(args: argparse.Namespace) -> float:
    started = time.monotonic()
    with smtplib.SMTP(HOST, args.starttls_port, timeout=15) as client:
        client.starttls(context=_tls_context())
        client.login(args.user, args.password)
        client.sendmail(
            args.user,
            ["someone@example.org"],
            f"From: {args.user}\r\nSubject: sent during a hostile run\r\n\r\nstill here\r\n",
        )
    return time.monotonic() - started


async def _run(args: argparse.Namespace) -> None:
    stop = time.monotonic() + args.seconds
    tasks = [asyncio.ensure_future(_abuse(i % 8, args, stop)) for i in range(args.clients)]
    await asyncio.sleep(args.seconds / 2)
    took = await asyncio.get_running_loop().run_in_executor(None, _legitimate, args)
    print(f"legitimate login + message during the run: {took * 1000:.0f} ms")
    print(f"hostile connections made: {sum(await asyncio.gather(*tasks))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starttls-port", type=int, default=2587)
    parser.add_argument("--implicit-port", type=int, default=2465)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--clients", type=int, default=100)
    args = parser.parse_args()
    if not 0 < args.seconds <= 120 or not 0 < args.clients <= 1000:
        parser.error("--seconds must be in (0, 120] and --clients in (0, 1000]")
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
