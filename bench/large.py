#!/usr/bin/env python3
"""Large messages: MB/s, server CPU per MB and peak memory (issue 7, item 10).

Starts relaygate (capture mode, default settings but a 30 MiB size limit) and,
with --compare-postfix, uses Postfix + Dovecot from bench/postfix/; then runs
bench/loadgen.py with --size bytes per message, -c connections, one message
per connection (STARTTLS, AUTH PLAIN), for --duration seconds against each.
Reported per server: MB/s accepted, server CPU ms per MB (its process tree),
peak RSS of its process tree (sampled every 0.2 s), and for relaygate the size
of the SQLite WAL file at the end.

    .venv/bin/python bench/large.py [--size 10000000] [-c 5] [--duration 20] [--warmup 3]
                                    [--compare-postfix]

The default size is 10,000,000 bytes: Postfix refuses more than 10,240,000 by
default (message_size_limit). Loopback only; bounded in time.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench


def tree_rss_kib(roots: list[int]) -> int:
    table = bench.read_processes()
    total = 0
    for pid in bench.tree_members(table, roots):
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def warm_up(args: argparse.Namespace, target: bench.Target) -> None:
    """Small messages first, so every user has logged in to every process once:
    the figures are the steady state, not first-login password hashing."""
    if args.warmup <= 0:
        return
    size = args.size
    args.size = 2000
    try:
        command = bench.loadgen_command(args, target, "b", args.warmup)
        bench.run_loadgen(command, args.warmup, args.step_timeout)
    finally:
        args.size = size


def measure(args: argparse.Namespace, target: bench.Target) -> dict[str, Any]:
    warm_up(args, target)
    command = bench.loadgen_command(args, target, "b", args.duration)
    command[command.index("-c") + 1] = str(args.c)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_kib(target.roots))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    cpu = bench.tree_cpu_seconds(target.roots)
    started = time.monotonic()
    sampler.start()
    try:
        load = bench.run_loadgen(command, args.duration, args.step_timeout)
    finally:
        stop.set()
        sampler.join(timeout=5)
    wall = time.monotonic() - started
    server_cpu = bench.tree_cpu_seconds(target.roots) - cpu
    accepted = int(load.get("accepted", 0))
    megabytes = accepted * args.size / 1e6
    return {
        "target": target.name,
        "accepted": accepted,
        "failed": load.get("failed", {}),
        "mb_per_s": round(megabytes / wall, 1) if wall else None,
        "cpu_ms_per_mb": round(server_cpu * 1000 / megabytes, 2) if megabytes else None,
        "peak_rss_mib": round(peak[0] / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000_000, help="bytes per message")
    parser.add_argument("-c", type=int, default=5, help="connections at once")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="seconds of small messages first (0: none)"
    )
    parser.add_argument("--compare-postfix", action="store_true")
    parser.add_argument("--python", default=bench.default_python())
    args = parser.parse_args()
    # What bench.loadgen_command reads from the submission bench's options.
    args.users, args.procs, args.no_uvloop = 20, 1, False
    args.max_connections, args.step_timeout = 100_000, 120.0

    server = bench.RelaygateServer(args.python, 0, args.users, "info")
    postfix: bench.PostfixServer | None = None
    results: list[dict[str, Any]] = []
    try:
        server.write_config()
        with server.config.open("a", encoding="utf-8") as config:
            config.write("\n[limits]\nmax_message_size = 31457280\n")
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
        for target in targets:
            print(f"{target.name}: {args.size} bytes x c={args.c} ...", file=sys.stderr)
            results.append(measure(args, target))
        wal = server.tmp / "data" / "relaygate.db-wal"
        results[0]["wal_mib"] = round(wal.stat().st_size / 2**20, 1) if wal.exists() else 0.0
    finally:
        problem = server.stop()
        if problem:
            print(problem, file=sys.stderr)
        if postfix is not None:
            postfix.stop()
        server.cleanup(keep=False)
    header = ["server", "MB/s", "CPU ms/MB", "peak RSS MiB", "WAL MiB", "accepted", "failed"]
    rows = [
        [
            r["target"],
            bench.cell(r["mb_per_s"]),
            bench.cell(r["cpu_ms_per_mb"]),
            bench.cell(r["peak_rss_mib"]),
            bench.cell(r.get("wal_mib")),
            str(r["accepted"]),
            str(r["failed"] or "-"),
        ]
        for r in results
    ]
    print(bench.render_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
