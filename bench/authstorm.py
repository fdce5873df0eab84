#!/usr/bin/env python3
"""A wrong-password storm beside a good client (issue 7, item 11).

For each server (relaygate, and Postfix + Dovecot with --compare-postfix) and
each kind of storm, the good client (bench/loadgen.py: -c 5, one message per
connection incl. STARTTLS and AUTH, correct passwords, from 127.0.0.1) runs
alone, then again while --attackers clients guess passwords as fast as the
server lets them. Each attacker has a loopback address of its own
(127.<net>.<k>.1, so it is alone in its /24 and only per-address and
per-account rules apply): connect, EHLO, STARTTLS, EHLO, then AUTH PLAIN with
a wrong password again and again until the server closes, then reconnect.
Storms: ``same`` guesses at the good client's own accounts (credential
stuffing), ``other`` at names that exist nowhere.

Reported per server and storm: the good client's msg/s and p99 message
latency alone and under the storm, their ratios (goal: rate >= 0.8x, p99 <= 2x),
the attackers' attempts and replies, server CPU during the storm.

    .venv/bin/python bench/authstorm.py [--duration 15] [--compare-postfix] [--json FILE]

relaygate runs with its default failed-login rules and password hashing; loopback
is exempt from per-IP connection limits by default, so those play no part.
Loopback only; every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import ssl
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench

STORMS = ("same", "other")


async def _reply(reader: asyncio.StreamReader, timeout: float) -> int:
    """The code of the next complete reply (multi-line replies read whole)."""
    for _ in range(100):
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return int(line[:3])
    raise ConnectionError("endless reply")


async def _attacker(
    k: int, port: int, net: int, storm: str, users: int, stop: threading.Event, stats: Counter[str]
) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    source = f"127.{net}.{k}.1"
    attempt = 0
    while not stop.is_set():
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 10
            )
            stats["connections"] += 1
            await _reply(reader, 30)
            writer.write(b"EHLO attacker.bench.test\r\n")
            await _reply(reader, 30)
            writer.write(b"STARTTLS\r\n")
            if await _reply(reader, 30) != 220:
                stats["starttls refused"] += 1
                continue
            await asyncio.wait_for(writer.start_tls(context), 30)
            writer.write(b"EHLO attacker.bench.test\r\n")
            await _reply(reader, 30)
            while not stop.is_set():
                attempt += 1
                if storm == "same":
                    user = f"user{(k + attempt) % users + 1}@example.test"
                else:
                    user = f"nobody{k}-{attempt}@example.test"
                token = base64.b64encode(f"\0{user}\0wrong-{k}-{attempt}".encode()).decode()
                writer.write(f"AUTH PLAIN {token}\r\n".encode())
                code = await _reply(reader, 60)
                stats["attempts"] += 1
                stats[f"reply {code}"] += 1
                if code == 235:
                    stats["accepted?!"] += 1
                if code in (235, 421):
                    break
        except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
            stats[f"error {type(exc).__name__}"] += 1
        finally:
            if writer is not None:
                writer.close()
        await asyncio.sleep(0.01)


def _storm_thread(
    port: int, net: int, storm: str, attackers: int, users: int, stop: threading.Event
) -> tuple[threading.Thread, Counter[str]]:
    stats: Counter[str] = Counter()

    async def everyone() -> None:
        await asyncio.gather(
            *(_attacker(k, port, net, storm, users, stop, stats) for k in range(1, attackers + 1))
        )

    thread = threading.Thread(target=lambda: asyncio.run(everyone()), daemon=True)
    thread.start()
    return thread, stats


def _good(args: argparse.Namespace, target: bench.Target) -> dict[str, Any]:
    """The good client for --duration seconds; its figures and the server's CPU."""
    command = bench.loadgen_command(args, target, "b", args.duration)
    command[command.index("-c") + 1] = str(args.good_c)
    cpu = bench.tree_cpu_seconds(target.roots)
    load = bench.run_loadgen(command, args.duration, args.step_timeout)
    message = load.get("latency", {}).get("message", {})
    return {
        "msgs_per_s": load.get("msgs_per_s"),
        "p99_ms": message.get("p99_ms"),
        "accepted": load.get("accepted"),
        "failed": load.get("failed", {}),
        "server_cpu_s": round(bench.tree_cpu_seconds(target.roots) - cpu, 2),
    }


def measure(args: argparse.Namespace, target: bench.Target, storm: str, net: int) -> dict[str, Any]:
    alone = _good(args, target)
    stop = threading.Event()
    thread, stats = _storm_thread(target.port, net, storm, args.attackers, args.users, stop)
    try:
        time.sleep(1.0)  # the storm is under way before the good client starts
        under = _good(args, target)
    finally:
        stop.set()
        thread.join(timeout=90)
    return {
        "target": target.name,
        "storm": storm,
        "alone": alone,
        "under_storm": under,
        "rate_ratio": bench.ratio(under["msgs_per_s"], alone["msgs_per_s"]),
        "p99_ratio": bench.ratio(under["p99_ms"], alone["p99_ms"]),
        "attack": dict(stats),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    parser.add_argument("--attackers", type=int, default=50)
    parser.add_argument("--good-c", type=int, default=5, help="good client's connections")
    parser.add_argument("--storm", choices=(*STORMS, "both"), default="both")
    parser.add_argument("--compare-postfix", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--python", default=bench.default_python())
    args = parser.parse_args()
    if not 1 <= args.attackers <= 250:
        parser.error("--attackers must be 1..250")
    # What bench.loadgen_command reads from the submission bench's options.
    args.users, args.size, args.procs, args.no_uvloop = 20, 4096, 1, False
    args.max_connections, args.step_timeout = 100_000, 30.0

    storms = list(STORMS) if args.storm == "both" else [args.storm]
    results: list[dict[str, Any]] = []
    server = bench.RelaygateServer(args.python, 0, args.users, "info")
    postfix: bench.PostfixServer | None = None
    try:
        server.write_config()
        server.create_users()
        server.start()
        assert server.process is not None
        targets = [
            bench.Target("relaygate", server.starttls_port, "starttls", [server.process.pid])
        ]
        if args.compare_postfix:
            postfix = bench.PostfixServer()
            postfix.start()
            targets.append(bench.Target("postfix", bench.POSTFIX_PORT, "starttls", postfix.roots()))
        net = 10
        for storm in storms:
            for target in targets:
                net += 1  # fresh attacker networks: no counts left from the last round
                print(f"{target.name}: {storm} storm ...", file=sys.stderr)
                results.append(measure(args, target, storm, net))
    finally:
        problem = server.stop()
        if problem:
            print(problem, file=sys.stderr)
        if postfix is not None:
            postfix.stop()
        server.cleanup(keep=False)
    header = ["server", "storm", "alone msg/s", "storm msg/s", "rate", "alone p99", "storm p99",
              "p99", "attempts", "connections"]  # fmt: skip
    rows = [
        [
            r["target"],
            r["storm"],
            bench.cell(r["alone"]["msgs_per_s"]),
            bench.cell(r["under_storm"]["msgs_per_s"]),
            f"{r['rate_ratio']}x",
            bench.cell(r["alone"]["p99_ms"]),
            bench.cell(r["under_storm"]["p99_ms"]),
            f"{r['p99_ratio']}x",
            str(r["attack"].get("attempts", 0)),
            str(r["attack"].get("connections", 0)),
        ]
        for r in results
    ]
    print(bench.render_table(header, rows, left=2))
    if args.json:
        with contextlib.suppress(OSError):
            args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
