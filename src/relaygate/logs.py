"""Structured logs: one event per line with stable keys.

Format (logfmt, the default)::

    2026-11-29T01:45:42.123Z info event=auth.fail session=9f2c client_ip=127.0.0.1 user=a@b.c

Keys are stable so fail2ban and log pipelines can rely on them; docs/logging.md
lists every event. Values chosen by a client (EHLO name, addresses) are quoted
and escaped, so a client cannot forge a line. Passwords and AUTH payloads are
never passed to this module.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("relaygate")

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_@:/+[]<>,*")


def _value(value: Any) -> str:
    text = str(value)
    if text and all(c in _SAFE for c in text):
        return text
    return json.dumps(text, ensure_ascii=True)  # quotes and escapes CR, LF, '"', '\\'


def _timestamp(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts = [_timestamp(record.created), record.levelname.lower(), f"event={record.msg}"]
        parts.extend(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)
        return " ".join(parts)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        data = {"ts": _timestamp(record.created), "level": record.levelname.lower()}
        data["event"] = str(record.msg)
        data.update({k: v for k, v in fields.items() if v is not None})
        return json.dumps(data, ensure_ascii=True, default=str)


def setup(level: str = "info", fmt: str = "logfmt", file: Path | None = None) -> None:
    handler: logging.Handler
    if file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file, encoding="utf-8")
    handler.setFormatter(JSONFormatter() if fmt == "json" else LogfmtFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def event(name: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log one event; ``fields`` become key=value pairs in the order given."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"fields": fields})
