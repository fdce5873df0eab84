"""Server-side cost of one login, per mechanism (issue 3: web apps log in per message).

Runs relaygate's own login path (services/login.py) in-process on temporary
SQLite databases: the account look-up and the throttle reservation (each in its
database thread, as in the server), argon2id, the verified-credentials cache,
app credentials (keyed hash) and the SCRAM server steps. Client-side work (the SCRAM client's
PBKDF2) is excluded from the SCRAM figure by timing only the server calls.

    .venv/bin/python bench/auth_bench.py [--seconds 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import scramp

from relaygate.accounts.credentials import CredentialStore
from relaygate.accounts.passwords import PasswordHasher
from relaygate.accounts.store import AccountStore
from relaygate.config import AuthThrottleConfig, PasswordHashConfig
from relaygate.sasl import Challenge, NeedKeys, StoredKeys, Verified, stored_keys_for_password
from relaygate.sasl.scram import Scram
from relaygate.services.login import SCRAM_DECOY_KEY, LoginService
from relaygate.storage.secrets import get_or_create_secret
from relaygate.storage.sqlite import connect, connect_service
from relaygate.storage.sqlite_accounts import SQLiteAccounts
from relaygate.storage.sqlite_credentials import SQLiteCredentials
from relaygate.storage.sqlite_throttle import SQLiteLoginFailures
from relaygate.storage.thread import DatabaseThread

USER = "bench@example.test"
PASSWORD = "correct horse battery staple"


def measure(name: str, seconds: float, once: Callable[[], float]) -> dict[str, object]:
    """Call ``once`` (which returns the server seconds it spent) for ``seconds``."""
    spent = 0.0
    count = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and count < 1_000_000:
        spent += once()
        count += 1
    per = spent / count
    return {"case": name, "logins": count, "us_per_login": round(per * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per case (default 2)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as tmp:
        db = connect(Path(tmp) / "bench.db")
        hasher = PasswordHasher(PasswordHashConfig())  # the defaults: m=19 MiB, t=2, p=1
        store = AccountStore(db)
        store.add(USER, hasher.hash(PASSWORD), scram=stored_keys_for_password(PASSWORD))
        _, secret = CredentialStore(db).add(
            USER, "web", expires_at=None, senders=None, networks=None
        )
        service = DatabaseThread(lambda: connect_service(Path(tmp) / "bench.db"), loop, "db")
        auth = LoginService(
            accounts=SQLiteAccounts(service, lambda c: c.data),
            credentials=SQLiteCredentials(service, lambda c: c.data),
            failures=SQLiteLoginFailures(service, AuthThrottleConfig()),
            throttle_config=AuthThrottleConfig(),
            hasher=hasher,
            decoy_key=get_or_create_secret(db, SCRAM_DECOY_KEY),
            loop=loop,
        )

        def plain(password: str) -> float:
            started = time.perf_counter()
            result = loop.run_until_complete(auth.password(USER, password, "127.0.0.1", 0))
            assert result.account is not None, result.outcome
            return time.perf_counter() - started

        def argon2_only() -> float:
            started = time.perf_counter()
            assert hasher.verify(store.get(USER).password_hash, PASSWORD)  # type: ignore[union-attr]
            return time.perf_counter() - started

        def scram_server() -> float:
            client = scramp.ScramClient(["SCRAM-SHA-256"], USER, PASSWORD)
            server = Scram(plus=False, channel_bindings=())
            spent = 0.0
            started = time.perf_counter()
            step = server.start(client.get_client_first().encode())
            assert isinstance(step, NeedKeys)
            answer = loop.run_until_complete(auth.scram_keys(step.username, "127.0.0.1", 0))
            assert isinstance(answer, tuple)
            keys, reservation = answer
            assert isinstance(keys, StoredKeys)
            step = server.provide(keys)
            spent += time.perf_counter() - started
            assert isinstance(step, Challenge)
            client.set_server_first(step.data.decode())
            final = client.get_client_final().encode()  # the client's PBKDF2: not ours
            started = time.perf_counter()
            step = server.respond(final)
            spent += time.perf_counter() - started
            assert isinstance(step, Challenge)
            client.set_server_final(step.data.decode())
            started = time.perf_counter()
            done = server.respond(b"")
            assert isinstance(done, Verified)
            result = loop.run_until_complete(
                auth.scram_finished(done.username, True, reservation, "127.0.0.1", 0)
            )
            assert result.account is not None
            return spent + time.perf_counter() - started

        plain(PASSWORD)  # fill the cache
        results = [
            measure(
                "PLAIN/LOGIN password, first login (argon2id verify)", args.seconds, argon2_only
            ),
            measure(
                "PLAIN/LOGIN password, repeat login (cache hit)",
                args.seconds,
                lambda: plain(PASSWORD),
            ),
            measure(
                "PLAIN/LOGIN app credential (HMAC + indexed query)",
                args.seconds,
                lambda: plain(secret),
            ),
            measure("SCRAM-SHA-256, server side", args.seconds, scram_server),
        ]
        auth.close()
        service.close()
        db.close()
    loop.close()
    width = max(len(str(r["case"])) for r in results)
    print(f"{'case':<{width}}  {'logins':>8}  {'us/login':>9}")
    for r in results:
        print(f"{r['case']!s:<{width}}  {r['logins']!s:>8}  {r['us_per_login']!s:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
