"""An accepted message as it is stored, its queue id, and the one error storing it can raise.

Plain data shared by the submission service (which builds it), every
acceptance backend (which stores it: spool.py on SQLite,
storage/postgres/acceptance.py) and delivery (which names bounces with new
queue ids). It imports none of them.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

from relaygate.quotas import Usage

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


_rng: tuple[int, random.Random] | None = None


def _random_bits(bits: int) -> int:
    """Fast non-secret randomness, seeded from the OS once per process (fork-safe)."""
    global _rng
    pid = os.getpid()
    if _rng is None or _rng[0] != pid:
        _rng = (pid, random.Random(os.urandom(16)))
    return _rng[1].getrandbits(bits)


def new_queue_id(now: float | None = None) -> str:
    """17 characters: 9 of millisecond time (sortable), 8 random (40 bits).

    Uniqueness, not secrecy, is what matters: a process-seeded PRNG costs a
    fraction of a getrandom() system call per message.
    """
    millis = int((time.time() if now is None else now) * 1000)
    value = (millis << 40) | _random_bits(40)
    chars = []
    for _ in range(17):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


@dataclass(slots=True)
class SpooledMessage:
    id: str
    account: str
    client_ip: str
    mail_from: str
    recipients: list[str]
    subject: str
    body: bytes | bytearray  # as the client sent it (dot-unstuffed)
    created_at: float
    status: str = "captured"
    credential: str | None = None  # the app credential's name; None: the password
    usage: Usage | None = None  # what it counts against sending limits
    smtputf8: bool = False  # relayed onward with the same MAIL parameters
    body_8bit: bool = False
    header: bytes = b""  # what we add in front (Received, Message-ID, Date)

    @property
    def size(self) -> int:
        return len(self.header) + len(self.body)


class SpoolError(Exception):
    """The message could not be stored; the client gets a 451 and may retry."""
