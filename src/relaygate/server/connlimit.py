"""Per-client connection limits, shared by all worker processes.

The supervisor creates one ConnectionLimiter before it forks the workers: the
table is an anonymous ``MAP_SHARED`` mmap and the lock a ``multiprocessing``
semaphore, so every worker sees and updates the same counts with no server
process and no system call beyond the lock.

The table is fixed-size open addressing: a client's slot is found within
``_PROBE`` slots of its hash. Each slot holds (key, concurrent, minute, count):
the salted 64-bit hash of the client, its open connections, and how many it
opened in the current minute (a fixed window, ``now // 60``). A slot is free
for another client when empty or idle (nothing open, nothing this minute).

IPv6 clients are counted per /64, like the auth throttle's networks: one host
commonly holds a whole /64, so per-address limits would not bind it. IPv4
clients are counted per address.

Failure modes are chosen to fail open, since these limits protect capacity,
not secrets: a full neighbourhood in the table (many distinct clients at
once) lets the client through uncounted; a lock held too long (a worker
killed inside the few microseconds it holds it) makes this process skip the
limits for a minute rather than stall its event loop; and counts left behind
by a killed worker are forgotten once that client has opened nothing for an
hour. Two clients whose hashes collide share one slot: with a 64-bit hash that
is vanishingly rare, and the salt keeps it from being arranged.
"""

from __future__ import annotations

import hashlib
import ipaddress
import mmap
import multiprocessing
import os
import struct

from relaygate.config import ConnectionLimitsConfig

__all__ = ["ConnectionLimiter", "ConnectionLimitsConfig"]

_SLOT = struct.Struct("=QIII")  # key (0 = empty), concurrent, minute number, count this minute
_PROBE = 32  # slots searched per client: few misses at half load, little work under the lock
_STALE_MINUTES = 60  # no new connection this long: open counts are presumed leaked
_LOCK_TIMEOUT = 0.25  # seconds; the lock is held for microseconds when all is well
_LOCK_BACKOFF = 60.0  # seconds to skip the limits after a lock timeout
_KEY_CACHE = 4096  # per-process memo of client -> key before it is emptied


class ConnectionLimiter:
    def __init__(self, config: ConnectionLimitsConfig, slots: int = 8192) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.config = config
        self.slots = slots
        self._probe = min(_PROBE, slots)
        self._window = struct.Struct("=" + _SLOT.format.lstrip("=") * self._probe)
        size = (slots + self._probe - 1) * _SLOT.size
        self._table = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
        self._lock = multiprocessing.Lock()
        self._salt = os.urandom(16)  # made before fork: the same in every worker
        self._exempt = tuple(ipaddress.ip_network(n, strict=False) for n in config.exempt)
        self._active = bool(config.per_ip_concurrent or config.per_ip_per_minute)
        self._keys: dict[str, int] = {}
        self._skip_until = 0.0
        self._last_now = 0.0

    # ------------------------------------------------------------ public

    def open(self, client_ip: str, now: float) -> str | None:
        """A new connection from ``client_ip``: None when allowed (and counted),
        else "concurrent" or "rate". Call ``close`` later only for allowed ones."""
        if not self._active:
            return None
        key = self._key(client_ip)
        if not key:
            return None
        self._last_now = now
        if not self._acquire(now):
            return None
        try:
            minute = int(now // 60)
            index, concurrent, slot_minute, count = self._find(key, minute, claim=True)
            if index < 0:
                return None  # neighbourhood full of live clients: let it through uncounted
            if slot_minute != minute:
                count = 0
            if concurrent and minute - slot_minute > _STALE_MINUTES:
                concurrent = 0
            limits = self.config
            if limits.per_ip_concurrent and concurrent >= limits.per_ip_concurrent:
                return "concurrent"
            if limits.per_ip_per_minute and count >= limits.per_ip_per_minute:
                return "rate"
            _SLOT.pack_into(self._table, index * _SLOT.size, key, concurrent + 1, minute, count + 1)
            return None
        finally:
            self._lock.release()

    def close(self, client_ip: str) -> None:
        """A connection that ``open`` allowed has ended."""
        if not self._active:
            return
        key = self._key(client_ip)
        if not key or not self._acquire(self._last_now):
            return
        try:
            index, concurrent, slot_minute, count = self._find(key, 0, claim=False)
            if index >= 0 and concurrent > 0:
                _SLOT.pack_into(
                    self._table, index * _SLOT.size, key, concurrent - 1, slot_minute, count
                )
        finally:
            self._lock.release()

    def usage(self, client_ip: str, now: float) -> tuple[int, int]:
        """(open connections, connections opened this minute) for ``client_ip``."""
        key = self._key(client_ip)
        if not key or not self._acquire(now):
            return 0, 0
        try:
            minute = int(now // 60)
            index, concurrent, slot_minute, count = self._find(key, minute, claim=False)
        finally:
            self._lock.release()
        if index < 0:
            return 0, 0
        return concurrent, count if slot_minute == minute else 0

    # ------------------------------------------------------------ internals

    def _key(self, client_ip: str) -> int:
        """The client's salted hash, 0 for exempt clients; memoized per process."""
        key = self._keys.get(client_ip)
        if key is None:
            key = self._compute_key(client_ip)
            if len(self._keys) >= _KEY_CACHE:
                self._keys.clear()
            self._keys[client_ip] = key
        return key

    def _compute_key(self, client_ip: str) -> int:
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            material = client_ip.encode()  # not an IP: limited under its own name
        else:
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            if any(address in network for network in self._exempt):
                return 0
            material = address.packed
            if len(material) == 16:
                material = material[:8]  # the /64
        digest = hashlib.blake2b(material, digest_size=8, key=self._salt).digest()
        return int.from_bytes(digest, "little") or 1

    def _acquire(self, now: float) -> bool:
        if now < self._skip_until:
            return False
        if self._lock.acquire(timeout=_LOCK_TIMEOUT):
            return True
        self._skip_until = now + _LOCK_BACKOFF
        return False

    def _find(self, key: int, minute: int, claim: bool) -> tuple[int, int, int, int]:
        """(index, concurrent, minute, count) of ``key``'s slot; with ``claim``, of a
        free slot when it has none. Index -1 when neither. Hold the lock."""
        start = key % self.slots
        # The window never wraps (the table has _probe - 1 spare slots at its end),
        # so one unpack reads it all and the key search runs in C.
        values = self._window.unpack_from(self._table, start * _SLOT.size)
        try:
            step = values[0::4].index(key)
        except ValueError:
            pass
        else:
            return start + step, *values[4 * step + 1 : 4 * step + 4]
        if claim:
            for step in range(self._probe):
                slot_key, concurrent, slot_minute = values[4 * step : 4 * step + 3]
                idle = concurrent == 0 and slot_minute != minute
                if not slot_key or idle or minute - slot_minute > _STALE_MINUTES:
                    return start + step, 0, minute, 0
        return -1, 0, minute, 0
