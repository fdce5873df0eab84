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
them look at their files (``CertificateWatch``) or rows (delivery/engine.py)
every few seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import ssl
import time
from pathlib import Path

from relaygate import logs
from relaygate.config import Config, ConfigError, load_config, quickstart_config
from relaygate.server.tls import (
    CertPair,
    TLSSetupError,
    certificate_not_after,
    certificate_pairs,
    certificate_pairs_quiet,
    end_point_binding,
    server_context,
)

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
    "oauth",  # the mechanisms each listener offers and the key source follow it
    "ldap",  # its password file is read, and its thread pool made, at start
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


def _changed(running: Config, new: Config) -> list[str]:
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


def _reread_logged(running: Config, process: str) -> tuple[Config | None, list[str]]:
    try:
        return reread(running), []
    except ConfigError as exc:
        for problem in exc.problems:
            logs.event("config.reload_failed", logging.ERROR, process=process, problem=problem)
        return None, exc.problems


def reload_config(running: Config, process: str) -> Config | None:
    """SIGHUP in a process the supervisor signalled: the file again, merged and
    with the log reopened; None if it does not validate (logged, nothing changes)."""
    new, _ = _reread_logged(running, process)
    if new is None:
        return None
    effective, _ = merge(running, new)
    apply_logging(effective)
    return effective


def answer(running: Config, process: str) -> Config | None:
    """SIGHUP in the process that answers ``relaygate reload`` (the supervisor,
    or the lone worker): as ``reload_config``, and the outcome logged
    (``config.reloaded``) and written to data_dir/reload.json."""
    new, problems = _reread_logged(running, process)
    if new is None:
        write_status(running.data_dir, False, problems, [])
        return None
    effective, restart = merge(running, new)
    apply_logging(effective)
    logs.event(
        "config.reloaded",
        changed=",".join(_changed(running, effective)) or "-",
        restart_needed=",".join(restart) or "-",
    )
    write_status(effective.data_dir, True, [], restart)
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


class CertificateWatch:
    """The certificate files behind a listening TLS context, looked at every
    WATCH_INTERVAL: changed files are loaded into a new context, and new
    handshakes move to it through the SNI callback of the context the listener
    was made with (``front``: asyncio and uvicorn keep theirs for good). A pair
    that does not load is logged and the one in use stays (an admin may be
    half-way through copying it); the next change is tried again."""

    def __init__(
        self, config: Config, front: ssl.SSLContext, pairs: list[CertPair], who: str
    ) -> None:
        self.config = config  # a reload replaces it
        self.front = front
        self.current = front
        self.pairs = pairs
        self.bindings = tuple(end_point_binding(cert) for cert, _ in pairs)  # SCRAM-PLUS
        self._who = who  # for the log: the worker's number, or "http"
        self._seen = self._look()

    def _look(self) -> tuple[list[Path], FileSignature]:
        files = [path for pair in certificate_pairs_quiet(self.config) for path in pair]
        return files, signature(files)

    def check(self) -> bool:
        """True when new certificate files are in use from now on."""
        seen = self._look()
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            pairs = certificate_pairs(self.config)
            context = server_context(pairs)
            bindings = tuple(end_point_binding(cert) for cert, _ in pairs)
        except (TLSSetupError, OSError, ValueError) as exc:
            logs.event("tls.reload_failed", logging.ERROR, worker=self._who, reason=str(exc))
            return False
        self.current, self.pairs, self.bindings = context, pairs, bindings
        self.front.sni_callback = self._pick
        cert = pairs[0][0]
        logs.event(
            "tls.reloaded", worker=self._who, cert=str(cert), not_after=certificate_not_after(cert)
        )
        return True

    def _pick(self, connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        if connection.context is not self.current:
            connection.context = self.current
