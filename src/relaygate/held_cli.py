"""`relaygate held ...`: accounts whose mail the compromised-account defence holds.

cli.py registers these (``add_held_commands``) and dispatches to the handlers
here; the use cases are services/held.py's, shared with the API and the UI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from relaygate.accounts.store import AccountError
from relaygate.config import Config
from relaygate.durations import parse_duration
from relaygate.services.admin import run_admin
from relaygate.services.held import NotHeld, held_json, is_new, watch_json
from relaygate.times import rfc3339

PROG = "relaygate"


def add_held_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    held = commands.add_parser(
        "held",
        parents=[common],
        help="accounts whose outbound mail is held (compromised-account defence)",
        description="Accounts whose outbound mail the defence holds (docs/security.md):"
        " held mail was accepted with 250 but is not delivered until released.",
    )
    actions = held.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="held accounts and why")
    listing.set_defaults(only_reads=True, handler=held_list)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    # The commands on one ACCOUNT with a --json output: (name, help, --json help, handler).
    for name, text, json_text, handler in (
        (
            "show",
            "an account's hold and the networks and client names it logged in with",
            "print JSON",
            held_show,
        ),
        (
            "release",
            "deliver the account's held mail and lift the hold (raises its baseline a while)",
            "print the released message ids",
            held_release,
        ),
        (
            "purge",
            "drop the account's held mail (no bounce) and lift the hold",
            "print the purged message ids",
            held_purge,
        ),
    ):
        action = actions.add_parser(name, parents=[common], help=text)
        action.add_argument("account", metavar="ACCOUNT")
        action.add_argument("--json", action="store_true", help=json_text)
        action.set_defaults(handler=handler, only_reads=name == "show")
    expect = actions.add_parser(
        "expect",
        parents=[common],
        help="mark a burst as expected: raise the account's baseline for a while",
    )
    expect.add_argument("account", metavar="ACCOUNT")
    expect.add_argument(
        "--for",
        dest="duration",
        metavar="DURATION",
        default=None,
        help="how long (30m, 12h, 1d, ...; default [defence] expect_hours)",
    )
    expect.add_argument(
        "--messages",
        type=int,
        metavar="N",
        default=None,
        help="messages an hour to expect (default 1000); the threshold is volume_factor x N",
    )
    expect.set_defaults(handler=held_expect)


def _fail(text: str, status: int) -> int:
    print(f"{PROG}: {text}", file=sys.stderr)
    return status


def held_list(args: argparse.Namespace, config: Config) -> int:
    rows = run_admin(config, lambda admin: admin.held.accounts())
    if args.json:
        print(json.dumps([held_json(r) for r in rows], indent=2))
        return 0
    if not rows:
        print("no account is held")
        return 0
    header = ("ACCOUNT", "SINCE", "REASON", "HELD MESSAGES", "DETAIL")
    lines = [
        (
            r.account,
            "-" if r.since is None else rfc3339(r.since),
            r.reason or "-",
            str(r.messages),
            r.detail or "held mail without a hold (accepted as the hold was lifted)",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in (header, *lines)) for i in range(len(header))]
    for line in (header, *lines):
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
    return 0


def held_show(args: argparse.Namespace, config: Config) -> int:
    try:
        watch = run_admin(config, lambda admin: admin.held.show(args.account))
    except (NotHeld, AccountError) as exc:
        return _fail(str(exc), 1)
    now = time.time()
    if args.json:
        print(json.dumps(watch_json(watch, now), indent=2))
        return 0
    print(f"account: {watch.account}")
    h = watch.held
    if h is None:
        print("held: no")
    else:
        since = "(held mail without a hold)" if h.since is None else f"since {rfc3339(h.since)}"
        print(f"held: {since}, {h.reason or '-'}, {h.messages} message(s): {h.detail or '-'}")
    for title, rows in (("networks", watch.networks), ("clients (EHLO)", watch.clients)):
        print(f"{title}, most recent first:" if rows else f"{title}: none seen")
        for s in rows:
            mark = "  new" if s.kind == "network" and is_new(s, now) else ""
            print(f"  {s.value}  first {rfc3339(s.first_seen)}  last {rfc3339(s.last_seen)}{mark}")
    return 0


def _report(args: argparse.Namespace, ids: list[str], what: str) -> None:
    if args.json:
        print(json.dumps({"account": args.account.lower(), what: ids}, indent=2))
    else:
        print(f"{what} {len(ids)} held message(s) of {args.account.lower()}")


def held_release(args: argparse.Namespace, config: Config) -> int:
    seconds = config.defence.expect_hours * 3600
    try:
        ids = run_admin(config, lambda admin: admin.held.release(args.account, seconds))
    except NotHeld as exc:
        return _fail(str(exc), 1)
    _report(args, ids, "released")
    return 0


def held_purge(args: argparse.Namespace, config: Config) -> int:
    try:
        ids = run_admin(config, lambda admin: admin.held.purge(args.account))
    except NotHeld as exc:
        return _fail(str(exc), 1)
    _report(args, ids, "purged")
    return 0


def held_expect(args: argparse.Namespace, config: Config) -> int:
    seconds: float = config.defence.expect_hours * 3600
    if args.duration is not None:
        try:
            seconds = parse_duration(args.duration)
        except ValueError as exc:
            return _fail(f"--for: {exc}", 2)
        if seconds <= 0:
            return _fail("--for: must be longer than 0s", 2)
    if args.messages is not None and args.messages < 0:
        return _fail("--messages must be a whole number >= 0", 2)
    try:
        done = run_admin(
            config, lambda admin: admin.held.expect(args.account, seconds, args.messages)
        )
    except NotHeld as exc:
        return _fail(str(exc), 1)
    left = max(0, round((done.until - time.time()) / 3600, 1))
    print(
        f"{done.account}: {done.messages} messages an hour expected until {rfc3339(done.until)}"
        f" ({left} h)"
    )
    return 0
