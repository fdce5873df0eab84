"""Records as plain JSON objects, the same for every edge that prints JSON
(``relaygate ... --json`` and the HTTP API), so the two never disagree.

Times are RFC 3339 strings in UTC ("2026-12-04T06:12:30Z"), as the tables
show them, in whole seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from relaygate.accounts.credentials import Credential
from relaygate.accounts.store import Account
from relaygate.mail_parts import Attachment, MessageParts
from relaygate.storage.api import ApiToken, DeliveryAttempt, MessageRecord, QueueEntry
from relaygate.times import rfc3339


def message_json(message: MessageRecord) -> dict[str, Any]:
    return {
        "id": message.id,
        "created_at": rfc3339(message.created_at),
        "account": message.account,
        "credential": message.credential,
        "client_ip": message.client_ip,
        "mail_from": message.mail_from,
        "rcpt_to": list(message.rcpt_to),
        "subject": message.subject,
        "size": message.size,
        "status": message.status,
        "body_removed_at": rfc3339(message.body_removed_at),
    }


def message_detail_json(
    message: MessageRecord, history: Sequence[DeliveryAttempt], parts: MessageParts
) -> dict[str, Any]:
    """The record, its header fields, its parts (numbered as /parts/N) and history."""
    return {
        **message_json(message),
        "headers": [[name, value] for name, value in parts.headers],
        "text": parts.text is not None,
        "html": parts.html is not None,
        "parts": [attachment_json(a) for a in parts.attachments],
        "history": [attempt_json(a) for a in history],
    }


def attempt_json(attempt: DeliveryAttempt) -> dict[str, Any]:
    return {
        "ts": rfc3339(attempt.ts),
        "domain": attempt.domain,
        "recipient": attempt.recipient,
        "host": attempt.host,
        "reply": attempt.reply,
        "tls": attempt.tls,
        "outcome": attempt.outcome,
    }


def token_json(token: ApiToken) -> dict[str, Any]:
    return {
        "name": token.name,
        "read_only": token.read_only,
        "created_at": rfc3339(token.created_at),
        "last_used": rfc3339(token.last_used),
    }


def account_json(account: Account, limits: dict[str, int] | None) -> dict[str, Any]:
    # Deliberately without the password hash: this output gets pasted around.
    return {
        "id": account.id,
        "address": account.address,
        "disabled": account.disabled,
        "admin": account.admin,
        "senders": list(account.senders),
        "limits": limits,
        "created_at": rfc3339(account.created_at),
        "updated_at": rfc3339(account.updated_at),
    }


def credential_json(credential: Credential, now: float) -> dict[str, Any]:
    # Never the secret's hash: this output gets pasted around.
    return {
        "id": credential.id,
        "account": credential.account_address,
        "name": credential.name,
        "status": credential.status(now),
        "senders": None if credential.senders is None else list(credential.senders),
        "networks": None if credential.networks is None else list(credential.networks),
        "limits": credential.limits,
        "expires_at": rfc3339(credential.expires_at),
        "created_at": rfc3339(credential.created_at),
        "last_used_at": rfc3339(credential.last_used_at),
        "revoked_at": rfc3339(credential.revoked_at),
    }


def queue_entry_json(entry: QueueEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "domain": entry.domain,
        "recipients": list(entry.recipients),
        "status": entry.status,
        "attempts": entry.attempts,
        # Held: no try is planned; `held release` queues it due at once.
        "next_attempt": None if entry.status == "held" else rfc3339(entry.next_attempt),
        "created_at": rfc3339(entry.created_at),
        "last_reply": entry.last_reply,
        "mail_from": entry.mail_from,
        "node": entry.node,
    }


def attachment_json(attachment: Attachment) -> dict[str, Any]:
    """One part as listed by ``messages show --json`` and ``/parts`` (numbered as /parts/N)."""
    return {
        "index": attachment.index,
        "filename": attachment.filename,
        "content_type": attachment.content_type,
        "size": attachment.size,
        "inline": attachment.inline,
        "content_id": attachment.content_id,
    }
