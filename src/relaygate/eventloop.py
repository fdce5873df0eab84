"""The event loop every relaygate process runs on."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util

LARGE_BLOCK = 1024 * 1024  # bytes: a message body, not a reply
TRIM_DELAY = 0.2  # seconds after a large message before memory is handed back


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()
_trim_pending = False


def release_memory_soon(loop: asyncio.AbstractEventLoop) -> None:
    """After a large message: give the freed heap back to the system shortly.

    glibc keeps freed large blocks in the process (it raises its mmap threshold
    after the first one), so a worker kept tens of MiB per large message. A
    fixed mmap threshold would return them at once but costs page faults on
    every megabyte of every message (measured: +40% CPU per MB); trimming once
    the messages stop keeps bursts fast and the memory bounded. Not glibc:
    nothing to do.
    """
    global _trim_pending
    if _trim_pending or _LIBC is None or not hasattr(_LIBC, "malloc_trim"):
        return
    _trim_pending = True
    loop.call_later(TRIM_DELAY, _trim)


def _trim() -> None:
    global _trim_pending
    _trim_pending = False
    assert _LIBC is not None
    _LIBC.malloc_trim(0)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (2-4x less CPU per connection), else plain asyncio."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop
