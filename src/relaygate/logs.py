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
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from relaygate.storage.files import open_private_append

# Bare values: what cannot break a line, a key or a quote.
_BARE = re.compile(r"[A-Za-z0-9.\-_@:/+\[\]<>,*]+")
_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
}


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if _BARE.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=True)  # quotes and escapes CR, LF, '"', '\\'


class _Sink:
    """Where events go. Plain writes, not the logging module: it costs ~5x more per line."""

    def __init__(self) -> None:
        self.stream: TextIO = sys.stderr
        self.level = logging.INFO
        self.json = False
        self.node: str | None = None  # [server] node_name on a cluster: every line has it
        self._second = -1
        self._second_text = ""

    def timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"


_sink = _Sink()


def setup(
    level: str = "info", fmt: str = "logfmt", file: Path | None = None, node: str | None = None
) -> None:
    """``node``: every line says which node wrote it (a cluster's logs get merged)."""
    _sink.node = node
    previous = _sink.stream
    if file is None:
        _sink.stream = sys.stderr
    else:
        # Line-buffered append: each event is one write(2), whole even with several
        # workers. 0600 when we create it: it names users, addresses and subjects.
        # Called again on reload: the path is opened anew, so after logrotate
        # renamed the file the events go to the new one (no copytruncate needed).
        fd = open_private_append(file)
        _sink.stream = open(fd, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    if previous is not _sink.stream and previous not in (sys.stderr, sys.stdout):
        try:
            previous.close()
        except OSError:
            pass
    _sink.level = logging.getLevelName(level.upper())
    _sink.json = fmt == "json"


def format_event(name: str, level: int, fields: dict[str, Any], now: float) -> str:
    stamp = _sink.timestamp(now)
    level_name = _LEVEL_NAMES.get(level, "info")
    if _sink.json:
        data = {"ts": stamp, "level": level_name, "event": name}
        data.update({k: v for k, v in fields.items() if v is not None})
        if _sink.node is not None:
            data.setdefault("node", _sink.node)
        return json.dumps(data, ensure_ascii=True, default=str)
    parts = [stamp, level_name, "event=" + name]
    parts.extend(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)
    if _sink.node is not None and "node" not in fields:
        parts.append("node=" + _value(_sink.node))
    return " ".join(parts)


def event(name: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log one event; ``fields`` become key=value pairs in the order given."""
    if level < _sink.level:
        return
    try:
        _sink.stream.write(format_event(name, level, fields, time.time()) + "\n")
    except (OSError, ValueError):
        pass  # a full disk or closed stderr must not take the server down
