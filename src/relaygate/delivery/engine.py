"""The delivery process: takes due rows from the queue and sends them on.

One process (forked by the supervisor when ``[delivery] mode`` is smarthost
or mx) runs this loop. Rows are grouped by destination (a smarthost, or a
recipient domain's MX set); each destination gets at most
``per_destination`` connections, each connection carries queued messages
one after another (connection reuse), and all destinations together at
most ``concurrency``. Every outcome is committed right after the remote's
reply (see queue.py for the crash window). Permanent failures, and
temporary ones past ``max_age``, produce a bounce to the sender.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from collections import defaultdict, deque

import aiosmtplib
from cryptography.hazmat.primitives import serialization

from relaygate import logs, message, metrics, stats
from relaygate.config import Config
from relaygate.delivery import dsn, remote_text
from relaygate.delivery import queue as q
from relaygate.delivery.dkim import DKIMError, DKIMKey, Signer
from relaygate.delivery.mta_sts import MTASTS
from relaygate.delivery.mta_sts import apply as apply_mta_sts
from relaygate.delivery.mx import MXResolver, PermanentDNSError, TemporaryDNSError
from relaygate.delivery.outbound import DeliveryError, Plan, open_connection, smarthost_plan
from relaygate.delivery.remote_text import clean
from relaygate.eventloop import new_event_loop
from relaygate.server import reload
from relaygate.services import retention
from relaygate.services.defence import RejectWatch
from relaygate.storage import bodies
from relaygate.storage.api import LeaseLost, Notice
from relaygate.storage.errors import STORAGE_ERRORS
from relaygate.storage.node import DeliveryStorage, open_delivery_storage
from relaygate.webhooks.configured import config_endpoints
from relaygate.webhooks.notices import EventNotices
from relaygate.webhooks.sender import WebhookSender

DSN_HEAD_BYTES = 256 * 1024  # of the original message read for its header section
POLL_INTERVAL = 0.5  # seconds between looks at the queue when idle
CLAIM_BATCH = 200
MAX_IN_MEMORY = 2000  # claimed rows waiting for a connection; more stay in the queue
KEEPALIVE = 2.0  # seconds an idle connection waits for the next queued message
RECOVER_INTERVAL = 5.0  # seconds between looks for rows whose holder is gone
MAX_FINISHING = 64  # outcomes being recorded at once, across connections
KEYS_WATCH_INTERVAL = 3.0  # seconds between looks at the DKIM keys


class DeliveryEngine:
    def __init__(
        self, config: Config, loop: asyncio.AbstractEventLoop, storage: DeliveryStorage
    ) -> None:
        self.config = config
        self.delivery = config.delivery
        self.loop = loop
        self.storage = storage
        self.queue = storage.queue
        self.resolver = MXResolver(config.delivery)
        self.signer = Signer({})  # the keys are read in run()
        self._keys_seen: tuple[tuple[str, str, str, bytes], ...] = ()  # none yet
        self._keys_problem = ""
        self._next_keys = 0.0
        self.mta_sts = MTASTS(
            storage.policies, self.resolver.resolver, https_port=config.delivery.mta_sts_port
        )
        self._pending: dict[str, deque[q.Delivery]] = defaultdict(deque)
        self._running: dict[str, int] = defaultdict(int)
        self._slots = asyncio.Semaphore(config.delivery.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._finishing: set[asyncio.Future[None]] = set()  # outcomes being recorded
        self._more: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._held: dict[int, q.Delivery] = {}  # taken by an attempt, not yet finished
        self._stopping = asyncio.Event()
        self._next_recover = 0.0
        self._next_renew = 0.0
        self._resumed_logged = False
        # Compromised-account defence: many recipients refused by remote servers.
        self.rejects = RejectWatch(
            config.defence,
            storage.defence,
            EventNotices(storage.webhooks, config_endpoints(config.webhooks, with_secrets=False)),
        )

    # ------------------------------------------------------------ main loop

    async def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self._stopping.set)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        await self._load_keys()
        while not self._stopping.is_set():
            if self.loop.time() >= self._next_keys:
                # A key made with `relaygate dkim generate` (or the API) signs
                # within seconds, without a signal.
                self._next_keys = self.loop.time() + KEYS_WATCH_INTERVAL
                await self._reload_keys()
            claimed = 0
            room = MAX_IN_MEMORY - sum(len(w) for w in self._pending.values())
            try:
                await self._keep_leases()
                if room > 0:
                    batch = await self.queue.claim(time.time(), min(CLAIM_BATCH, room))
                    claimed = len(batch)
                    self._dispatch(batch)
            except STORAGE_ERRORS as exc:
                logs.event("delivery.error", logging.ERROR, reason=clean(str(exc)))
            if claimed == CLAIM_BATCH:
                await asyncio.sleep(0)  # a full batch: more is probably due already
                continue
            try:
                await asyncio.wait_for(self._stopping.wait(), POLL_INTERVAL)
            except TimeoutError:
                pass
        # Let connections in flight finish their current message, briefly.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.config.limits.shutdown_grace)
        if self._finishing:  # what was sent is recorded before we go
            await asyncio.wait(self._finishing, timeout=self.config.limits.shutdown_grace)
        await self._release_pending()

    async def _load_keys(self) -> None:
        """DKIM keys before the first delivery (no message leaves unsigned because
        the database was not up yet): files on one machine, rows on a cluster."""
        while not self._stopping.is_set() and not await self._reload_keys():
            try:
                await asyncio.wait_for(self._stopping.wait(), 5.0)
            except TimeoutError:
                pass
        self._next_keys = self.loop.time() + KEYS_WATCH_INTERVAL

    async def _reload_keys(self) -> bool:
        """The keys again; a new signer only if they changed. A key that cannot
        be read leaves the keys in use as they are (said once). False only
        when the storage could not be asked."""
        try:
            keys = await self.storage.dkim_keys.load()
            seen = _key_identities(keys)
            if seen == self._keys_seen:
                return True
            signer = Signer(keys)
        except STORAGE_ERRORS as exc:
            logs.event("delivery.error", logging.ERROR, reason=clean(str(exc)))
            return False
        except DKIMError as exc:  # a broken key file: sign as before until it is fixed
            if str(exc) != self._keys_problem:
                self._keys_problem = str(exc)
                logs.event("dkim.load_failed", logging.ERROR, reason=clean(str(exc)))
            return True
        self.signer, self._keys_seen, self._keys_problem = signer, seen, ""
        logs.event("dkim.keys_loaded", domains=len(keys), keys=len(seen))
        return True

    def reconfigure(self, config: Config) -> None:
        """A reload (SIGHUP): routes, TLS policy, retry schedule, timeouts and
        resolvers apply to the next attempt; the DKIM keys are read again."""
        old = self.delivery
        self.config = config
        self.delivery = config.delivery
        if (old.resolvers, old.mta_sts_port) != (
            config.delivery.resolvers,
            config.delivery.mta_sts_port,
        ):
            self.resolver = MXResolver(config.delivery)
            self.mta_sts = MTASTS(
                self.storage.policies,
                self.resolver.resolver,
                https_port=config.delivery.mta_sts_port,
            )
        self._next_keys = 0.0
        self.rejects.config = config.defence
        self.rejects.notices = EventNotices(
            self.storage.webhooks, config_endpoints(config.webhooks, with_secrets=False)
        )

    async def _keep_leases(self) -> None:
        """Rows whose holder is gone go back to the queue (on a shared database,
        every few seconds: another node may have died); rows we hold keep their lease."""
        now = time.time()
        if now >= self._next_recover:
            self._next_recover = now + RECOVER_INTERVAL
            taken = await self.queue.recover(now)
            local = [t for t in taken if t.node is None]
            if local:
                logs.event("delivery.resumed", rows=len(local))
            for takeover in taken:
                if takeover.node is not None:
                    # The documented duplicate window: the holder may have been told
                    # 250 by the remote and died before recording it.
                    logs.event(
                        "delivery.takeover",
                        logging.WARNING,
                        queue_id=takeover.queue_id,
                        held_by=takeover.node,
                    )
        if now >= self._next_renew:
            self._next_renew = now + self.delivery.lease_seconds / 3
            held = [d.id for d in self._held.values()]
            held += [d.id for waiting in self._pending.values() for d in waiting]
            await self.queue.renew(held, now)

    async def _release_pending(self) -> None:
        """At shutdown: claimed rows no attempt took go back to the queue, due now."""
        now = time.time()
        try:
            for waiting in self._pending.values():
                while waiting:
                    await self.queue.release(waiting.popleft().id, now, now)
        except STORAGE_ERRORS as exc:  # left 'sending': recovered later
            logs.event("delivery.error", logging.ERROR, reason=clean(str(exc)))

    def _dispatch(self, deliveries: list[q.Delivery]) -> None:
        for delivery in deliveries:
            key = self._destination_key(delivery.domain)
            self._pending[key].append(delivery)
            self._more[key].set()  # wake an idle connection to this destination
        for key, waiting in self._pending.items():
            while waiting and self._running[key] < self.delivery.per_destination:
                self._running[key] += 1
                task = asyncio.ensure_future(self._serve_destination(key))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                if len(waiting) <= self._running[key]:
                    break

    def _destination_key(self, domain: str) -> str:
        smarthost = self.delivery.route_for(domain)
        if smarthost is not None:
            return f"smarthost:{smarthost.host}:{smarthost.port}"
        return f"mx:{domain}"

    # ------------------------------------------------------------ one destination

    async def _serve_destination(self, key: str) -> None:
        """Work through this destination's queue on one connection at a time."""
        waiting = self._pending[key]
        try:
            while waiting and not self._stopping.is_set():
                await self._one_connection(key, waiting)
        except Exception as exc:  # _one_connection settles its rows; a last guard only
            logs.event("internal.error", logging.ERROR, destination=key, exception=clean(repr(exc)))
        finally:
            self._running[key] -= 1

    def _take(self, delivery: q.Delivery, taken: list[q.Delivery]) -> q.Delivery:
        """Note that this attempt now holds ``delivery``: it must finish or release it."""
        self._held[delivery.id] = delivery
        taken.append(delivery)
        return delivery

    async def _one_connection(self, key: str, waiting: deque[q.Delivery]) -> None:
        taken: list[q.Delivery] = []
        try:
            await self._attempt(key, waiting, taken)
        except Exception as exc:  # a bug must not strand a row in 'sending'
            logs.event("internal.error", logging.ERROR, destination=key, exception=clean(repr(exc)))
            reply = f"451 4.3.0 local error while delivering: {type(exc).__name__}"
            for delivery in taken:
                if delivery.id in self._held:
                    await self._finish(delivery, q.Outcome.for_all(delivery, reply))

    async def _plans(self, key: str, domain: str) -> list[Plan]:
        smarthost = self.delivery.route_for(domain)
        if smarthost is not None:
            return [smarthost_plan(smarthost)]
        targets = await self.resolver.targets(domain)
        tls_required = self.delivery.tls_required(domain)
        if self.delivery.mta_sts:
            policy = await self.mta_sts.policy_for(domain, time.time())
            if self.mta_sts.last_error:
                logs.event("delivery.mta_sts", domain=domain, reason=clean(self.mta_sts.last_error))
            allowed, enforce = apply_mta_sts(policy, [t.host for t in targets])
            if enforce and policy is not None:
                keep = set(allowed)
                targets = [t for t in targets if t.host in keep]
                if not targets:
                    # Temporary (RFC 8461 5.1): the next attempt looks for a new policy.
                    raise TemporaryDNSError(
                        f"451 4.7.5 no MX host of {clean(domain)} matches its MTA-STS policy"
                        f" (id={clean(policy.id)})"
                    )
                tls_required = True
        tls = "starttls-required" if tls_required else "starttls-opportunistic"
        return [
            Plan(
                connect_to=t.address,
                port=self.delivery.mx_port,
                server_name=t.host,
                tls=tls,
                verify=tls == "starttls-required",
            )
            for t in targets
        ]

    async def _attempt(self, key: str, waiting: deque[q.Delivery], taken: list[q.Delivery]) -> None:
        first = self._take(waiting.popleft(), taken)
        # One budget for DNS and connecting: a domain whose DNS or hosts never
        # answer cannot hold a delivery slot (or this destination) for long.
        budget = self.delivery.destination_timeout
        started = self.loop.time()
        mx = key.startswith("mx:")

        def with_same_domain() -> list[q.Delivery]:
            if not mx:
                return [first]
            return [first, *self._same_domain(waiting, first.domain, taken)]

        try:
            # No delivery slot is held while resolving: slow DNS delays only its own domain.
            plans = await asyncio.wait_for(self._plans(key, first.domain), budget)
        except PermanentDNSError as exc:
            await self._finish(first, q.Outcome.for_all(first, str(exc)))
            return
        except TemporaryDNSError as exc:
            await self._finish_all(with_same_domain(), str(exc))
            return
        except TimeoutError:
            reply = (
                f"451 4.4.3 DNS lookups for {clean(first.domain)} took longer than"
                f" {budget:g} s ([delivery] destination_timeout)"
            )
            await self._finish_all(with_same_domain(), reply)
            return
        except Exception as exc:
            logs.event(
                "internal.error",
                logging.ERROR,
                queue_id=first.message_id,
                domain=clean(first.domain),
                exception=clean(repr(exc)),
            )
            reply = f"451 4.3.0 local error while looking up {clean(first.domain)}"
            await self._finish_all(with_same_domain(), f"{reply}: {type(exc).__name__}")
            return
        resolving = self.loop.time() - started
        async with self._slots:
            # Waiting for a slot is not the destination's fault: the rest of the budget
            # starts once we have one.
            deadline = self.loop.time() + max(budget - resolving, 0.0)
            client, tls, host, errors = await self._connect(plans, deadline)
            if client is None:
                # The last host's answer decides (a 5xx stops the loop); earlier ones follow.
                reply = errors[-1] if errors else "451 4.4.1 no host to connect to"
                if len(errors) > 1:
                    reply += f" (before that: {'; '.join(errors[:-1])})"
                if not mx and reply.startswith("5"):
                    # Our upstream refusing us (say, a bad login) is ours to fix: keep the mail.
                    reply = "451 4.4.1 smarthost refused: " + reply
                await self._finish_all(with_same_domain(), reply)
                return
            try:
                current: q.Delivery | None = first
                while current is not None:
                    alive = await self._transaction(client, current, host, tls)
                    if not alive or self._stopping.is_set():
                        break
                    current = await self._next_for(key, waiting, taken)
            finally:
                try:
                    await client.quit()
                except Exception:  # whatever the remote does at QUIT, the mail is settled
                    client.close()

    async def _connect(
        self, plans: list[Plan], deadline: float
    ) -> tuple[aiosmtplib.SMTP | None, str | None, str | None, list[str]]:
        """The first host that takes us, within the budget; else the errors seen."""
        errors: list[str] = []
        for plan in plans:
            label = clean(f"{plan.server_name}[{plan.connect_to}]:{plan.port}")
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                errors.append(
                    f"451 4.4.1 {label} not tried: [delivery] destination_timeout"
                    f" ({self.delivery.destination_timeout:g} s) spent"
                )
                break
            try:
                client, tls = await asyncio.wait_for(
                    open_connection(
                        plan,
                        local_hostname=self.config.hostname,
                        connect_timeout=min(self.delivery.connect_timeout, remaining),
                        command_timeout=self.delivery.command_timeout,
                    ),
                    remaining,
                )
            except TimeoutError:
                errors.append(f"451 4.4.1 cannot use {label}: no answer in time")
                continue
            except DeliveryError as exc:
                errors.append(exc.reply)
                if exc.reply.startswith("5"):
                    break  # a 5xx banner or login refusal: no other host will differ
                continue
            return client, tls, label, errors
        return None, None, None, errors

    async def _next_for(
        self, key: str, waiting: deque[q.Delivery], taken: list[q.Delivery]
    ) -> q.Delivery | None:
        """The next message for this open connection; wait a little for one to be queued."""
        if not waiting:
            more = self._more[key]
            more.clear()
            try:
                await asyncio.wait_for(more.wait(), KEEPALIVE)
            except TimeoutError:
                return None
        return self._take(waiting.popleft(), taken) if waiting else None

    def _same_domain(
        self, waiting: deque[q.Delivery], domain: str, taken: list[q.Delivery]
    ) -> list[q.Delivery]:
        """Take the other queued rows for ``domain``: they share the outcome of a DNS failure."""
        same = [d for d in waiting if d.domain == domain]
        for delivery in same:
            waiting.remove(delivery)
            self._take(delivery, taken)
        return same

    async def _finish_all(self, deliveries: list[q.Delivery], reply: str) -> None:
        for delivery in deliveries:
            await self._finish(delivery, q.Outcome.for_all(delivery, reply))

    async def _transaction(
        self, client: aiosmtplib.SMTP, delivery: q.Delivery, host: str | None, tls: str | None
    ) -> bool:
        """Send one message; False when the connection is no longer usable."""
        try:
            body = await self.queue.body(delivery.message_id)
        except bodies.BodyMissing:
            body = None
        except STORAGE_ERRORS as exc:  # the database is away: try again later
            reply = f"451 4.3.0 message body unreadable: {clean(str(exc)) or type(exc).__name__}"
            await self._finish(delivery, q.Outcome.for_all(delivery, reply))
            return True
        if body is None:
            logs.event("delivery.body_missing", logging.ERROR, queue_id=delivery.message_id)
            reply = "554 5.3.0 message body missing from the spool"
            await self._finish(delivery, q.Outcome.for_all(delivery, reply))
            return True
        # The null sender is ours alone (submission refuses MAIL FROM:<>): a DSN.
        body = self._sign(body, bounce=not delivery.mail_from) + body
        started = self.loop.time()
        try:
            try:
                refused, response = await client.sendmail(
                    delivery.mail_from,
                    list(delivery.recipients),
                    body,
                    mail_options=list(delivery.mail_options),
                )
            finally:
                metrics.current().delivery_attempt(self.loop.time() - started)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            outcome = _recipients_outcome(
                {e.recipient: (e.code, e.message) for e in exc.recipients}, (), host, tls
            )
            await self._finish(delivery, outcome)
            return True
        except aiosmtplib.SMTPResponseException as exc:
            # MAIL FROM or DATA refused: the whole message shares the reply.
            reply = remote_text.reply(exc.code, exc.message)
            await self._finish(delivery, q.Outcome.for_all(delivery, reply, host=host, tls=tls))
            try:
                await client.rset()
            except Exception:  # any failure here only means: do not reuse the connection
                return False
            return True
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            reason = clean(str(exc)) or type(exc).__name__
            reply = f"451 4.4.2 connection to {host} lost: {reason}"
            await self._finish(delivery, q.Outcome.for_all(delivery, reply, host=host, tls=tls))
            return False
        except Exception as exc:  # a bug must not strand the row in 'sending'
            logs.event(
                "internal.error",
                logging.ERROR,
                queue_id=delivery.message_id,
                exception=clean(repr(exc)),
            )
            reply = f"451 4.3.0 local error while sending: {type(exc).__name__}"
            await self._finish(delivery, q.Outcome.for_all(delivery, reply, host=host, tls=tls))
            return False
        accepted = [r for r in delivery.recipients if r not in refused]
        outcome = _recipients_outcome(
            {r: (resp.code, resp.message) for r, resp in refused.items()}, accepted, host, tls
        )
        await self._finish_soon(
            delivery, dataclasses.replace(outcome, reply=f"250 {clean(response)}")
        )
        return True

    def _sign(self, body: bytes, *, bounce: bool = False) -> bytes:
        summary = message.summarize(body)
        found = message.addresses(summary.from_values[0]) if summary.from_values else None
        if not found:
            return b""
        domain = found[0].rpartition("@")[2].lower()
        if bounce:  # From MAILER-DAEMON@hostname: its key, or its parent domain's
            domain = self.signer.host_signing_domain(domain) or domain
        try:
            return self.signer.sign(body, domain, time.time())
        except (ValueError, KeyError):
            return b""

    # ------------------------------------------------------------ bookkeeping

    async def _finish_soon(self, delivery: q.Delivery, outcome: q.Outcome) -> None:
        """Record a sent message while its connection goes on with the next one:
        the commit's round trip and WAL flush then overlap the next transaction
        instead of adding to it. The duplicate window (the remote said 250, we
        died before recording it) stays one commit long."""
        while len(self._finishing) >= MAX_FINISHING:  # a slow database slows sending
            await asyncio.wait(self._finishing, return_when=asyncio.FIRST_COMPLETED)
        self._held.pop(delivery.id, None)  # ours to record now, not to release or renew
        task = asyncio.ensure_future(self._finish(delivery, outcome))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish(self, delivery: q.Delivery, outcome: q.Outcome) -> None:
        """Record an attempt together with the DSN it causes; never leave the row 'sending'."""
        self._held.pop(delivery.id, None)
        now = time.time()
        stored: str | None = None  # the DSN's queue id, once stored
        try:
            outcome, _ = q.settle(delivery, outcome, now, self.delivery)
            notice = await self._notice(delivery, outcome, now)
            retry_at = now + q.retry_delay(self.delivery, delivery.attempts + 1)
            stored = await self.queue.finish(delivery, outcome, now, retry_at, notice)
        except LeaseLost:
            # Another node took the row over (our lease ran out): its outcome counts.
            logs.event(
                "delivery.lease_lost",
                logging.WARNING,
                queue_id=delivery.message_id,
                node=self.config.node_name,
            )
            return
        except Exception as exc:
            logs.event(
                "delivery.error",
                logging.ERROR,
                queue_id=delivery.message_id,
                reason=clean(repr(exc)),
            )
            # Try again later rather than leave the row 'sending' until a restart.
            retry_at = now + q.retry_delay(self.delivery, delivery.attempts + 1)
            try:
                await self.queue.release(delivery.id, retry_at, now)
            except Exception as again:  # the database is gone: recovered at the next start
                logs.event(
                    "delivery.error",
                    logging.ERROR,
                    queue_id=delivery.message_id,
                    reason=clean(repr(again)),
                )
            return
        if delivery.mail_from:  # a bounce's refusals say nothing of the account
            self.rejects.outcome(
                delivery.account,
                sum(1 for _, reply in outcome.failed if reply.startswith("5")),
                len(outcome.delivered) + len(outcome.failed) + len(outcome.deferred),
            )
        counted = metrics.current()
        counted.delivered("delivered", len(outcome.delivered))
        counted.delivered("deferred", len(outcome.deferred))
        counted.delivered("bounced", len(outcome.failed))
        for recipient in outcome.delivered:
            logs.event(
                "delivery.ok",
                queue_id=delivery.message_id,
                rcpt=recipient,
                host=outcome.host,
                tls=outcome.tls,
            )
        for recipient, reply in outcome.deferred:
            logs.event(
                "delivery.deferred",
                queue_id=delivery.message_id,
                rcpt=recipient,
                host=outcome.host,
                reply=reply,
            )
        for recipient, reply in outcome.failed:
            logs.event(
                "delivery.failed",
                logging.WARNING,
                queue_id=delivery.message_id,
                rcpt=recipient,
                host=outcome.host,
                reply=reply,
            )
        if stored is not None:
            logs.event(
                "dsn.created", queue_id=stored, rcpt=delivery.mail_from, about=delivery.message_id
            )

    async def _notice(self, delivery: q.Delivery, outcome: q.Outcome, now: float) -> Notice | None:
        """The bounce (or delay warning) this outcome calls for, and whether it is a warning.

        Never for a null-sender message: no bounce loops.
        """
        if not delivery.mail_from:
            return None
        if outcome.failed:
            recipients, warning = list(outcome.failed), False
        elif (
            outcome.deferred
            and not delivery.warned
            and self.delivery.delay_warning_after
            and now - delivery.created_at >= self.delivery.delay_warning_after
        ):
            recipients, warning = list(outcome.deferred), True
        else:
            return None
        try:
            # A bounce quotes the header section only: no need to read megabytes.
            original = await self.queue.body(delivery.message_id, DSN_HEAD_BYTES) or b""
        except bodies.BodyMissing:
            original = b""
        arrival = await self.queue.arrival(delivery.message_id) or delivery.created_at
        try:
            body = self._dsn(
                delivery,
                recipients,
                host=outcome.host,
                original=original,
                arrival=arrival,
                now=now,
                warning=warning,
            )
        except Exception as exc:  # a reply we failed to make safe: bounce without its text
            logs.event(
                "internal.error",
                logging.ERROR,
                queue_id=delivery.message_id,
                exception=clean(repr(exc)),
            )
            plain = [(r, f"{reply[:9]} (remote text withheld)") for r, reply in recipients]
            body = self._dsn(
                delivery,
                plain,
                host=outcome.host,
                original=original,
                arrival=arrival,
                now=now,
                warning=warning,
            )
        return Notice(
            delivery.account,
            delivery.mail_from,
            body,
            warning,
            keep_local=self.delivery.bounce_to == "capture",
        )

    def _dsn(
        self,
        delivery: q.Delivery,
        recipients: list[tuple[str, str]],
        *,
        host: str | None,
        original: bytes,
        arrival: float,
        now: float,
        warning: bool,
    ) -> bytes:
        return dsn.build(
            hostname=self.config.hostname,
            queue_id=delivery.message_id,
            original=original,
            sender=delivery.mail_from,
            recipients=[(r, reply, host) for r, reply in recipients],
            arrival=arrival,
            now=now,
            warning=warning,
        )


def _recipients_outcome(
    refused: dict[str, tuple[int, str]],
    accepted: list[str] | tuple[str, ...],
    host: str | None,
    tls: str | None,
) -> q.Outcome:
    replies = {r: remote_text.reply(c, m) for r, (c, m) in refused.items()}
    failed = tuple((r, replies[r]) for r, (c, _) in refused.items() if 500 <= c < 600)
    deferred = tuple((r, replies[r]) for r, (c, _) in refused.items() if not 500 <= c < 600)
    return q.Outcome(
        delivered=tuple(accepted), failed=failed, deferred=deferred, host=host, tls=tls
    )


async def _send_webhooks_only(loop: asyncio.AbstractEventLoop, sender: WebhookSender) -> None:
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    logs.event("webhooks.start", pid=os.getpid())
    await sender.run(stopping)


def _key_identities(keys: dict[str, list[DKIMKey]]) -> tuple[tuple[str, str, str, bytes], ...]:
    """What tells one set of keys from another (key objects do not compare)."""
    return tuple(
        sorted(
            (
                key.domain,
                key.selector,
                key.algorithm,
                key.private_key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
            )
            for found in keys.values()
            for key in found
        )
    )


class _Reloader:
    """SIGHUP in the delivery process: the file again, for what this process uses."""

    def __init__(
        self, config: Config, sender: WebhookSender, engine: DeliveryEngine | None
    ) -> None:
        self.config = config
        self.sender = sender
        self.engine = engine

    def __call__(self) -> None:
        new = reload.reload_config(self.config, "delivery")
        if new is None:
            return
        self.config = new
        self.sender.reconfigure(config_endpoints(new.webhooks, with_secrets=True))
        if self.engine is not None:
            self.engine.reconfigure(new)


def run_delivery(config: Config) -> int:
    """Entry point of the delivery process."""
    loop = new_event_loop()
    try:
        loop.run_until_complete(_deliver(config, loop))
    finally:
        loop.close()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    return 0


async def _deliver(config: Config, loop: asyncio.AbstractEventLoop) -> None:
    storage = await open_delivery_storage(config, loop)
    flusher = asyncio.ensure_future(stats.flush_forever(storage.stats))
    pruner: asyncio.Future[None] | None = None
    try:
        sender = WebhookSender(
            storage.webhooks,
            config_endpoints(config.webhooks, with_secrets=True),
            config.http is not None and config.http.allow_private_targets,
        )
        # Capture mode: nothing to deliver, webhooks (and retention) only.
        engine = (
            None if config.delivery.mode == "capture" else DeliveryEngine(config, loop, storage)
        )
        reloader = _Reloader(config, sender, engine)
        loop.add_signal_handler(signal.SIGHUP, reloader)
        if retention.runs_here(config, None):
            pruner = asyncio.ensure_future(
                retention.run_forever(config, lambda: reloader.config.retention)
            )
        if engine is None:
            await _send_webhooks_only(loop, sender)
            return
        stop_sending = asyncio.Event()
        sending = asyncio.create_task(sender.run(stop_sending))
        logs.event("delivery.start", mode=config.delivery.mode, pid=os.getpid())
        try:
            await engine.run()
        finally:
            stop_sending.set()
            await sending
        logs.event("delivery.stop")
    finally:
        flusher.cancel()
        if pruner is not None:
            pruner.cancel()
            await asyncio.gather(pruner, return_exceptions=True)
        await stats.flush(storage.stats)  # the last seconds' counts too
        await storage.close()
