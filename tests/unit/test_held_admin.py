"""services/held.HeldAdmin: a release or purge announces itself to webhooks, and a
webhook that cannot be queued never undoes or fails the admin's action."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import pytest
from test_acceptance_contract import ALICE, SQLite
from test_defence_contract import KEY, TRIGGER, _accept

from relaygate import logs
from relaygate.services.held import HeldAdmin, NotHeld
from relaygate.storage.sqlite_backend import SQLiteStorage

Told = list[tuple[str, str, dict[str, object]]]


def _run(tmp_path: Path, action: str, announce_fails: bool) -> tuple[list[str], Told]:
    backend = SQLite(tmp_path)
    queued = _accept(backend, 2)
    told: Told = []

    async def announce(event_type: str, key: str, data: dict[str, object]) -> None:
        if announce_fails:
            raise OSError("database is locked")
        told.append((event_type, key, data))

    async def go() -> list[str]:
        store = SQLiteStorage(backend.database)
        try:
            await store.defence.hold(KEY, TRIGGER, time.time())
            admin = HeldAdmin(store.defence, store.accounts, announce)
            done = await (admin.release(ALICE, 3600) if action == "release" else admin.purge(ALICE))
            with pytest.raises(NotHeld):  # done once: the second finds nothing held
                await (admin.release(ALICE, 3600) if action == "release" else admin.purge(ALICE))
            assert await store.defence.held() == []
            return done
        finally:
            await store.close()

    done = asyncio.run(go())
    assert sorted(done) == sorted(queued)
    return done, told


def test_release_announces_account_released_once(tmp_path: Path) -> None:
    _, told = _run(tmp_path, "release", announce_fails=False)
    [(event_type, key, data)] = told
    assert (event_type, key) == ("account.released", KEY)
    assert data["account"] == KEY and data["messages"] == 2
    assert str(data["expected_until"]).endswith("Z")


def test_purge_announces_account_purged_once(tmp_path: Path) -> None:
    _, told = _run(tmp_path, "purge", announce_fails=False)
    assert told == [("account.purged", KEY, {"account": KEY, "messages": 2})]


@pytest.mark.parametrize("action", ["release", "purge"])
def test_a_webhook_that_cannot_be_queued_does_not_fail_the_action(
    tmp_path: Path, action: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = io.StringIO()
    monkeypatch.setattr(logs._sink, "stream", log)
    _run(tmp_path, action, announce_fails=True)  # the action stood (asserted inside)
    assert f'event=webhook.error reason="account.{action}d not queued: database is locked"' in (
        log.getvalue()
    )
