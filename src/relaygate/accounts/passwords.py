"""Password hashing with argon2id.

Every call here is deliberately slow (tens to hundreds of milliseconds) and
blocking; the server runs them in a thread pool, never on the event loop.
"""

from __future__ import annotations

import secrets

import argon2
from argon2.exceptions import Argon2Error

from relaygate.config import PasswordHashConfig


class PasswordHasher:
    """argon2id hashing and verification with the configured cost."""

    def __init__(self, config: PasswordHashConfig | None = None) -> None:
        config = config or PasswordHashConfig()
        self._hasher = argon2.PasswordHasher(
            time_cost=config.time_cost,
            memory_cost=config.memory_kib,
            parallelism=config.parallelism,
            type=argon2.Type.ID,
        )
        # A hash of a password nobody knows, with the same cost as real ones:
        # verify_dummy() checks against it so an unknown user takes as long
        # as a wrong password and timing does not reveal which addresses exist.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(32))

    def hash(self, password: str) -> str:
        """Return an encoded argon2id hash (salt and parameters included)."""
        return self._hasher.hash(password)

    def verify(self, stored_hash: str, password: str) -> bool:
        """True when ``password`` matches; False on mismatch or a malformed hash."""
        try:
            return self._hasher.verify(stored_hash, password)
        except (Argon2Error, ValueError):
            # ValueError covers InvalidHashError and UnsupportedParametersError:
            # a corrupt stored hash must deny the login, not crash the session.
            return False

    def verify_dummy(self, password: str) -> None:
        """Spend the time of a real verify without any account to check against."""
        self.verify(self._dummy_hash, password)

    def needs_rehash(self, stored_hash: str) -> bool:
        """True when ``stored_hash`` was made with other parameters than ours.

        Lets the server upgrade a hash after a successful login once the
        admin raises the cost in the config.
        """
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except (Argon2Error, ValueError):
            return True
