"""A SQLite connection owned by one thread, called from the event loop.

Every database call a worker makes while serving clients goes through one of
these, never straight from the event loop: a query that waits on a lock held
by another process (the CLI, a checkpoint, a backup) then blocks this thread,
not every session of the worker. Calls run one at a time in submission order,
so the connection needs no locking of its own.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Concatenate, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class DatabaseThread:
    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        loop: asyncio.AbstractEventLoop,
        name: str,
    ) -> None:
        self._connect = connect
        self._loop = loop
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def run(
        self,
        function: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> asyncio.Future[T]:
        """``function(connection, *args)`` in the thread; a future for its result."""
        return self._loop.run_in_executor(self._executor, self._call, function, args, kwargs)

    def _call(
        self,
        function: Callable[..., T],
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> T:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return function(db, *args, **kwargs)

    def close(self) -> None:
        """Finish what was submitted, then close the connection (in its own thread)."""
        self._executor.submit(self._close_local)
        self._executor.shutdown(wait=True)

    def _close_local(self) -> None:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
