"""What kind of failure a use case's error is, for the edges that report it.

The use cases word their errors for people ("no such account: x",
"account already exists: x", "invalid address: ..."); the edges need the kind:
the HTTP API answers 404 / 409 / 400, the CLI exits 1 for a state of things
(missing, conflicting) and 2 for a request the user must correct. One rule
for both, so the two never disagree.
"""

from __future__ import annotations

from typing import Literal

from relaygate.services.admin import NotFound

ErrorKind = Literal["missing", "conflict", "invalid"]

_MISSING = ("no such", "no DKIM key", "nothing queued for", "no token named")
_CONFLICT = ("already exists", "exists already")


def error_kind(exc: BaseException) -> ErrorKind:
    if isinstance(exc, NotFound | LookupError):
        return "missing"
    text = str(exc)
    if text.startswith(_MISSING):
        return "missing"
    if any(marker in text for marker in _CONFLICT):
        return "conflict"
    return "invalid"
