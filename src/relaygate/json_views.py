"""Records as plain JSON objects, the same for every edge that prints JSON
(``relaygate ... --json`` and the HTTP API), so the two never disagree."""

from __future__ import annotations

from typing import Any

from relaygate.accounts.credentials import Credential
from relaygate.accounts.store import Account
from relaygate.storage.api import ApiToken, DeliveryAttempt, MessageRecord, QueueEntry


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


def token_json(token: ApiToken) -> dict[str, Any]:
    return {
        "name": token.name,
        "read_only": token.read_only,
        "created_at": token.created_at,
        "last_used": token.last_used,
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
        "created_at": account.created_at,
        "updated_at": account.updated_at,
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
        "expires_at": credential.expires_at,
        "created_at": credential.created_at,
        "last_used_at": credential.last_used_at,
        "revoked_at": credential.revoked_at,
    }


def queue_entry_json(entry: QueueEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "domain": entry.domain,
        "recipients": list(entry.recipients),
        "status": entry.status,
        "attempts": entry.attempts,
        "next_attempt": entry.next_attempt,
        "created_at": entry.created_at,
        "last_reply": entry.last_reply,
        "mail_from": entry.mail_from,
        "node": entry.node,
    }
