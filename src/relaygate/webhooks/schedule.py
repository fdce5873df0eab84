"""When a webhook delivery is tried again: 8 retries over about 22 hours.

RELAYGATE_WEBHOOK_TIME_SCALE (tests only) divides every delay, so the e2e
tests see retries in seconds instead of hours (and the SMTP workers re-read
API-made webhooks every second instead of every 30 s).
"""

from __future__ import annotations

import os

RETRY_DELAYS = (30.0, 120.0, 600.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 10 * 3600.0)
TIMEOUT = 10.0  # seconds for one POST, connect to last byte


def time_scale() -> float:
    try:
        scale = float(os.environ.get("RELAYGATE_WEBHOOK_TIME_SCALE", "1"))
    except ValueError:
        return 1.0
    return scale if scale >= 1 else 1.0


def retry_delay(failed_attempts: int, scale: float = 1.0) -> float | None:
    """Seconds until the next try after ``failed_attempts`` failures; None: give up."""
    if failed_attempts < 1 or failed_attempts > len(RETRY_DELAYS):
        return None
    return RETRY_DELAYS[failed_attempts - 1] / scale
