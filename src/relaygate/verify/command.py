"""``relaygate verify``: addresses from the command line or a file, results as
a table, JSON lines or CSV. Needs no running server and no data_dir: with
--config it reads [verify] and [delivery]; without, defaults and the system
resolver.

Exit status: 0 when it ran (whatever the results), 2 for a usage error (no
addresses, an unreadable or empty file), 1 for a runtime failure.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from relaygate.config import Config
from relaygate.delivery.remote_text import clean
from relaygate.verify.classify import Verdict
from relaygate.verify.verifier import Verifier

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
MAX_FILE_LINE = 1000  # characters: longer lines are not addresses
CSV_FIELDS = ("address", "result", "reasons", "mx", "smtp_code", "smtp_text", "catch_all", "detail")


class UsageError(Exception):
    pass


def add_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    verify = commands.add_parser(
        "verify",
        parents=[common],
        help="check addresses: syntax, domain, MX, disposable, role; --smtp asks the MX",
        description="Check each ADDRESS (or each line of --file): syntax, that its domain"
        " exists and takes mail (MX, implicit MX, null MX), disposable domain, role address;"
        " with --smtp ask its MX with RCPT (never DATA) and detect catch-all domains."
        " Exit 0 when it ran, whatever the results; 2 for a usage error; 1 on failure."
        " See docs/verify.md.",
    )
    verify.add_argument("addresses", metavar="ADDRESS", nargs="*", help="addresses to check")
    verify.add_argument("--json", action="store_true", help="one JSON object per address and line")
    verify.add_argument("--smtp", action="store_true", help="also ask the domain's MX (RCPT TO)")
    verify.add_argument(
        "--file",
        metavar="LIST",
        help="read addresses, one a line, or a CSV with an 'email' column; writes CSV"
        " (or JSON lines with --json); '-' is standard input",
    )
    verify.add_argument(
        "--concurrency",
        type=int,
        default=10,
        metavar="N",
        help="domains checked at once (default 10; per-host limits still apply)",
    )
    verify.set_defaults(handler=run)


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        addresses = list(args.addresses)
        if args.file is not None:
            addresses += read_list(args.file)
        if not addresses:
            raise UsageError("no addresses: give ADDRESS arguments or --file LIST")
        if args.concurrency < 1 or args.concurrency > 1000:
            raise UsageError("--concurrency must be between 1 and 1000")
    except UsageError as exc:
        print(f"relaygate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    progress = Progress(len(addresses)) if args.file is not None and sys.stderr.isatty() else None
    try:
        verdicts = asyncio.run(
            Verifier(config).verify(
                addresses,
                smtp=args.smtp,
                concurrency=args.concurrency,
                progress=progress.step if progress else None,
            )
        )
    finally:
        if progress:
            progress.done()
    out = sys.stdout
    if args.json:
        for verdict in verdicts:
            out.write(json.dumps(verdict.as_json(), ensure_ascii=True) + "\n")
    elif args.file is not None:
        write_csv(out, verdicts)
    else:
        out.write(table(verdicts))
    return EXIT_OK


def read_list(name: str) -> list[str]:
    """Addresses from a file: one a line, or a CSV whose header has ``email``."""
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{name}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{name}: not UTF-8 text") from None
    lines = text.splitlines()
    first = lines[0] if lines else ""
    header = [c.strip().lower() for c in next(csv.reader([first]))] if first else []
    if "email" in header:
        column = header.index("email")
        found = [
            row[column]
            for row in csv.reader(io.StringIO("\n".join(lines[1:])))
            if len(row) > column and row[column].strip()
        ]
    else:
        found = [
            line for line in (raw.strip() for raw in lines) if line and not line.startswith("#")
        ]
    too_long = [a for a in found if len(a) > MAX_FILE_LINE]
    if too_long:
        raise UsageError(f"{name}: a line longer than {MAX_FILE_LINE} characters is no address")
    if not found:
        raise UsageError(f"{name}: no addresses in it")
    return found


def write_csv(out: TextIO, verdicts: Iterable[Verdict]) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for v in verdicts:
        writer.writerow(
            [
                clean(v.address),
                v.result,
                " ".join(v.reasons),
                " ".join(v.mx),
                "" if v.smtp is None else v.smtp.code,
                "" if v.smtp is None else v.smtp.text,
                "" if v.catch_all is None else str(v.catch_all).lower(),
                v.detail,
            ]
        )


def table(verdicts: Iterable[Verdict]) -> str:
    rows = [("ADDRESS", "RESULT", "REASONS", "DETAIL")]
    for v in verdicts:
        said = f"{v.smtp.code} {v.smtp.text}" if v.smtp is not None else v.detail
        rows.append((clean(v.address, 80), v.result, ",".join(v.reasons) or "-", clean(said, 120)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3]
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


class Progress:
    """A one-line bar on standard error (only when it is a terminal)."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._done = 0

    def step(self, _: Verdict) -> None:
        self._done += 1
        if self._done == self._total or self._done % 25 == 0:
            filled = int(30 * self._done / self._total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self._done}/{self._total}")
            sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()
