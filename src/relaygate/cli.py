"""The ``relaygate`` command: run the server, manage accounts, read captured mail.

Account and credential commands write straight to the database and need no
running server: the server reads the account (or credential) afresh on every
AUTH, so changes apply at once.

Every mistake a user can make ends with one line per problem on standard
error, prefixed ``relaygate: ``, and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import secrets
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta

import psycopg

from relaygate import __version__, config_check, config_docs, config_toml, health
from relaygate.accounts.credentials import (
    LIMIT_KEYS,
    MAX_LIMIT,
    Credential,
    CredentialError,
)
from relaygate.accounts.store import (
    Account,
    AccountError,
    normalize_address,
)
from relaygate.audit import command as audit_command
from relaygate.config import ENV_VAR, Config, ConfigError, load_config
from relaygate.delivery.dkim import (
    DEFAULT_SELECTORS,
    KEY_TYPES,
    DKIMError,
)
from relaygate.durations import format_duration, parse_duration
from relaygate.held_cli import add_held_commands
from relaygate.json_views import (
    account_json,
    credential_json,
    message_detail_json,
    message_json,
    queue_entry_json,
    token_json,
)
from relaygate.server import reload
from relaygate.services.admin import (
    AdminServices,
    MessageView,
    NotFound,
    TokenError,
    no_body_text,
    run_admin,
)
from relaygate.services.errors import error_kind
from relaygate.stats import MAX_HOURS
from relaygate.storage import bodies
from relaygate.storage import sqlite as sqlite_storage
from relaygate.storage.api import DeliveryAttempt, MessageRecord, NodeRecord, QueueEntry
from relaygate.storage.copy import CopyError, copy_to_postgres
from relaygate.storage.message_query import MessageQuery
from relaygate.storage.node import open_admin_storage
from relaygate.storage.postgres import pool as postgres_pool
from relaygate.storage.postgres.backend import PostgresStorage
from relaygate.storage.postgres.nodes import ALIVE_FOR as NODE_ALIVE_FOR
from relaygate.storage.postgres.pool import PostgresUnavailable
from relaygate.storage.sqlite import DatabaseError
from relaygate.times import rfc3339
from relaygate.verify import command as verify_command

PROG = "relaygate"
# Exit statuses (README "Exit status"): 0 done, 1 a runtime error (no such
# account, storage unreachable, server not running), 2 a usage or config error
# (the same status argparse uses for a bad command line).
EXIT_RUNTIME_ERROR = 1
EXIT_USER_ERROR = 2
SUBJECT_WIDTH = 50  # longer subjects are cut in `messages list` to keep rows on one line


class CommandError(Exception):
    """A user mistake a command finds itself (bad expiry, empty password): exit 2."""


class CommandFailed(Exception):
    """A runtime failure a command finds itself (no server running, no data): exit 1."""


Handler = Callable[[argparse.Namespace, Config], int]
Standalone = Callable[[argparse.Namespace], int]  # reads no config first (`config check`)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        standalone: Standalone | None = getattr(args, "standalone", None)
        if standalone is not None:
            return standalone(args)
        handler: Handler = args.handler
        config = load_config(getattr(args, "config", None))
        if getattr(args, "only_reads", False):
            _need_data(config)
        return handler(args, config)
    except ConfigError as exc:
        return _fail(*exc.problems)
    except CommandFailed as exc:
        return _fail(str(exc), status=EXIT_RUNTIME_ERROR)
    except (
        AccountError,
        CommandError,
        CredentialError,
        NotFound,
        TokenError,
        DKIMError,
        bodies.BodyMissing,
    ) as exc:
        # A missing or conflicting thing is the state of the data (1); a
        # request worded wrong is the user's to correct (2).
        kind = error_kind(exc)
        return _fail(str(exc), status=EXIT_USER_ERROR if kind == "invalid" else EXIT_RUNTIME_ERROR)
    except DatabaseError as exc:
        return _fail(str(exc), status=EXIT_RUNTIME_ERROR)
    except PostgresUnavailable as exc:
        return _fail(f"storage: {exc}", status=EXIT_RUNTIME_ERROR)
    except psycopg.Error as exc:
        return _fail(f"storage: {' '.join(str(exc).split())}", status=EXIT_RUNTIME_ERROR)
    except sqlite3.Error as exc:
        return _fail(f"database error: {exc}", status=EXIT_RUNTIME_ERROR)
    except BrokenPipeError:
        # The reader went away (`relaygate messages list | head`): stop quietly
        # like other Unix tools, and point stdout at /dev/null so Python's own
        # flush at exit does not report the broken pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
        return _fail(text, status=EXIT_RUNTIME_ERROR)
    except KeyboardInterrupt:
        return 130  # what a shell reports for a command ended by Ctrl-C


def _fail(*problems: str, status: int = EXIT_USER_ERROR) -> int:
    for problem in problems:
        print(f"{PROG}: {problem}", file=sys.stderr)
    return status


def _need_data(config: Config) -> None:
    """Commands that only read never make a data_dir: with none, say where we looked."""
    if config.storage.url is None and not config.database_path.is_file():
        where = (
            f"the config file {config.source}"
            if config.source is not None
            else f"quickstart settings: no --config and no ${ENV_VAR}"
        )
        raise CommandFailed(
            f"no relaygate data in {config.data_dir} (it has no {config.database_path.name};"
            f" that data_dir is from {where})"
        )


# ----------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    # Every parser shares this parent so --config works before or after the
    # subcommand. SUPPRESS keeps a subcommand's parser from overwriting a
    # value given earlier on the line with its own default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"configuration file (default: ${ENV_VAR}; if unset, quickstart settings)",
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Authenticated SMTP submission server and relay.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the SMTP server")
    serve.set_defaults(handler=_serve)
    migrate = commands.add_parser(
        "migrate",
        parents=[common],
        help="create or upgrade the database schema",
        description="Create or upgrade the schema of [storage] url (PostgreSQL) or of the"
        " SQLite database in data_dir. Idempotent; serve runs it too.",
    )
    migrate.set_defaults(handler=_migrate)
    storage_parser = commands.add_parser(
        "storage", parents=[common], help="move data between storage backends"
    )
    storage_actions = storage_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    copy = storage_actions.add_parser(
        "copy",
        parents=[common],
        help="copy this data_dir's SQLite data into an empty PostgreSQL database",
        description="Copy accounts, credentials, limits, DKIM keys, server secrets, the"
        " message log and the queue from the SQLite database in data_dir into an empty"
        " PostgreSQL database (the schema is made first). Stop serve before copying.",
    )
    copy.add_argument("--to", required=True, metavar="URL", help="postgresql://...")
    copy.set_defaults(handler=_storage_copy)
    nodes = commands.add_parser(
        "nodes", parents=[common], help="the nodes sharing this PostgreSQL database"
    )
    nodes.add_argument("--json", action="store_true", help="print JSON instead of a table")
    nodes.set_defaults(handler=_nodes)
    stats_parser = commands.add_parser(
        "stats",
        parents=[common],
        help="counts per hour: accepted, delivered, deferred, bounced, refused, failed logins",
    )
    stats_parser.add_argument(
        "--hours", type=int, default=24, help=f"the last N hours (1 to {MAX_HOURS}; default 24)"
    )
    stats_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats_parser.set_defaults(handler=_stats, only_reads=True)

    health = commands.add_parser(
        "health",
        parents=[common],
        help="is the server healthy? listeners, storage, queue, certificate (exit 0 or 1)",
        description="Check this node as a monitoring script would: every listener answers"
        " with 220, the storage answers, the queue's oldest message, the certificate's expiry."
        " Exit 0 when healthy (warnings allowed), 1 when not, 2 for a config error.",
    )
    health.add_argument("--json", action="store_true", help="print JSON instead of lines")
    health.add_argument("--strict", action="store_true", help="a warning is unhealthy too")
    health.set_defaults(handler=_health)
    reload_parser = commands.add_parser(
        "reload",
        parents=[common],
        help="make the running server re-read its config, certificate and keys (SIGHUP)",
        description="Check the config file, then send SIGHUP to the relaygate serve using"
        " its data_dir and wait for its answer. Settings that need a restart are named.",
    )
    reload_parser.set_defaults(handler=_reload)

    audit_command.register(commands, common)
    _add_config_commands(commands, common)
    _add_user_commands(commands, common)
    _add_credential_commands(commands, common)
    _add_message_commands(commands, common)
    _add_queue_commands(commands, common)
    _add_dkim_commands(commands, common)
    _add_token_commands(commands, common)
    add_held_commands(commands, common)
    verify_command.add_parser(commands, common)
    return parser


def _add_config_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    config = commands.add_parser(
        "config", parents=[common], help="check a config file, show the settings in effect"
    )
    actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    file_help = "the config file (default: --config, else $" + ENV_VAR + ")"
    check = actions.add_parser(
        "check",
        parents=[common],
        help="validate a config file as serve would, changing nothing",
        description="Validate FILE as serve would: syntax, keys, values, readable files, the"
        " [tls] certificate and key, DKIM keys, whether data_dir and the log file can be"
        " made. Creates nothing; does not connect to PostgreSQL or Redis nor bind ports."
        " Prints 'FILE: ok' (exit 0) or every problem, one line each (exit 2).",
    )
    check.add_argument("file", metavar="FILE", nargs="?", help=file_help)
    check.set_defaults(standalone=_config_check)
    show = actions.add_parser(
        "show",
        parents=[common],
        help="print the settings in effect as TOML, defaults filled in, passwords masked",
        description="Print the configuration in effect as TOML that config check accepts"
        " again: every default filled in, paths absolute, passwords in URLs as ***."
        " Without a file: the quickstart settings.",
    )
    show.add_argument("file", metavar="FILE", nargs="?", help=file_help)
    show.add_argument(
        "--changed",
        action="store_true",
        help="only what differs from the defaults (like postconf -n)",
    )
    show.set_defaults(standalone=_config_show)
    example = actions.add_parser(
        "example",
        parents=[common],
        help="print an example config: every setting, commented, with its default",
        description="Print relaygate.example.toml for this version: every setting"
        " commented out with its default and a description.",
    )
    example.set_defaults(standalone=_config_example)


def _config_file(args: argparse.Namespace) -> str | None:
    file: str | None = args.file or getattr(args, "config", None) or os.environ.get(ENV_VAR)
    return file or None


def _config_check(args: argparse.Namespace) -> int:
    file = _config_file(args)
    if file is None:
        raise ConfigError(
            [
                f"config check: no file given: name one, or set --config or ${ENV_VAR}"
                " (without one, relaygate runs with quickstart settings)"
            ]
        )
    config_check.check(file)
    print(f"{PROG}: {file}: ok")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    file = _config_file(args)
    config = load_config(file)
    found = config_toml.sections(config)
    preface = [
        f"{PROG} {__version__}: the settings in effect"
        + (f" from {file}" if file else ": quickstart, no config file"),
    ]
    if args.changed:
        defaults = config_toml.sections(config_toml.default_config(config))
        found = config_toml.changed_only(found, defaults)
        preface.append("only what differs from the defaults; passwords in URLs shown as ***")
    else:
        preface.append("every default filled in; passwords in URLs shown as ***")
    sys.stdout.write(config_toml.render_show(config_toml.mask_secrets(found), preface))
    return 0


def _config_example(args: argparse.Namespace) -> int:
    sys.stdout.write(config_docs.example())
    return 0


def _add_user_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    user = commands.add_parser("user", parents=[common], help="manage accounts")
    actions = user.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    password_help = (
        "read the password from the first line of standard input"
        " (default: generate one and print it once)"
    )
    add = action("add", _user_add, "create an account")
    add.add_argument("address", metavar="ADDRESS")
    add.add_argument("--password-stdin", action="store_true", help=password_help)
    add.add_argument(
        "--sender",
        action="append",
        metavar="PATTERN",
        help="an address or @domain this account may send as; repeat for more"
        " (default: the account's own address)",
    )
    add.add_argument(
        "--admin", action="store_true", help="may see and manage everything in the web UI"
    )

    admin = action("admin", _user_admin, "let an account manage everything in the web UI, or not")
    admin.add_argument("address", metavar="ADDRESS")
    admin.add_argument("state", choices=("on", "off"), help="on: an admin; off: only its own")

    passwd = action("passwd", _user_passwd, "set a new password")
    passwd.add_argument("address", metavar="ADDRESS")
    passwd.add_argument("--password-stdin", action="store_true", help=password_help)

    for name, handler, help_text in (
        ("disable", _user_disable, "refuse logins for an account, keeping it"),
        ("enable", _user_enable, "allow logins for a disabled account again"),
        ("remove", _user_remove, "delete an account"),
    ):
        action(name, handler, help_text).add_argument("address", metavar="ADDRESS")

    senders = action("senders", _user_senders, "replace the addresses an account may send as")
    senders.add_argument("address", metavar="ADDRESS")
    senders.add_argument("patterns", metavar="PATTERN", nargs="+", help="a full address or @domain")

    listing = action("list", _user_list, "show all accounts")
    listing.set_defaults(only_reads=True)  # never makes a data_dir
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")

    limits = action(
        "limits",
        _user_limits,
        "show or set an account's sending limits (with no option: show them)",
    )
    limits.add_argument("address", metavar="ADDRESS")
    _add_limit_options(limits, "the server's default")


def _add_credential_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    credential = commands.add_parser(
        "credential",
        parents=[common],
        help="manage app credentials (extra secrets an account logs in with)",
    )
    actions = credential.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        sub.add_argument("address", metavar="ADDRESS", help="the account it belongs to")
        return sub

    add = action(
        "add",
        _credential_add,
        "create a credential and print its secret once; log in with the account's address"
        " as user name and the secret as password",
    )
    add.add_argument("--name", required=True, help="1-64 letters, digits, '.', '-' or '_'")
    add.add_argument(
        "--expires",
        metavar="DATE",
        help="YYYY-MM-DD: valid through that day (until 00:00 UTC the next day);"
        " or an ISO 8601 time with zone, such as 2026-12-31T18:00:00+01:00"
        " (default: never)",
    )
    add.add_argument(
        "--sender",
        action="append",
        metavar="PATTERN",
        help="an address or @domain it may send as, one the account may use too;"
        " repeat for more (default: the account's patterns)",
    )
    add.add_argument(
        "--network",
        action="append",
        metavar="CIDR",
        help="a client address or network it may log in from, such as 192.0.2.0/24;"
        " repeat for more (default: any)",
    )

    listing = action("list", _credential_list, "show an account's credentials")
    listing.set_defaults(only_reads=True)  # never makes a data_dir
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")

    revoke = action("revoke", _credential_revoke, "refuse further logins with a credential")
    revoke.add_argument("name", metavar="NAME")

    limits = action(
        "limits",
        _credential_limits,
        "show or set a credential's own sending limits (with no option: show them)",
    )
    limits.add_argument("name", metavar="NAME")
    _add_limit_options(limits, "no limit of its own")


def _add_limit_options(parser: argparse.ArgumentParser, unset: str) -> None:
    for key in LIMIT_KEYS:
        parser.add_argument(
            "--" + key.replace("_", "-"),
            dest=key,
            type=_limit_value,
            metavar="N",
            help=f"0 = unlimited (not given: keep the current value; never set: {unset})",
        )
    parser.add_argument(
        "--clear", action="store_true", help="remove every override (before applying any given)"
    )


def _limit_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 0 (unlimited) to {MAX_LIMIT} (got {text!r})"
        )
    return value


def _add_message_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    messages = commands.add_parser("messages", parents=[common], help="read captured messages")
    actions = messages.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", parents=[common], help="show the newest messages")
    listing.set_defaults(only_reads=True)  # never makes a data_dir
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.add_argument(
        "--limit", type=_positive_int, default=50, metavar="N", help="at most N (default: 50)"
    )
    listing.add_argument("--account", metavar="ADDRESS", help="sent by this account")
    listing.add_argument("--status", metavar="STATUS", help="captured, queued, delivered, ...")
    listing.add_argument(
        "--search", metavar="TEXT", help="in the subject, sender, recipients, account or id"
    )
    listing.add_argument(
        "--since", metavar="TIME", help="received at or after (YYYY-MM-DD, UTC, or ISO 8601)"
    )
    listing.add_argument("--until", metavar="TIME", help="received before (same forms)")
    listing.set_defaults(handler=_messages_list)

    search = actions.add_parser(
        "search", parents=[common], help="find messages by sender, recipient, subject, ..."
    )
    search.set_defaults(only_reads=True)  # never makes a data_dir
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.add_argument(
        "--limit", type=_positive_int, default=50, metavar="N", help="at most N (default: 50)"
    )
    search.add_argument("--from", dest="mail_from", metavar="TEXT", help="in the envelope sender")
    search.add_argument("--to", dest="rcpt_to", metavar="TEXT", help="in a recipient's address")
    search.add_argument("--subject", metavar="TEXT", help="in the subject")
    search.add_argument("--account", metavar="ADDRESS", help="sent by this account")
    search.add_argument("--status", metavar="STATUS", help="captured, queued, delivered, ...")
    search.add_argument(
        "--since", metavar="TIME", help="received at or after (YYYY-MM-DD, UTC, or ISO 8601)"
    )
    search.add_argument("--until", metavar="TIME", help="received before (same forms)")
    search.set_defaults(handler=_messages_list, search=None)

    show = actions.add_parser("show", parents=[common], help="show one message")
    show.set_defaults(only_reads=True)  # never makes a data_dir
    show.add_argument("message_id", metavar="ID")
    form = show.add_mutually_exclusive_group()
    form.add_argument(
        "--raw", action="store_true", help="write the exact stored bytes and nothing else"
    )
    form.add_argument(
        "--text", action="store_true", help="the text body, decoded (else the HTML as text)"
    )
    form.add_argument("--html", action="store_true", help="the HTML body, decoded")
    form.add_argument("--headers", action="store_true", help="the header fields, decoded")
    form.add_argument(
        "--part",
        type=_part_number,
        metavar="N",
        help="write part N decoded, byte for byte (N as in `--json`'s parts)",
    )
    form.add_argument(
        "--json", action="store_true", help="record, header fields, parts and history as JSON"
    )
    show.set_defaults(handler=_messages_show)

    delete = actions.add_parser(
        "delete", parents=[common], help="remove messages: record, body and queue rows"
    )
    delete.set_defaults(only_reads=True)  # nothing to delete without a data_dir: never makes one
    delete.add_argument("message_ids", metavar="ID", nargs="+")
    delete.set_defaults(handler=_messages_delete)

    prune = actions.add_parser(
        "prune", parents=[common], help="remove messages older than a duration"
    )
    prune.set_defaults(only_reads=True)  # nothing to prune without a data_dir: never makes one
    prune.add_argument(
        "--older-than",
        required=True,
        type=_duration,
        metavar="DURATION",
        help="received longer ago than this: 30d, 12h, 90m, 45s",
    )
    prune.set_defaults(handler=_messages_prune)


def _part_number(text: str) -> int:
    if not text.isdigit() or len(text) > 6:
        raise argparse.ArgumentTypeError(f"must be a part number such as 2 (got {text!r})")
    return int(text)


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_queue_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    queue = commands.add_parser(
        "queue", parents=[common], help="messages waiting for onward delivery"
    )
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="what is waiting, and why")
    listing.set_defaults(only_reads=True)  # never makes a data_dir
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_queue_list)
    show = actions.add_parser("show", parents=[common], help="one message's delivery history")
    show.set_defaults(only_reads=True)  # never makes a data_dir
    show.add_argument("message_id", metavar="ID")
    show.set_defaults(handler=_queue_show)
    retry = actions.add_parser("retry", parents=[common], help="try again now")
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("message_id", metavar="ID", nargs="?")
    target.add_argument("--all", action="store_true", help="every queued message")
    retry.set_defaults(handler=_queue_retry)
    delete = actions.add_parser(
        "delete", parents=[common], help="stop delivering a message (no bounce is sent)"
    )
    delete.add_argument("message_id", metavar="ID")
    delete.set_defaults(handler=_queue_delete)


def _add_dkim_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    dkim = commands.add_parser(
        "dkim", parents=[common], help="manage DKIM signing keys (kept in the data directory)"
    )
    actions = dkim.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    generate = action(
        "generate",
        _dkim_generate,
        "create a signing key for a domain and print the DNS TXT record to publish",
    )
    generate.add_argument("domain", metavar="DOMAIN", help="the domain of the From addresses")
    generate.add_argument(
        "--algorithm",
        choices=KEY_TYPES,
        default="rsa",
        help="rsa (2048 bits, understood everywhere) or ed25519 (RFC 8463);"
        " a domain may have both, and then mail is signed with both (default: rsa)",
    )
    generate.add_argument(
        "--selector",
        metavar="S",
        help="the name the key is published under, S._domainkey.DOMAIN (default: "
        + ", ".join(f"{s} for {t}" for t, s in DEFAULT_SELECTORS.items())
        + ")",
    )

    listing = action("list", _dkim_list, "show all signing keys")
    listing.set_defaults(only_reads=True)  # never makes a data_dir
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")

    show = action("show", _dkim_show, "print a domain's DNS TXT records again")
    show.set_defaults(only_reads=True)  # never makes a data_dir
    show.add_argument("domain", metavar="DOMAIN")


def _add_token_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    token = commands.add_parser(
        "token", parents=[common], help="manage bearer tokens for the HTTP API"
    )
    actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    add = action("add", _token_add, "create a token and print it (shown this once only)")
    add.add_argument("name", metavar="NAME", help="what the token is for: logs name it")
    add.add_argument(
        "--read-only", action="store_true", help="the token may read, never change (403)"
    )
    listing = action("list", _token_list, "show the tokens (never their secrets)")
    listing.set_defaults(only_reads=True)  # never makes a data_dir
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    revoke = action("revoke", _token_revoke, "delete a token: it stops working at once")
    revoke.add_argument("name", metavar="NAME")


def _token_add(args: argparse.Namespace, config: Config) -> int:
    stored, secret = run_admin(
        config, lambda admin: admin.tokens.add(args.name, read_only=args.read_only)
    )
    kind = "read-only" if stored.read_only else "read-write"
    print(f"token {stored.name} ({kind}): {secret}")
    print("This is the only time it is shown; send it as 'Authorization: Bearer <token>'.")
    return 0


def _token_list(args: argparse.Namespace, config: Config) -> int:
    tokens = run_admin(config, lambda admin: admin.tokens.list())
    if args.json:
        print(json.dumps([token_json(t) for t in tokens], indent=2))
    elif not tokens:
        print("no tokens; add one with: relaygate token add NAME [--read-only]")
    else:
        _print_table(
            ("NAME", "ACCESS", "CREATED", "LAST USED"),
            [
                (
                    t.name,
                    "read-only" if t.read_only else "read-write",
                    _local_time(t.created_at),
                    _optional_time(t.last_used, "never"),
                )
                for t in tokens
            ],
        )
    return 0


def _token_revoke(args: argparse.Namespace, config: Config) -> int:
    run_admin(config, lambda admin: admin.tokens.revoke(args.name))
    print(f"token {args.name} revoked")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (got {text!r})")
    return value


# ------------------------------------------------------------------ commands


def _serve(args: argparse.Namespace, config: Config) -> int:
    # Imported here so account and message commands never load the server stack.
    from relaygate.server.supervisor import serve  # noqa: PLC0415

    return serve(config)


def _migrate(args: argparse.Namespace, config: Config) -> int:
    if config.storage.url is None:
        before, after = sqlite_storage.migrate(config.database_path)
        where = str(config.database_path)
    else:
        before, after = asyncio.run(postgres_pool.migrate(config.storage.url))
        where = postgres_pool.describe(config.storage.url)
    if before == after:
        print(f"{where}: schema {after}, up to date")
    else:
        print(f"{where}: schema {before} -> {after}")
    return 0


def _storage_copy(args: argparse.Namespace, config: Config) -> int:
    url = args.to
    if not url.lower().startswith(("postgresql://", "postgres://")):
        raise CommandError(f"--to must be a postgresql:// URL, not {url!r}")
    if _serve_running(config):
        raise CommandError(
            f"relaygate serve is running on {config.data_dir}; stop it first, so that"
            " nothing is accepted after the copy"
        )
    asyncio.run(postgres_pool.migrate(url))
    try:
        report = copy_to_postgres(config.database_path, config.data_dir, url)
    except CopyError as exc:
        raise CommandError(str(exc)) from None
    print(f"copied {config.database_path} to {postgres_pool.describe(url)}:")
    for what, count in report.counts.items():
        print(f"  {what}: {count}")
    print(
        "next: set [storage] url on every node (and [shared] redis_url for more than one),"
        " then start them"
    )
    return 0


def _health(args: argparse.Namespace, config: Config) -> int:
    async def checks() -> list[health.Check]:
        if config.storage.url is None and not config.database_path.is_file():
            return await health.run_checks(config, None)  # and make no database
        store = await open_admin_storage(config)
        try:
            return await health.run_checks(config, store.queue.summary)
        finally:
            await store.close()

    found = asyncio.run(checks())
    verdict = health.overall(found, args.strict)
    if args.json:
        print(json.dumps(health.check_json(found, args.strict), indent=2))
    else:
        for check in found:
            print(f"{check.status:4}  {check.name}: {check.detail}")
        print(f"relaygate is {'healthy' if verdict != 'fail' else 'NOT healthy'}")
    return 0 if verdict != "fail" else EXIT_RUNTIME_ERROR


RELOAD_WAIT = 10.0  # seconds to wait for the server's answer


def _reload(args: argparse.Namespace, config: Config) -> int:
    # main() loaded the file already: a broken one never reaches the server.
    pid = _serve_pid(config)
    if pid is None:
        raise CommandFailed(f"no relaygate serve is running on {config.data_dir}")
    before = reload.read_status(config.data_dir)
    asked = time.time()
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + RELOAD_WAIT
    while time.monotonic() < deadline:
        status = reload.read_status(config.data_dir)
        if status is not None and status != before and float(str(status.get("at", 0))) >= asked:
            break
        time.sleep(0.05)
    else:
        raise CommandFailed(f"relaygate serve (pid {pid}) did not answer within {RELOAD_WAIT:g} s")
    problems = _strings(status.get("problems"))
    if not status.get("ok"):
        return _fail(*problems, "reload refused; the running configuration stays")
    print(f"relaygate: reloaded (pid {pid})")
    restart = _strings(status.get("restart_needed"))
    if restart:
        print(f"relaygate: these settings change only with a restart: {', '.join(restart)}")
    return 0


def _strings(value: object) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list) else []


def _serve_pid(config: Config) -> int | None:
    """The pid of the ``serve`` holding this data_dir's lock, or None."""
    if not _serve_running(config):
        return None
    try:
        text = (config.data_dir / "serve.lock").read_text(encoding="ascii").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _serve_running(config: Config) -> bool:
    """Is a ``serve`` holding this data_dir's lock (server/supervisor.py)?"""
    lock = config.data_dir / "serve.lock"
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _nodes(args: argparse.Namespace, config: Config) -> int:
    if config.storage.url is None:
        raise CommandError(
            "nodes share a PostgreSQL database; this config has no [storage] url (one machine)"
        )
    url = config.storage.url

    async def read() -> list[NodeRecord]:
        store = await open_admin_storage(config)
        try:
            assert isinstance(store, PostgresStorage)
            return await store.nodes.list(time.time())
        finally:
            await store.close()

    records = asyncio.run(read())
    now = time.time()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": r.name,
                        "started": rfc3339(r.started_at),
                        "last_seen": rfc3339(r.last_seen),
                        "alive": now - r.last_seen <= NODE_ALIVE_FOR,
                        "pid": r.pid,
                        "version": r.version,
                        "leases": r.leases,
                    }
                    for r in records
                ],
                indent=2,
            )
        )
        return 0
    if not records:
        print(f"no node has used {postgres_pool.describe(url)} yet")
        return 0
    print(f"{'NODE':<20} {'STARTED':<20} {'LAST SEEN':<20} {'STATE':<6} {'LEASES':>6}  VERSION")
    for r in records:
        state = "up" if now - r.last_seen <= NODE_ALIVE_FOR else "gone"
        print(
            f"{r.name:<20} {_table_time(r.started_at):<20} {_table_time(r.last_seen):<20}"
            f" {state:<6} {r.leases:>6}  {r.version}"
        )
    return 0


def _table_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _new_password(from_stdin: bool) -> tuple[str, bool]:
    """The password to set, and whether we generated it (and so must show it)."""
    if not from_stdin:
        return secrets.token_urlsafe(18), True
    password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise CommandError("no password on standard input (the first line is empty)")
    return password, False  # its shape is checked by the admin use case


def _user_add(args: argparse.Namespace, config: Config) -> int:
    async def add(admin: AdminServices) -> tuple[Account, str, bool]:
        # Everything cheap first, so a typo costs neither the password on
        # stdin nor a slow hash.
        address = await admin.accounts.check_new(args.address, args.sender or None)
        password, generated = _new_password(args.password_stdin)
        account = await admin.accounts.add(address, password, args.sender or None)
        if args.admin:
            account = await admin.accounts.set_admin(address, True)
        return account, password, generated

    account, password, generated = run_admin(config, add)
    role = " (admin)" if account.admin else ""
    print(f"added {account.address}{role}, may send as: {', '.join(account.senders)}")
    if generated:
        print(f"password: {password}")
    return 0


def _user_admin(args: argparse.Namespace, config: Config) -> int:
    account = run_admin(
        config, lambda admin: admin.accounts.set_admin(args.address, args.state == "on")
    )
    if account.admin:
        print(f"{account.address} is an admin: it sees and manages everything in the web UI")
    else:
        print(f"{account.address} is not an admin: it sees only its own messages and credentials")
    return 0


def _user_passwd(args: argparse.Namespace, config: Config) -> int:
    async def change(admin: AdminServices) -> tuple[Account, str, bool]:
        await admin.accounts.get(args.address)
        password, generated = _new_password(args.password_stdin)
        return await admin.accounts.set_password(args.address, password), password, generated

    account, password, generated = run_admin(config, change)
    print(f"password changed for {account.address}")
    if generated:
        print(f"password: {password}")
    return 0


def _user_disable(args: argparse.Namespace, config: Config) -> int:
    return _set_disabled(args.address, config, disabled=True)


def _user_enable(args: argparse.Namespace, config: Config) -> int:
    return _set_disabled(args.address, config, disabled=False)


def _set_disabled(address: str, config: Config, *, disabled: bool) -> int:
    run_admin(config, lambda admin: admin.accounts.set_disabled(address, disabled))
    print(f"{'disabled' if disabled else 'enabled'} {address}")
    return 0


def _user_remove(args: argparse.Namespace, config: Config) -> int:
    run_admin(config, lambda admin: admin.accounts.remove(args.address))
    print(f"removed {args.address}")
    return 0


def _user_senders(args: argparse.Namespace, config: Config) -> int:
    account = run_admin(
        config, lambda admin: admin.accounts.set_senders(args.address, args.patterns)
    )
    print(f"{args.address} may send as: {', '.join(account.senders)}")
    return 0


def _user_list(args: argparse.Namespace, config: Config) -> int:
    async def read(admin: AdminServices) -> tuple[list[Account], dict[str, dict[str, int] | None]]:
        return await admin.accounts.list(), await admin.credentials.all_account_limits()

    accounts, limits = run_admin(config, read)
    if args.json:
        print(
            json.dumps([account_json(a, limits.get(a.address.lower())) for a in accounts], indent=2)
        )
    elif not accounts:
        print("no accounts yet; add one with: relaygate user add ADDRESS")
    else:
        _print_table(
            ("ADDRESS", "STATUS", "SENDERS", "LIMITS", "CREATED"),
            [
                (
                    a.address,
                    ("disabled" if a.disabled else "enabled") + (", admin" if a.admin else ""),
                    ", ".join(a.senders),
                    _limits_summary(limits.get(a.address.lower())),
                    _local_time(a.created_at),
                )
                for a in accounts
            ],
        )
    return 0


def _limit_changes(args: argparse.Namespace) -> dict[str, int]:
    return {key: getattr(args, key) for key in LIMIT_KEYS if getattr(args, key) is not None}


def _user_limits(args: argparse.Namespace, config: Config) -> int:
    changes = _limit_changes(args)
    account, limits = run_admin(
        config,
        lambda admin: admin.credentials.account_limits(args.address, changes, clear=args.clear),
    )
    _print_limits(account.address, limits, "the server's defaults apply")
    return 0


def _print_limits(subject: str, limits: dict[str, int] | None, unset: str) -> None:
    if not limits:
        print(f"{subject}: no limit overrides; {unset}")
        return
    print(f"{subject}: limit overrides:")
    for key in LIMIT_KEYS:
        if key in limits:
            print(f"  {key}: {_limit_text(limits[key])}")


def _limit_text(value: int) -> str:
    return "unlimited" if value == 0 else str(value)


def _limits_summary(limits: dict[str, int] | None) -> str:
    if not limits:
        return "default"
    return ", ".join(f"{key}={_limit_text(value)}" for key, value in limits.items())


# ---------------------------------------------------------------- credentials


def _credential_add(args: argparse.Namespace, config: Config) -> int:
    expires_at = _parse_expiry(args.expires, time.time()) if args.expires else None
    credential, secret = run_admin(
        config,
        lambda admin: admin.credentials.add(
            args.address,
            args.name,
            expires_at=expires_at,
            senders=args.sender,
            networks=args.network,
        ),
    )
    address = credential.account_address
    print(f"added credential {credential.name!r} for {address}")
    print(f"secret (shown only now): {secret}")
    print("  store it now: it cannot be shown again, only revoked and replaced")
    print(f"log in with AUTH PLAIN or LOGIN: user name {address}, password the secret")
    print(f"may send as: {_credential_senders(credential)}")
    print(f"networks: {_credential_networks(credential)}")
    print(f"expires: {_optional_time(credential.expires_at, 'never')}")
    return 0


# Later times could not be shown as local dates (year 10000 and beyond).
_LATEST_EXPIRY = datetime(9999, 1, 1, tzinfo=UTC).timestamp()


def _parse_expiry(text: str, now: float) -> float:
    """``--expires``: a date means through that day (UTC); a time needs its zone."""
    usage = (
        "use YYYY-MM-DD (valid through that day, UTC) or an ISO 8601 time with zone,"
        " such as 2026-12-31T18:00:00+01:00"
    )
    try:
        try:
            day = date.fromisoformat(text)
        except ValueError:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                raise CommandError(
                    f"invalid expiry: {text!r}: give the time zone, such as Z or +01:00"
                ) from None
        else:
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
        expires_at = moment.timestamp()
    except ValueError:
        raise CommandError(f"invalid expiry: {text!r}: {usage}") from None
    except OverflowError:
        raise CommandError(f"invalid expiry: {text!r}: too far in the future") from None
    if expires_at <= now:
        raise CommandError(f"invalid expiry: {text!r} is in the past")
    if expires_at >= _LATEST_EXPIRY:
        raise CommandError(f"invalid expiry: {text!r}: too far in the future")
    return expires_at


def _credential_list(args: argparse.Namespace, config: Config) -> int:
    credentials = run_admin(config, lambda admin: admin.credentials.list(args.address))
    now = time.time()
    if args.json:
        print(json.dumps([credential_json(c, now) for c in credentials], indent=2))
    elif not credentials:
        address = normalize_address(args.address)
        print(
            f"no credentials for {address}; add one with:"
            f" relaygate credential add {address} --name NAME"
        )
    else:
        _print_table(
            ("NAME", "STATUS", "SENDERS", "NETWORKS", "EXPIRES", "CREATED", "LAST USED"),
            [
                (
                    c.name,
                    c.status(now),
                    _credential_senders(c),
                    _credential_networks(c),
                    _optional_time(c.expires_at, "never"),
                    _local_time(c.created_at),
                    _optional_time(c.last_used_at, "never"),
                )
                for c in credentials
            ],
        )
    return 0


def _credential_senders(credential: Credential) -> str:
    return "account's" if credential.senders is None else ", ".join(credential.senders)


def _credential_networks(credential: Credential) -> str:
    return "any" if credential.networks is None else ", ".join(credential.networks)


def _credential_revoke(args: argparse.Namespace, config: Config) -> int:
    credential = run_admin(config, lambda admin: admin.credentials.revoke(args.address, args.name))
    print(f"revoked credential {credential.name!r} of {credential.account_address}")
    return 0


def _credential_limits(args: argparse.Namespace, config: Config) -> int:
    changes = _limit_changes(args)
    credential = run_admin(
        config,
        lambda admin: admin.credentials.limits(args.address, args.name, changes, clear=args.clear),
    )
    _print_limits(
        f"credential {credential.name!r} of {credential.account_address}",
        credential.limits,
        "only the account's limits apply",
    )
    return 0


def _list_time(text: str | None, option: str) -> float | None:
    """--since/--until: a date (its start, UTC) or an ISO 8601 time (UTC if no zone)."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CommandError(
            f"invalid {option}: {text!r}: use YYYY-MM-DD or an ISO 8601 time"
            " such as 2026-12-04T10:00:00Z"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _messages_list(args: argparse.Namespace, config: Config) -> int:
    """``messages list`` and ``messages search``."""
    query = MessageQuery(
        account=args.account,
        status=args.status,
        text=args.search,
        mail_from=getattr(args, "mail_from", None),
        rcpt_to=getattr(args, "rcpt_to", None),
        subject=getattr(args, "subject", None),
        since=_list_time(args.since, "--since"),
        until=_list_time(args.until, "--until"),
        limit=args.limit,
    )

    async def search(admin: AdminServices) -> list[MessageRecord]:
        return (await admin.messages.search(query))[0]

    records = run_admin(config, search)
    if args.json:
        print(json.dumps([message_json(record) for record in records], indent=2))
    elif not records:
        print("no messages captured yet" if args.action == "list" else "no message matches")
    else:
        _print_table(
            ("ID", "CREATED", "USER", "FROM", "TO", "SUBJECT", "SIZE", "STATUS"),
            [
                (
                    m.id,
                    _local_time(m.created_at),
                    m.account,
                    m.mail_from or "<>",
                    ", ".join(m.rcpt_to),
                    _shorten(m.subject, SUBJECT_WIDTH),
                    str(m.size),
                    m.status,
                )
                for m in records
            ],
        )
    return 0


def _messages_show(args: argparse.Namespace, config: Config) -> int:
    message_id = args.message_id
    if args.text or args.html:

        async def read(admin: AdminServices) -> str:
            if args.text:
                return await admin.messages.text(message_id)
            return await admin.messages.html(message_id)

        text = run_admin(config, read)
        print(_printable(text, keep="\n\t"), end="" if not text or text.endswith("\n") else "\n")
        return 0
    if args.part is not None:
        _, data = run_admin(config, lambda admin: admin.messages.part(message_id, args.part))
        _write_bytes(data)
        return 0
    if args.headers or args.json:
        view, found = run_admin(
            config, lambda admin: admin.messages.content(message_id, need_body=args.headers)
        )
        if args.headers:
            for name, value in found.headers:
                print(f"{_printable(name)}: {_printable(value)}")
        else:
            print(json.dumps(message_detail_json(view.record, view.history, found), indent=2))
        return 0
    view = run_admin(config, lambda admin: admin.messages.show(message_id))
    body = view.body
    if args.raw:
        if body is None:
            raise NotFound(no_body_text(view.record))
        _write_bytes(body)
        return 0
    message = message_json(view.record)
    for label, value in (
        ("id", message["id"]),
        ("created", _local_time(view.record.created_at)),
        ("user", message["account"]),
        ("credential", message["credential"] or "(password)"),
        ("client ip", message["client_ip"]),
        ("from", message["mail_from"] or "<>"),
        ("to", ", ".join(message["rcpt_to"])),
        ("subject", message["subject"]),
        ("size", str(message["size"])),
        ("status", message["status"]),
    ):
        print(f"{label}: {_printable(value)}")
    if view.history:
        _print_history(view.history)
    print()
    if body is None:
        print(f"({no_body_text(view.record)})")
    else:
        text = body.decode("utf-8", errors="replace").replace("\r\n", "\n")
        print(_printable(text, keep="\n\t"), end="" if text.endswith("\n") else "\n")
    return 0


def _write_bytes(data: bytes) -> None:
    """Exact bytes to stdout (a pipe or file: this is what --raw and --part are for)."""
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _messages_delete(args: argparse.Namespace, config: Config) -> int:
    result = run_admin(config, lambda admin: admin.messages.delete(args.message_ids))
    for message_id in result.removed:
        print(f"deleted {message_id}")
    for message_id in result.unknown:
        print(f"{PROG}: no such message: {message_id}", file=sys.stderr)
    for message_id in result.sending:
        print(
            f"{PROG}: message {message_id} is being delivered right now; not deleted,"
            " try again in a moment",
            file=sys.stderr,
        )
    return EXIT_RUNTIME_ERROR if result.unknown or result.sending else 0


def _messages_prune(args: argparse.Namespace, config: Config) -> int:
    count = run_admin(config, lambda admin: admin.messages.prune(args.older_than, time.time()))
    age = format_duration(args.older_than)
    print(f"removed {count} message{'' if count == 1 else 's'} older than {age}")
    return 0


# ---------------------------------------------------------------------- dkim


def _dkim_generate(args: argparse.Namespace, config: Config) -> int:
    stored = run_admin(
        config, lambda admin: admin.dkim.generate(args.domain, args.selector, args.algorithm)
    )
    key = stored.key
    print(f"wrote {key.key_type} key for {key.domain}, selector {key.selector}, to")
    print(f"  {stored.where}")
    print("publish this DNS TXT record (one record; a resolver joins its quoted strings):")
    print(stored.record)
    return 0


def _dkim_list(args: argparse.Namespace, config: Config) -> int:
    keys = run_admin(config, lambda admin: admin.dkim.all())
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "domain": k.key.domain,
                        "selector": k.key.selector,
                        "algorithm": k.key.algorithm,
                        "file": k.where,
                        "dns_name": k.key.dns_name,
                    }
                    for k in keys
                ],
                indent=2,
            )
        )
    elif not keys:
        print("no DKIM keys yet; create one with: relaygate dkim generate DOMAIN")
    else:
        _print_table(
            ("DOMAIN", "SELECTOR", "ALGORITHM", "FILE"),
            [(k.key.domain, k.key.selector, k.key.algorithm, k.where) for k in keys],
        )
    return 0


def _dkim_show(args: argparse.Namespace, config: Config) -> int:
    for stored in run_admin(config, lambda admin: admin.dkim.show(args.domain)):
        print(stored.record)
    return 0


# ------------------------------------------------------------------- output


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    cells = [list(headers), *([_printable(cell) for cell in row] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    for line in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def _printable(text: str, keep: str = "") -> str:
    """Show control characters as escapes.

    Subjects and bodies come from clients; raw escape sequences printed to a
    terminal could rewrite what the admin sees.
    """
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _local_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).astimezone().isoformat(timespec="seconds")


def _optional_time(timestamp: float | None, missing: str) -> str:
    return missing if timestamp is None else _local_time(timestamp)


# ----------------------------------------------------------------- queue


def _stats(args: argparse.Namespace, config: Config) -> int:
    if not 1 <= args.hours <= MAX_HOURS:
        raise CommandError(f"--hours must be 1 to {MAX_HOURS}")
    report = run_admin(config, lambda admin: admin.stats.hourly(args.hours))
    if args.json:
        print(json.dumps({"hours": [hour.as_json() for hour in report]}, indent=2))
        return 0
    _print_table(
        ("HOUR (UTC)", "ACCEPTED", "DELIVERED", "DEFERRED", "BOUNCED", "REFUSED", "LOGIN FAILURES"),
        [
            (
                time.strftime("%Y-%m-%d %H:00", time.gmtime(h.hour)),
                str(h.accepted),
                str(h.delivered),
                str(h.deferred),
                str(h.bounced),
                " ".join(f"{reason}={n}" for reason, n in h.refused) or "0",
                str(h.login_failures),
            )
            for h in report
        ],
    )
    return 0


def _queue_list(args: argparse.Namespace, config: Config) -> int:
    rows = run_admin(config, lambda admin: admin.queue.entries())
    if args.json:
        print(json.dumps([queue_entry_json(r) for r in rows], indent=2))
        return 0
    if not rows:
        print("the queue is empty")
        return 0
    _print_table(
        ("ID", "DOMAIN", "TO", "STATUS", "TRIES", "NEXT TRY", "LAST REPLY"),
        [
            (
                r.id,
                r.domain,
                ", ".join(r.recipients),
                r.status if r.node is None else f"{r.status} ({r.node})",
                str(r.attempts),
                "on release" if r.status == "held" else _local_time(r.next_attempt),
                _shorten(r.last_reply or "", 60),
            )
            for r in rows
        ],
    )
    return 0


def _print_history(history: list[DeliveryAttempt]) -> None:
    if not history:
        print("delivery: no attempt yet")
        return
    print("delivery history:")
    for item in history:
        print(
            f"  {_local_time(item.ts)}  {item.outcome:<9}  <{item.recipient}>"
            f"  via {item.host or '-'}  tls: {item.tls or 'none'}  {item.reply}"
        )


def _queue_show(args: argparse.Namespace, config: Config) -> int:
    async def show(admin: AdminServices) -> tuple[MessageView, list[QueueEntry]]:
        return (
            await admin.messages.show(args.message_id, body=False),
            await admin.queue.pending(args.message_id),
        )

    view, pending = run_admin(config, show)
    print(f"id: {args.message_id}")
    print(f"status: {view.record.status}")
    for row in pending:
        if row.status == "held":
            print(f"waiting: {row.domain} (held by the defence: relaygate held list)")
            continue
        held = f", held by {row.node}" if row.node else ""
        print(
            f"waiting: {row.domain} ({row.status}{held}, {row.attempts} tries, next"
            f" {_local_time(row.next_attempt)})"
        )
    _print_history(view.history)
    return 0


def _queue_retry(args: argparse.Namespace, config: Config) -> int:
    count = run_admin(
        config, lambda admin: admin.queue.retry(None if args.all else args.message_id)
    )
    print(f"{count} delivery(ies) will be tried now")
    return 0


def _queue_delete(args: argparse.Namespace, config: Config) -> int:
    count = run_admin(config, lambda admin: admin.queue.delete(args.message_id))
    print(f"deleted {args.message_id} from the queue ({count} destination(s)); no bounce sent")
    return 0
