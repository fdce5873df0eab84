"""Times as JSON, logs of record and tables show them: RFC 3339 in UTC, whole
seconds ("2026-12-04T06:12:30Z"). One formatter, so no two edges disagree."""

from __future__ import annotations

import datetime
import time
from typing import overload


@overload
def rfc3339(ts: float) -> str: ...
@overload
def rfc3339(ts: None) -> None: ...
def rfc3339(ts: float | None) -> str | None:
    """Unix time as RFC 3339 UTC, the fraction dropped; None stays None."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def rfc3339_of(moment: datetime.datetime) -> str:
    """An aware datetime (a certificate's expiry, say) the same way."""
    return rfc3339(moment.timestamp())
