"""Verifying many addresses: DNS once per domain, SMTP probes on a few reused
connections per MX host, results cached (asyncio glue around classify.py).

Shared by ``relaygate verify``, ``POST /api/v1/verify`` and, for its DNS
half, the RCPT-time domain check (domain_check.py). The DNS facts come from
delivery's own MXResolver, so [delivery] resolvers, mx_port, null MX and the
implicit MX behave exactly as on delivery.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from relaygate.config import Config, VerifyConfig
from relaygate.delivery.mx import DNSFailure, MXResolver, Target
from relaygate.verify.cache import TTLCache
from relaygate.verify.classify import Parsed, Probe, Verdict, catch_all_from, decide, parse
from relaygate.verify.probe import ProbeFailed, ProbeSession, random_local_part

MAX_HOSTS = 10_000  # per-host connection slots kept before idle ones are forgotten


@dataclass(frozen=True, slots=True)
class DomainAnswer:
    targets: tuple[Target, ...] = ()
    kind: str | None = None  # a DNSFailure kind; None: targets found
    text: str = ""


@dataclass(slots=True)
class _Domain:
    """The addresses of one domain still to probe, and what they taught."""

    name: str
    answer: DomainAnswer
    pending: list[tuple[int, Parsed]]
    probes: dict[int, Probe] = field(default_factory=dict)
    tried: list[str] = field(default_factory=list)


class Verifier:
    def __init__(self, config: Config) -> None:
        self._start(config)

    def _start(self, config: Config) -> None:
        self._config = config
        self._resolver = MXResolver(config.delivery, timeout=config.verify.timeout)
        self._lookups: dict[str, asyncio.Future[DomainAnswer]] = {}
        self._domains: TTLCache[DomainAnswer] = TTLCache(config.verify.cache_entries)
        self._results: TTLCache[Verdict] = TTLCache(config.verify.cache_entries)
        self._catch_all: TTLCache[bool] = TTLCache(config.verify.cache_entries)
        self._host_slots: dict[str, asyncio.Semaphore] = {}

    @property
    def config(self) -> Config:
        return self._config

    @property
    def settings(self) -> VerifyConfig:
        return self._config.verify

    def reconfigure(self, config: Config) -> None:
        """A reload: new settings and resolvers; the caches start again."""
        self._start(config)

    @property
    def probe_from(self) -> str:
        return self.settings.probe_from or f"postmaster@{self._config.hostname}"

    # ------------------------------------------------------------ DNS

    def cached_domain(self, domain: str) -> DomainAnswer | None:
        return self._domains.get(domain.lower())

    async def domain(self, domain: str) -> DomainAnswer:
        """The domain's MX targets or why there are none, cached; concurrent
        callers for one domain share a single look-up."""
        key = domain.lower()
        found = self._domains.get(key)
        if found is not None:
            return found
        running = self._lookups.get(key)
        if running is None:
            running = asyncio.ensure_future(self._look_up(key))
            self._lookups[key] = running
            running.add_done_callback(lambda _: self._lookups.pop(key, None))
        return await asyncio.shield(running)

    async def _look_up(self, key: str) -> DomainAnswer:
        try:
            answer = DomainAnswer(tuple(await self._resolver.targets(key)))
        except DNSFailure as exc:
            answer = DomainAnswer(kind=exc.kind, text=str(exc))
        settings = self.settings
        ttl = settings.cache_ttl if answer.kind is None else settings.negative_cache_ttl
        self._domains.put(key, answer, ttl)
        return answer

    # ------------------------------------------------------------ many addresses

    async def verify(
        self,
        addresses: Sequence[str],
        *,
        smtp: bool,
        concurrency: int = 10,
        progress: Callable[[Verdict], None] | None = None,
    ) -> list[Verdict]:
        """Verdicts in the order of ``addresses``; ``concurrency`` domains at once."""
        verdicts: list[Verdict | None] = [None] * len(addresses)
        by_domain: dict[str, list[tuple[int, Parsed]]] = {}
        for index, text in enumerate(addresses):
            parsed = parse(text)
            found: Verdict | None
            if isinstance(parsed, str):
                found = decide(text.strip(), parsed)
            else:
                found = self._results.get(self._result_key(parsed, smtp))
                if found is not None:  # as this request spelled the address
                    found = dataclasses.replace(found, address=parsed.address)
            if found is not None:
                verdicts[index] = found
                if progress:
                    progress(found)
                continue
            assert not isinstance(parsed, str)
            by_domain.setdefault(parsed.domain, []).append((index, parsed))
        slots = asyncio.Semaphore(max(1, concurrency))

        async def one_domain(name: str, items: list[tuple[int, Parsed]]) -> None:
            async with slots:
                for index, verdict in await self._verify_domain(name, items, smtp):
                    verdicts[index] = verdict
                    if progress:
                        progress(verdict)

        async with asyncio.TaskGroup() as group:
            for name, items in by_domain.items():
                group.create_task(one_domain(name, items))
        return [v for v in verdicts if v is not None]

    def _result_key(self, parsed: Parsed, smtp: bool) -> str:
        return f"{'smtp' if smtp else 'dns'}:{parsed.local}@{parsed.domain}".lower()

    async def _verify_domain(
        self, name: str, items: list[tuple[int, Parsed]], smtp: bool
    ) -> list[tuple[int, Verdict]]:
        answer = await self.domain(name)
        work = _Domain(name, answer, list(items))
        if smtp and answer.kind is None:
            workers = min(self.settings.per_host, len(items))
            await asyncio.gather(*(self._probe_worker(work) for _ in range(workers)))
        mx = sorted({t.host for t in answer.targets}, key=[t.host for t in answer.targets].index)
        done: list[tuple[int, Verdict]] = []
        for index, parsed in items:
            verdict = decide(
                parsed.address,
                parsed,
                dns_kind=answer.kind,
                dns_text=answer.text,
                mx=work.tried or mx,
                probe=work.probes.get(index) if smtp else None,
            )
            if smtp and answer.kind is None and index not in work.probes:
                verdict.result, verdict.reasons = "unknown", ["unreachable"]  # not asked
            final = verdict.result in ("deliverable", "undeliverable", "risky")
            ttl = self.settings.cache_ttl if final else self.settings.negative_cache_ttl
            self._results.put(self._result_key(parsed, smtp), verdict, ttl)
            done.append((index, verdict))
        return done

    # ------------------------------------------------------------ SMTP probes

    async def _probe_worker(self, work: _Domain) -> None:
        """Take addresses off the domain's list, a connection's worth at a time."""
        settings = self.settings
        while work.pending:
            batch = work.pending[: settings.rcpts_per_connection]
            del work.pending[: len(batch)]
            try:
                session, release = await self._connect(work)
            except ProbeFailed as exc:
                # No MX answers: the rest of this domain would wait the same way.
                rest = batch + work.pending
                work.pending.clear()
                for index, _ in rest:
                    work.probes[index] = Probe(failure=exc.reason, failure_text=exc.text)
                return
            try:
                for position, (index, parsed) in enumerate(batch):
                    if position and settings.pace:
                        await asyncio.sleep(settings.pace)
                    known = self._catch_all.get(work.name)
                    random_address = (
                        None if known is not None else f"{random_local_part()}@{work.name}"
                    )
                    try:
                        probe = await session.ask(
                            self.probe_from, f"{parsed.local}@{parsed.domain}", random_address
                        )
                    except ProbeFailed as exc:
                        work.probes[index] = Probe(failure=exc.reason, failure_text=exc.text)
                        rest = batch[position + 1 :]
                        if exc.reason == "timeout":
                            # A server this slow would keep every other address waiting
                            # as long: they are all reported at once.
                            rest += work.pending
                            work.pending.clear()
                            for other, _ in rest:
                                work.probes[other] = Probe(
                                    failure=exc.reason, failure_text=exc.text
                                )
                        else:
                            work.pending[:0] = rest  # a new connection for them
                        break
                    if probe.random_rcpt is not None:
                        catch_all = catch_all_from(probe.random_rcpt)
                        if catch_all is not None:
                            self._catch_all.put(work.name, catch_all, settings.cache_ttl)
                    elif probe.rcpt is not None:
                        probe = Probe(rcpt=probe.rcpt, catch_all=known)
                    work.probes[index] = probe
            finally:
                await session.quit()
                release()

    async def _connect(self, work: _Domain) -> tuple[ProbeSession, Callable[[], None]]:
        """A session with the best MX that answers, in preference order."""
        failure: ProbeFailed | None = None
        settings = self.settings
        for target in work.answer.targets:
            if len(self._host_slots) > MAX_HOSTS and not any(
                s.locked() for s in self._host_slots.values()
            ):
                self._host_slots.clear()  # a long-lived process: forget idle hosts
            slot = self._host_slots.setdefault(target.address, asyncio.Semaphore(settings.per_host))
            await slot.acquire()
            session = ProbeSession(
                target, self._config.delivery.mx_port, self._config.hostname, settings.timeout
            )
            if target.host not in work.tried:
                work.tried.append(target.host)
            try:
                await session.open()
            except ProbeFailed as exc:
                slot.release()
                failure = exc
                continue
            return session, slot.release
        raise failure or ProbeFailed("unreachable", f"no MX host for {work.name}")
