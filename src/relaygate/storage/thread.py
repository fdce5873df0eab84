"""A SQLite connection owned by one thread, called from the event loop.

Every database call a worker makes while serving clients goes through one of
these, never straight from the event loop: a query that waits on a lock held
by another process (the CLI, a checkpoint, a backup) then blocks this thread,
not every session of the worker. Calls run one at a time in submission order,
so the connection needs no locking of its own.

A plain queue and ``call_soon_threadsafe`` rather than a ThreadPoolExecutor:
this sits on the login path, and the executor's future chaining costs more
than the queries themselves.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
C = TypeVar("C", bound="Closable")

_Job = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]


class Closable(Protocol):  # what a connection (or a bundle of them) must offer
    def close(self) -> None: ...


class DatabaseThread(Generic[C]):
    """``connect`` makes what the functions receive: a connection, or several."""

    def __init__(
        self,
        connect: Callable[[], C],
        loop: asyncio.AbstractEventLoop,
        name: str,
    ) -> None:
        self._connect = connect
        self._loop = loop
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(
        self,
        function: Callable[Concatenate[C, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> asyncio.Future[T]:
        """``function(connection, *args)`` in the thread; a future for its result."""
        if self._closed:
            raise RuntimeError("database thread closed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((function, args, kwargs, future))
        return future

    def close(self) -> None:
        """Finish what was submitted, then close the connection (in its own thread)."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
            self._thread.join()

    def _serve(self) -> None:
        db: C | None = None
        try:
            while (job := self._jobs.get()) is not None:
                function, args, kwargs, future = job
                try:
                    if db is None:
                        db = self._connect()
                    result = function(db, *args, **kwargs)
                except BaseException as exc:  # handed to the caller, whatever it is
                    self._answer(future, None, exc)
                else:
                    self._answer(future, result, None)
        finally:
            if db is not None:
                db.close()

    def _answer(
        self, future: asyncio.Future[Any], result: Any, error: BaseException | None
    ) -> None:
        try:
            self._loop.call_soon_threadsafe(_settle, future, result, error)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
