"""services/defence.py over a store kept in memory: what a worker does per message."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from relaygate.accepted import SpooledMessage, new_queue_id
from relaygate.config import DefenceConfig
from relaygate.defence import Activity, Trigger
from relaygate.services.defence import DefenceService, RejectWatch
from relaygate.storage.api import HeldAccount, Sighting

CONFIG = DefenceConfig(volume_floor=3, new_network_burst=2, remote_reject_min=2)


class MemoryDefence:
    """The storage side, in memory; ``fail`` makes every read raise."""

    def __init__(self) -> None:
        self.activity_now = Activity(0, 0, 0, 0, None)
        self.holds: list[tuple[str, str]] = []
        self.seen_calls: list[tuple[str, str, str]] = []
        self.reads = 0
        self.fail = False

    async def activity(self, account: str, now: float) -> Activity:
        self.reads += 1
        if self.fail:
            raise OSError("database away")
        return self.activity_now

    async def seen(self, account: str, network: str, client: str, now: float) -> None:
        await asyncio.sleep(0.01)
        self.seen_calls.append((account, network, client))
        self.activity_now = replace(self.activity_now, new_network_at=now)

    async def sightings(self, account: str, limit: int) -> list[Sighting]:
        return []

    async def hold(self, account: str, trigger: Trigger, now: float) -> int | None:
        if any(a == account for a, _ in self.holds):
            return None
        self.holds.append((account, trigger.reason))
        return 0

    async def held(self) -> list[HeldAccount]:
        return []

    async def release(self, account: str, now: float, expected_until: float) -> list[str] | None:
        return None

    async def purge(self, account: str, now: float) -> list[str] | None:
        return None

    async def expect(self, account: str, until: float, messages: int) -> None:
        return None


def _message(account: str = "Alice@example.com") -> SpooledMessage:
    return SpooledMessage(
        id=new_queue_id(),
        account=account,
        client_ip="192.0.2.1",
        mail_from=account,
        recipients=["r@example.net"],
        subject="",
        body=b"x",
        created_at=time.time(),
        status="queued",
    )


async def _screen(service: DefenceService, message: SpooledMessage) -> str:
    work = service.screen(message)
    if work is not None:
        await work
    return message.status


def test_the_floor_holds_the_next_message_and_reads_once_per_refresh() -> None:
    async def go() -> None:
        store = MemoryDefence()
        service = DefenceService(CONFIG, store)
        statuses = [await _screen(service, _message()) for _ in range(5)]
        assert statuses == ["queued"] * 3 + ["held"] * 2
        await asyncio.sleep(0)
        assert store.holds == [("alice@example.com", "volume")]
        assert store.reads == 1  # the rest were judged from memory

    asyncio.run(go())


def test_a_login_from_a_new_network_is_known_before_the_next_message() -> None:
    async def go() -> None:
        store = MemoryDefence()
        service = DefenceService(CONFIG, store)
        service.logged_in("alice@example.com", "198.51.100.7", "Bot\r\n")
        statuses = [await _screen(service, _message()) for _ in range(4)]
        assert statuses == ["queued", "queued", "held", "held"]
        assert store.seen_calls == [("alice@example.com", "198.51.100.0/24", "bot??")]
        await asyncio.sleep(0)
        assert store.holds == [("alice@example.com", "new_network")]
        service.logged_in("alice@example.com", "198.51.100.7", "Bot\r\n")
        service.logged_in("alice@example.com", "not an ip", "x")
        await asyncio.sleep(0.05)
        assert len(store.seen_calls) == 1  # once per ten minutes per worker

    asyncio.run(go())


def test_parallel_messages_of_one_account_share_one_read() -> None:
    async def go() -> None:
        store = MemoryDefence()
        service = DefenceService(CONFIG, store)
        messages = [_message() for _ in range(6)]
        await asyncio.gather(*(_screen(service, m) for m in messages))
        assert [m.status for m in messages].count("held") == 3
        assert store.reads == 1

    asyncio.run(go())


def test_a_storage_failure_lets_mail_flow() -> None:
    async def go() -> None:
        store = MemoryDefence()
        store.fail = True
        service = DefenceService(CONFIG, store)
        assert [await _screen(service, _message()) for _ in range(5)] == ["queued"] * 5

    asyncio.run(go())


def test_captured_mail_is_not_marked_but_the_account_is_held() -> None:
    async def go() -> None:
        store = MemoryDefence()
        service = DefenceService(CONFIG, store)
        messages = [_message() for _ in range(4)]
        for m in messages:
            m.status = "captured"
            await _screen(service, m)
        await asyncio.sleep(0)
        assert {m.status for m in messages} == {"captured"} and store.holds

    asyncio.run(go())


def test_remote_refusals_hold_once_then_start_over() -> None:
    async def go() -> None:
        store = MemoryDefence()
        watch = RejectWatch(CONFIG, store)
        watch.outcome("Spam@example.com", 1, 1)
        await asyncio.sleep(0)
        assert store.holds == []
        watch.outcome("Spam@example.com", 1, 1)
        await asyncio.sleep(0)
        assert store.holds == [("spam@example.com", "remote_rejects")]
        watch.outcome("spam@example.com", 1, 1)  # the window started over
        await asyncio.sleep(0)
        assert len(store.holds) == 1

    asyncio.run(go())
