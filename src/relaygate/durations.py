"""Spans of time as people write them: "30d", "12h", "90m", "45s", "1w", or
several together ("1h30m"). Used by [retention] and ``messages prune``."""

from __future__ import annotations

import re

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_SECONDS = 100 * 365 * 86400  # a century: anything longer is a typo
_PART = re.compile(r"(\d{1,9})([smhdw])")
USAGE = "a duration such as 30d, 12h, 90m or 45s (units: s, m, h, d, w)"


def parse_duration(text: str) -> int:
    """Seconds; ValueError with a one-line reason for anything else."""
    cleaned = text.strip().lower()
    if not cleaned:
        raise ValueError(f"empty duration: use {USAGE}")
    position = 0
    total = 0
    for match in _PART.finditer(cleaned):
        if match.start() != position:
            break
        total += int(match.group(1)) * UNITS[match.group(2)]
        position = match.end()
    if position != len(cleaned):
        raise ValueError(f"not a duration: {text!r}: use {USAGE}")
    if total > MAX_SECONDS:
        raise ValueError(f"duration too long: {text!r} (at most 100 years)")
    return total


def format_duration(seconds: float) -> str:
    """The largest whole unit: 2592000 -> "30d", 5400 -> "90m"."""
    whole = int(seconds)
    for unit in ("w", "d", "h", "m"):
        if whole and whole % UNITS[unit] == 0:
            return f"{whole // UNITS[unit]}{unit}"
    return f"{whole}s"
