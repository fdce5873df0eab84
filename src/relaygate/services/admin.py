"""Admin use cases, the same for every edge (CLI today, the HTTP API and UI next).

Each takes its storage as typed interfaces (storage/api.py) and returns plain
data; printing and serialising stay in the edges. Messages first; accounts,
credentials, limits, queue and DKIM keys move here as the scale-out work goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

from relaygate.storage.api import DeliveryAttempt, MessageLog, MessageRecord


class NotFound(LookupError):
    """What was asked for does not exist; the text says what."""


@dataclass(frozen=True, slots=True)
class MessageView:
    record: MessageRecord
    body: bytes | None  # None: no body stored
    history: list[DeliveryAttempt]


class MessagesAdmin:
    def __init__(self, log: MessageLog) -> None:
        self._log = log

    async def recent(self, limit: int) -> list[MessageRecord]:
        return await self._log.recent(limit)

    async def show(self, message_id: str, *, body: bool = True) -> MessageView:
        """The record, body (unless ``body`` is False) and delivery history;
        NotFound if there is no such message.

        Raises storage.bodies.BodyMissing if the body is recorded but gone.
        """
        record = await self._log.get(message_id)
        if record is None:
            raise NotFound(f"no such message: {message_id}")
        stored = await self._log.body(message_id) if body else None
        return MessageView(record, stored, await self._log.history(message_id))
