"""`relaygate check HOST[:PORT]`: arguments, the run, the table or JSON, the exit status."""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys

from relaygate.audit.findings import evaluate, failed, report
from relaygate.audit.probe import Settings, Unreachable, gather
from relaygate.audit.target import (
    SUBMISSION_PORT,
    SUBMISSIONS_PORT,
    has_control,
    parse_target,
)
from relaygate.audit.text import clean

EXIT_OK = 0
EXIT_FAILED = 1  # a check failed
EXIT_USAGE = 2  # bad arguments, or no SMTP conversation with the host
PROG = "relaygate"


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    parser = commands.add_parser(
        "check",
        parents=[common],
        help="audit a submission server from outside: TLS, AUTH, relay, smuggling (exit 0/1/2)",
        description="Connect to HOST as a client and report each check as pass, warn or fail"
        " (see docs/check.md). Exit 0 when nothing failed, 1 when a check failed, 2 for a"
        f" usage error or a host that cannot be reached. Default port {SUBMISSION_PORT}"
        f" (STARTTLS), {SUBMISSIONS_PORT} with --implicit.",
    )
    parser.add_argument("target", metavar="HOST[:PORT]", help="e.g. mail.example.com:587, [::1]")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--implicit", action="store_true", help="TLS from the first byte (port 465 style)"
    )
    parser.add_argument(
        "--user", metavar="ADDRESS", help="log in (over TLS only) for the bare-LF smuggling probe"
    )
    parser.add_argument(
        "--password-stdin", action="store_true", help="read --user's password from stdin"
    )
    parser.add_argument(
        "--servername",
        metavar="NAME",
        help="the name the certificate must carry (SNI too; default: HOST)",
    )
    parser.add_argument(
        "--ca-file", metavar="FILE", help="trust these CA certificates instead of the system's"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="for each step: connect, handshake, one reply (default 10)",
    )
    parser.set_defaults(standalone=run)


def run(args: argparse.Namespace) -> int:
    try:
        target = parse_target(args.target, implicit=args.implicit)
    except ValueError as exc:
        return _fail(str(exc))
    if args.user is not None and (not args.user or has_control(args.user)):
        return _fail("--user must be an address, without control characters")
    if (args.user is None) != (not args.password_stdin):
        return _fail("--user and --password-stdin go together")
    if not 0 < args.timeout <= 300:
        return _fail("--timeout must be more than 0 and at most 300 seconds")
    if args.ca_file is not None:
        try:
            ssl.create_default_context(cafile=args.ca_file)
        except (OSError, ssl.SSLError) as exc:
            return _fail(f"--ca-file {args.ca_file}: {getattr(exc, 'strerror', None) or exc}")
    password = None
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            return _fail("--password-stdin: no password on stdin")
    settings = Settings(
        target=target,
        timeout=args.timeout,
        servername=args.servername,
        ca_file=args.ca_file,
        user=args.user,
        password=password,
    )
    try:
        observations = asyncio.run(gather(settings))
    except Unreachable as exc:
        return _fail(f"cannot check {target}: {clean(str(exc), 200)}")
    results = evaluate(observations)
    if args.json:
        print(json.dumps(report(target.host, target.port, results), indent=2))
    else:
        width = max(len(r.id) for r in results)
        for r in results:
            print(f"{r.status:<4}  {r.id:<{width}}  {r.detail}")
    if observations.smuggling is None:
        print(
            f"{PROG}: smuggling.bare_lf not tested: it needs --user and --password-stdin",
            file=sys.stderr,
        )
    return EXIT_FAILED if failed(results) else EXIT_OK


def _fail(problem: str) -> int:
    print(f"{PROG}: {problem}", file=sys.stderr)
    return EXIT_USAGE
