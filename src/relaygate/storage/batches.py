"""Group commit for delivery outcomes (and anything else written many at a time).

Callers ``submit`` one item each and wait; items that arrive while a batch is
being written go together in the next one, so a busy process makes one commit
(one fsync, one round trip) for many callers and an idle one waits for nobody.
``write`` returns one result per item: None (written) or the exception that
item's caller gets, so one bad item fails alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

Write = Callable[[list[T]], Awaitable[list[Exception | None]]]


class Batches(Generic[T]):
    def __init__(self, write: Write[T]) -> None:
        self._write = write
        self._waiting: list[tuple[T, asyncio.Future[None]]] = []
        self._writer: asyncio.Future[None] | None = None

    async def submit(self, item: T) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write_all())
        await done

    async def _write_all(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    errors = await self._write([item for item, _ in batch])
                except Exception as exc:  # the batch as a whole failed: nothing was written
                    errors = [exc] * len(batch)
                for (_, done), error in zip(batch, errors, strict=True):
                    if done.done():  # its caller was cancelled
                        continue
                    if error is None:
                        done.set_result(None)
                    else:
                        done.set_exception(error)
        finally:
            self._writer = None
