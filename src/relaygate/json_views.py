"""Records as plain JSON objects, the same for every edge that prints JSON
(``relaygate ... --json`` and the HTTP API), so the two never disagree."""

from __future__ import annotations

from typing import Any

from relaygate.storage.api import DeliveryAttempt, MessageRecord


def message_json(message: MessageRecord) -> dict[str, Any]:
    return {
        "id": message.id,
        "created_at": message.created_at,
        "account": message.account,
        "credential": message.credential,
        "client_ip": message.client_ip,
        "mail_from": message.mail_from,
        "rcpt_to": list(message.rcpt_to),
        "subject": message.subject,
        "size": message.size,
        "status": message.status,
    }


def attempt_json(attempt: DeliveryAttempt) -> dict[str, Any]:
    return {
        "ts": attempt.ts,
        "domain": attempt.domain,
        "recipient": attempt.recipient,
        "host": attempt.host,
        "reply": attempt.reply,
        "tls": attempt.tls,
        "outcome": attempt.outcome,
    }
