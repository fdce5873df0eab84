"""Webhook events: their names, payloads and stable ids.

Message events are not written on the SMTP path: they are read back from what
acceptance and delivery already commit (the ``messages`` rows and the
``delivery_attempts`` rows), so an event exists exactly when its cause is
durable. The sender turns new rows into outbox rows (storage: Webhooks.collect)
with ids derived from those rows, so a re-read yields the same ``webhook-id``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from relaygate.times import rfc3339

MESSAGE_ACCEPTED = "message.accepted"
MESSAGE_DELIVERED = "message.delivered"
MESSAGE_DEFERRED = "message.deferred"
MESSAGE_BOUNCED = "message.bounced"
ACCOUNT_LIMIT_REACHED = "account.limit_reached"
ACCOUNT_HELD = "account.held"
ACCOUNT_RELEASED = "account.released"
ACCOUNT_PURGED = "account.purged"
AUTH_THROTTLED = "auth.throttled"
TEST = "webhook.test"

EVENTS = (
    MESSAGE_ACCEPTED,
    MESSAGE_DELIVERED,
    MESSAGE_DEFERRED,
    MESSAGE_BOUNCED,
    ACCOUNT_LIMIT_REACHED,
    ACCOUNT_HELD,
    ACCOUNT_RELEASED,
    ACCOUNT_PURGED,
    AUTH_THROTTLED,
)
_OUTCOME_EVENT = {
    "delivered": MESSAGE_DELIVERED,
    "deferred": MESSAGE_DEFERRED,
    "failed": MESSAGE_BOUNCED,
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A webhook subscription, from the config or made through the API."""

    id: str
    url: str
    events: tuple[str, ...]  # empty: every event
    secret: str  # whsec_<base64>
    source: str  # "config" | "api"
    created_at: float = 0.0

    def wants(self, event_type: str) -> bool:
        if event_type == TEST:
            return False  # only ever queued for one endpoint, by hand
        return not self.events or event_type in self.events


@dataclass(frozen=True, slots=True)
class Event:
    id: str  # the webhook-id: stable across retries and re-reads
    type: str
    body: str  # the JSON payload as sent (and signed)


@dataclass(frozen=True, slots=True)
class AcceptedRow:
    message_id: str
    created_at: float
    account: str
    credential: str | None
    client_ip: str
    mail_from: str
    recipients: tuple[str, ...]
    subject: str
    size: int


@dataclass(frozen=True, slots=True)
class AttemptRow:
    first_id: int  # the lowest delivery_attempts id of the group: the event's id
    message_id: str
    account: str
    mail_from: str
    domain: str
    ts: float
    outcome: str  # delivered | deferred | failed
    recipients: tuple[str, ...]
    host: str | None
    reply: str | None


def body(event_type: str, ts: float, data: dict[str, object]) -> str:
    return json.dumps(
        {"type": event_type, "timestamp": rfc3339(ts), "data": data}, separators=(",", ":")
    )


def accepted(row: AcceptedRow) -> Event:
    data: dict[str, object] = {
        "message_id": row.message_id,
        "account": row.account,
        "credential": row.credential,
        "client_ip": row.client_ip,
        "mail_from": row.mail_from,
        "recipients": list(row.recipients),
        "subject": row.subject,
        "size": row.size,
    }
    return Event(
        f"evt_{row.message_id}_accepted",
        MESSAGE_ACCEPTED,
        body(MESSAGE_ACCEPTED, row.created_at, data),
    )


def outcome(row: AttemptRow) -> Event | None:
    kind = _OUTCOME_EVENT.get(row.outcome)
    if kind is None:
        return None
    data: dict[str, object] = {
        "message_id": row.message_id,
        "account": row.account,
        "mail_from": row.mail_from,
        "domain": row.domain,
        "recipients": list(row.recipients),
        "remote_host": row.host,
        "remote_reply": row.reply,
    }
    return Event(
        f"evt_{row.message_id}_{kind.split('.')[1]}_{row.first_id}", kind, body(kind, row.ts, data)
    )


def group_attempts(
    rows: Iterable[tuple[int, str, str, str, str, float, str, str | None, str | None, str | None]],
) -> list[AttemptRow]:
    """delivery_attempts rows (id, message_id, account, mail_from, domain, ts,
    outcome, recipient, host, reply), ordered by id, as one group per settled
    attempt (message, domain, time, outcome): one event each."""
    groups: dict[tuple[str, str, float, str], AttemptRow] = {}
    for id_, message_id, account, mail_from, domain, ts, result, recipient, host, reply in rows:
        key = (message_id, domain, ts, result)
        old = groups.get(key)
        recipients = (recipient,) if recipient else ()
        if old is None:
            groups[key] = AttemptRow(
                id_, message_id, account, mail_from, domain, ts, result, recipients, host, reply
            )
        else:
            groups[key] = AttemptRow(
                old.first_id,
                message_id,
                account,
                mail_from,
                domain,
                ts,
                result,
                old.recipients + recipients,
                old.host or host,
                old.reply or reply,
            )
    return list(groups.values())


def fan_out(endpoints: Sequence[Endpoint], events: Iterable[Event]) -> list[tuple[str, Event]]:
    """(endpoint id, event) for each subscription that wants each event."""
    return [(e.id, event) for event in events for e in endpoints if e.wants(event.type)]


def keyed_event(
    event_type: str, key: str, stamp: int, data: dict[str, object], now: float
) -> Event:
    """An event about ``key`` (an account, an IP) whose id is the same for the same
    (type, key, stamp): the workers' per-minute notices pass the minute, so nodes that
    see one storm queue it once; an admin's action passes its millisecond."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Event(
        f"evt_{event_type.replace('.', '_')}_{digest}_{stamp}",
        event_type,
        body(event_type, now, data),
    )


def ping_event(endpoint_id: str, now: float | None = None) -> Event:
    ts = time.time() if now is None else now
    return Event(
        f"evt_test_{endpoint_id}_{int(ts * 1000)}",
        TEST,
        body(TEST, ts, {"webhook_id": endpoint_id, "message": "a test event from relaygate"}),
    )
