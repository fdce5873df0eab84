"""Which messages a log view wants: filters and a keyset cursor, and the SQL
WHERE clause for them, shared by both backends (only the placeholder and the
case-insensitive LIKE differ)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_TEXT = 200  # characters of search text


@dataclass(frozen=True, slots=True)
class MessageQuery:
    account: str | None = None  # the account that sent it (any case)
    status: str | None = None  # captured | queued | delivered | failed | ...
    text: str | None = None  # in the subject, envelope sender or recipients, account or id
    mail_from: str | None = None  # in the envelope sender (any case)
    rcpt_to: str | None = None  # in any envelope recipient (any case)
    subject: str | None = None  # in the subject (any case)
    since: float | None = None  # received at or after (unix time)
    until: float | None = None  # received before
    before: tuple[float, str] | None = None  # the cursor: older than this (created_at, id)
    limit: int = 50


# Both backends, for retention and prune (messages aliased m): nothing waits to
# deliver the message - no queue row that is queued, being sent, or held (the
# compromised-account defence: it waits for an admin's release or purge).
SETTLED = (
    "NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = m.id"
    " AND d.status IN ('queued', 'sending', 'held'))"
)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _contains(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere, its wildcards taken literally."""
    return "%" + _escape_like(text[:MAX_TEXT]) + "%"


def where(query: MessageQuery, mark: str, like: str, rcpt_text: str) -> tuple[str, list[object]]:
    """The WHERE clause ("" for none) and its values. ``mark`` is the
    placeholder (? or %s), ``like`` the case-insensitive LIKE (LIKE or ILIKE),
    ``rcpt_text`` the recipients column as text."""
    parts: list[str] = []
    values: list[object] = []
    if query.account is not None:
        parts.append(f"lower(account) = lower({mark})")
        values.append(query.account)
    if query.status is not None:
        parts.append(f"status = {mark}")
        values.append(query.status)
    if query.text:
        pattern = _contains(query.text)
        columns = ("subject", "mail_from", rcpt_text, "account", "id")
        parts.append("(" + " OR ".join(f"{c} {like} {mark} ESCAPE '\\'" for c in columns) + ")")
        values.extend([pattern] * len(columns))
    for column, text in (
        ("mail_from", query.mail_from),
        (rcpt_text, query.rcpt_to),
        ("subject", query.subject),
    ):
        if text:
            parts.append(f"{column} {like} {mark} ESCAPE '\\'")
            values.append(_contains(text))
    if query.since is not None:
        parts.append(f"created_at >= {mark}")
        values.append(query.since)
    if query.until is not None:
        parts.append(f"created_at < {mark}")
        values.append(query.until)
    if query.before is not None:
        created, message_id = query.before
        parts.append(f"(created_at < {mark} OR (created_at = {mark} AND id < {mark}))")
        values.extend([created, created, message_id])
    return (" WHERE " + " AND ".join(parts)) if parts else "", values
