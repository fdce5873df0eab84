"""Reloading a running server: SIGHUP, ``relaygate reload``, and watched files.

SIGHUP makes every process re-read the configuration file and apply what
can change safely while connections stay open: limits, throttles, sending
limits, routes and TLS policy, webhooks, the log settings (the log file is
reopened, so logrotate needs no copytruncate), the TLS certificate and the
DKIM keys. What cannot change in place (listeners, data_dir, storage,
workers, ...) keeps its running value and the reload says a restart is
needed for it. A file that fails validation changes nothing: its problems
are logged one per line and the running configuration stays.

The supervisor validates first and passes SIGHUP on only for a good file;
each process then reads the file itself (it holds its own copy of the
configuration since the fork). The supervisor writes the outcome to
data_dir/reload.json so ``relaygate reload`` can report it.

Certificates and DKIM keys need no signal at all: the processes that use
them look at their files (or rows) every few seconds (``FileWatch``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from relaygate import logs
from relaygate.config import Config, ConfigError, load_config, quickstart_config

STATUS_FILE = "reload.json"
WATCH_INTERVAL = 2.0  # seconds between looks at certificate files and DKIM keys

# Top-level settings a running server cannot take over: sockets are bound,
# processes forked, pools opened with them.
RESTART_ONLY = (
    "data_dir",
    "workers",
    "listeners",
    "storage",
    "shared",
    "http",
    "node_name",
    "password_hash",
    "connection_limits",
)
# [delivery] settings fixed for the life of the delivery process.
DELIVERY_RESTART_ONLY = ("mode", "concurrency")


def reread(running: Config) -> Config:
    """The configuration as its file says now; ConfigError if it is not valid."""
    if running.source is None:
        return quickstart_config() if running.quickstart else running
    return load_config(running.source)


def merge(running: Config, new: Config) -> tuple[Config, list[str]]:
    """What to run with after a reload, and the settings that need a restart."""
    needs_restart = [name for name in RESTART_ONLY if getattr(new, name) != getattr(running, name)]
    needs_restart += [
        f"delivery.{name}"
        for name in DELIVERY_RESTART_ONLY
        if getattr(new.delivery, name) != getattr(running.delivery, name)
    ]
    delivery = dataclasses.replace(
        new.delivery, **{name: getattr(running.delivery, name) for name in DELIVERY_RESTART_ONLY}
    )
    kept = {name: getattr(running, name) for name in RESTART_ONLY}
    return dataclasses.replace(new, delivery=delivery, **kept), needs_restart


def changed(running: Config, new: Config) -> list[str]:
    """Names of the top-level settings that differ."""
    return [
        f.name
        for f in dataclasses.fields(Config)
        if f.name != "source" and getattr(running, f.name) != getattr(new, f.name)
    ]


def apply_logging(config: Config) -> None:
    """The [log] settings (at start, and again at a reload: the log file is
    then opened anew, after logrotate renamed it)."""
    logs.setup(
        config.log.level,
        config.log.format,
        config.log.file,
        node=config.node_name if config.storage.url else None,
    )


def reload_config(running: Config, process: str) -> Config | None:
    """Re-read the file for one process: the config to apply, or None (logged)."""
    try:
        new = reread(running)
    except ConfigError as exc:
        for problem in exc.problems:
            logs.event("config.reload_failed", logging.ERROR, process=process, problem=problem)
        return None
    effective, _ = merge(running, new)
    return effective


def write_status(data_dir: Path, ok: bool, problems: list[str], restart: list[str]) -> None:
    """The outcome for ``relaygate reload`` (written whole, then renamed into place)."""
    path = data_dir / STATUS_FILE
    temporary = path.with_name(f".{STATUS_FILE}.{os.getpid()}")
    body = {
        "at": time.time(),
        "ok": ok,
        "problems": problems,
        "restart_needed": restart,
    }
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(body, f)
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only data_dir: the log says it all the same


def read_status(data_dir: Path) -> dict[str, object] | None:
    try:
        value = json.loads((data_dir / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


FileSignature = tuple[tuple[int, int, int], ...]


def signature(paths: list[Path]) -> FileSignature:
    """What changes when any of ``paths`` is replaced or rewritten."""
    found = []
    for path in paths:
        try:
            st = os.stat(path)
            found.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            found.append((0, -1, 0))
    return tuple(found)
