"""Submitting mail: what a logged-in sender may send, and accepting it.

The SMTP connection driver asks; this module decides. The rules in order:

- a login becomes a ``Login``: the account, the app credential if one was
  used, the sender patterns it may use (a credential may narrow the
  account's) and the sending-limit scopes that count its mail (the account's,
  and a credential's own when it has limits);
- MAIL FROM must match a sender pattern (sender binding), and no limit of the
  day or hour may be reached;
- each RCPT must keep the daily recipient limits (and the new-recipient one
  for an address never sent to before);
- at the end of DATA the From: header must match a sender pattern too; the
  message gets our Received (and a Message-ID and Date when it has none),
  is captured or queued as the delivery mode says, and counts against the
  limits in the same unit of work that stores it (storage.api.Acceptance).

Reads that need storage are awaitables; a login without limits needs none,
so the common path costs no round trip.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from relaygate import message, policy, quotas
from relaygate.accepted import SpooledMessage, new_queue_id
from relaygate.accounts.credentials import Credential
from relaygate.accounts.store import Account
from relaygate.config import SendingLimits
from relaygate.quotas import Scope, Usage, account_scope, credential_scope
from relaygate.services.defence import DefenceService
from relaygate.storage.api import Acceptance, SendingCounters
from relaygate.verify.domain_check import DOMAIN_REFUSAL_PREFIXES, RecipientDomains
from relaygate.webhooks.events import ACCOUNT_LIMIT_REACHED
from relaygate.webhooks.notices import EventNotices


@dataclass(frozen=True, slots=True)
class Login:
    """Who is sending, and under which rules."""

    account: Account
    credential: Credential | None
    senders: tuple[str, ...]  # the patterns MAIL FROM and From: must match
    scopes: tuple[Scope, ...]  # the sending limits that count this login's mail


@dataclass(frozen=True, slots=True)
class Arrival:
    """How a message reached us, for its Received field."""

    helo: str
    client_ip: str
    esmtp: bool
    tls_version: str | None
    tls_cipher: str | None


@dataclass(frozen=True, slots=True)
class Envelope:
    mail_from: str
    recipients: list[str]
    smtputf8: bool
    eight_bit: bool


@dataclass(frozen=True, slots=True)
class Refusal:
    reply: bytes
    reason: str  # for the log: sender, quota, header_from


class SubmissionService:
    def __init__(
        self,
        *,
        hostname: str,
        node: str | None = None,
        sending_limits: SendingLimits,
        capture: bool,
        counters: SendingCounters,
        acceptance: Acceptance,
        notices: EventNotices | None = None,
        defence: DefenceService | None = None,
        recipient_domains: RecipientDomains | None = None,
    ) -> None:
        self.notices = notices  # account.limit_reached webhooks (one per account a minute)
        self.defence = defence  # compromised-account defence: may hold the account's mail
        self._domains = recipient_domains  # [submission] check_recipient_domains
        self._hostname = hostname
        self._node = node
        self._defaults = sending_limits
        self._capture = capture  # capture mode: messages stay here, nothing is queued
        self._counters = counters
        self._acceptance = acceptance

    def reconfigure(
        self,
        hostname: str,
        sending_limits: SendingLimits,
        notices: EventNotices | None,
        recipient_domains: RecipientDomains | None = None,
    ) -> None:
        """A reload: logins from now on get these defaults (sessions keep theirs)."""
        self._domains = recipient_domains
        self._hostname = hostname
        self._defaults = sending_limits
        self.notices = notices

    def login(self, account: Account, credential: Credential | None) -> Login:
        scopes = [account_scope(account.address, account.limits, self._defaults)]
        senders = account.senders
        if credential is not None:
            senders = credential.effective_senders(account.senders)
            scope = credential_scope(
                credential.id, credential.name, account.address, credential.limits
            )
            if scope is not None:
                scopes.append(scope)
        return Login(account, credential, senders, tuple(scopes))

    # ------------------------------------------------------------ MAIL, RCPT

    def sender_refusal(self, login: Login, address: str) -> Refusal | None:
        """Sender binding: may this login use ``address`` as MAIL FROM?"""
        reply = policy.envelope_sender_refusal(login.senders, address)
        return None if reply is None else Refusal(reply, "sender")

    def sender_limits(self, login: Login) -> Awaitable[bytes | None] | None:
        """The limit check MAIL needs (a refusal or None), or None if no limit applies."""
        if not quotas.message_limited(login.scopes):
            return None
        check = self._counters.check_message(login.scopes, time.time())
        if self.notices is None or not self.notices.wants(ACCOUNT_LIMIT_REACHED):
            return check
        return self._noticed(login, check)

    async def _noticed(self, login: Login, check: Awaitable[bytes | None]) -> bytes | None:
        reply = await check
        if reply is not None:
            self._limit_reached(login, reply)
        return reply

    async def _noticed_recipient(
        self, login: Login, check: Awaitable[tuple[bytes | None, bool]]
    ) -> tuple[bytes | None, bool]:
        reply, new = await check
        if reply is not None:
            self._limit_reached(login, reply)
        return reply, new

    def _limit_reached(self, login: Login, reply: bytes) -> None:
        assert self.notices is not None
        self.notices.emit(
            ACCOUNT_LIMIT_REACHED,
            login.account.address.lower(),
            {
                "account": login.account.address,
                "credential": login.credential.name if login.credential else None,
                "reply": reply.decode("utf-8", "replace").strip(),
            },
        )

    def recipient_limits(
        self, login: Login, recipient: str, *, accepted_so_far: int, new_so_far: int
    ) -> Awaitable[tuple[bytes | None, bool]] | None:
        """The check RCPT needs: (a refusal or None, whether the recipient is new for
        the account); None if nothing needs checking. The domain check comes first
        (when on): a cached answer decides at once, else one DNS look-up."""

        def limits() -> Awaitable[tuple[bytes | None, bool]] | None:
            return self._recipient_limits(
                login, recipient, accepted_so_far=accepted_so_far, new_so_far=new_so_far
            )

        domain = None if self._domains is None else self._domains.check(recipient)
        if domain is None:
            return limits()
        return self._domain_then_limits(domain, limits)

    async def _domain_then_limits(
        self,
        domain: bytes | Awaitable[bytes | None],
        limits: Callable[[], Awaitable[tuple[bytes | None, bool]] | None],
    ) -> tuple[bytes | None, bool]:
        """The domain first: the limits are asked only for a domain that takes mail."""
        reply = domain if isinstance(domain, bytes) else await domain
        if reply is not None:
            return reply, False
        check = limits()
        return (None, False) if check is None else await check

    @staticmethod
    def refusal_reason(reply: bytes) -> str:
        """For the log: why RCPT was refused (the domain check or a limit)."""
        return "domain" if reply.startswith(DOMAIN_REFUSAL_PREFIXES) else "quota"

    def _recipient_limits(
        self, login: Login, recipient: str, *, accepted_so_far: int, new_so_far: int
    ) -> Awaitable[tuple[bytes | None, bool]] | None:
        if not quotas.recipient_limited(login.scopes):
            return None
        check = self._counters.check_recipient(
            login.scopes,
            login.account.address,
            recipient,
            accepted_so_far=accepted_so_far,
            new_so_far=new_so_far,
            now=time.time(),
        )
        if self.notices is None or not self.notices.wants(ACCOUNT_LIMIT_REACHED):
            return check
        return self._noticed_recipient(login, check)

    # ------------------------------------------------------------ end of DATA

    def prepare(
        self,
        login: Login,
        arrival: Arrival,
        envelope: Envelope,
        body: bytes | bytearray,
        new_recipients: Sequence[str],
    ) -> SpooledMessage | Refusal:
        """The message as it will be stored, or why it is refused (From: binding).

        ``new_recipients`` are those RCPT found new when a limit needed to know;
        without such a limit every recipient is a candidate and the store decides.
        """
        summary = message.summarize(body)
        refusal = policy.header_sender_refusal(login.senders, summary)
        if refusal is not None:
            return Refusal(refusal, "header_from")
        now = time.time()
        queue_id = new_queue_id(now)
        date = message.rfc5322_date(now)
        received = message.received_header(
            message.ReceivedInfo(
                helo=arrival.helo,
                client_ip=arrival.client_ip,
                hostname=self._hostname,
                queue_id=queue_id,
                esmtp=arrival.esmtp,
                tls_version=arrival.tls_version,
                tls_cipher=arrival.tls_cipher,
                user=login.account.address,
                recipients=tuple(envelope.recipients),
                smtputf8=envelope.smtputf8,
                node=self._node,
            ),
            date,
        )
        added = message.added_fields(summary, queue_id=queue_id, hostname=self._hostname, date=date)
        candidates = (
            list(new_recipients)
            if quotas.recipient_limited(login.scopes)
            else list(envelope.recipients)
        )
        address = login.account.address
        return SpooledMessage(
            id=queue_id,
            account=address,
            client_ip=arrival.client_ip,
            mail_from=envelope.mail_from,
            recipients=envelope.recipients,
            subject=summary.subject,
            header=received + added,
            body=body,
            created_at=now,
            status="captured" if self._capture else "queued",
            credential=login.credential.name if login.credential else None,
            smtputf8=envelope.smtputf8,
            body_8bit=envelope.eight_bit,
            usage=Usage(login.scopes, address, envelope.recipients, candidates, now),
        )

    def logged_in(self, login: Login, client_ip: str, helo: str) -> None:
        """A login succeeded from ``client_ip`` after EHLO ``helo`` (the defence's baseline)."""
        if self.defence is not None:
            self.defence.logged_in(login.account.address, client_ip, helo)

    def accept(self, stored: SpooledMessage) -> asyncio.Future[None]:
        """Completes once the message (and what it counts) is durable: then 250.

        A held account's message is stored all the same (status ``held``), and
        answered 250 like any other: the sender's software carries on."""
        screening = None if self.defence is None else self.defence.screen(stored)
        if screening is None:
            return self._acceptance.store(stored)
        return asyncio.ensure_future(self._screened(screening, stored))

    async def _screened(self, screening: Awaitable[None], stored: SpooledMessage) -> None:
        await screening
        await self._acceptance.store(stored)
