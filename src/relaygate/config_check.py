"""``relaygate config check``: what ``serve`` would refuse, found without starting it.

The loader (config.load_config) finds syntax, keys, values and unreadable
files. Here come the checks ``serve`` makes later that need no running server
and change nothing: the [tls] pair loads as a certificate and its key, the
DKIM keys in data_dir load, and data_dir and the log file could be made.
Nothing is created; PostgreSQL, Redis and the ports are not tried (``serve``
reports those at start, one line each).
"""

from __future__ import annotations

import os
from pathlib import Path

from relaygate.config import Config, ConfigError, load_config
from relaygate.delivery.dkim import DKIMError, key_directory, load_keys
from relaygate.server.tls import TLSSetupError, server_context


def check(path: str | os.PathLike[str]) -> Config:
    """The config in ``path``; ConfigError with every problem found, one line each,
    each prefixed with the file name as the loader does."""
    config = load_config(path)
    problems = problems_beyond_loading(config)
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return config


def problems_beyond_loading(config: Config) -> list[str]:
    problems = []
    if config.tls.cert_file is not None and config.tls.key_file is not None:
        try:
            server_context([(config.tls.cert_file, config.tls.key_file)])
        except (TLSSetupError, OSError) as exc:
            problems.append(f"tls: {exc}")
    problems += _directory_problems("server.data_dir", config.data_dir)
    if config.log.file is not None:
        problems += _file_problems("log.file", config.log.file)
    if config.storage.url is None and config.data_dir.is_dir():
        # On PostgreSQL the keys are rows: not read here (no connection is made).
        try:
            load_keys(key_directory(config.data_dir))
        except DKIMError as exc:
            problems.append(f"dkim: {exc}")
        except OSError as exc:
            problems.append(f"dkim: {exc.filename}: {exc.strerror}")
    return problems


def _directory_problems(key: str, path: Path) -> list[str]:
    """A directory ``serve`` uses, or makes (with its parents) if it is not there."""
    if path.exists():
        if not path.is_dir():
            return [f"{key}: {path} is not a directory"]
        if not os.access(path, os.W_OK | os.X_OK):
            return [f"{key}: {path}: permission denied (cannot write in it)"]
        return []
    return _creatable(key, path)


def _file_problems(key: str, path: Path) -> list[str]:
    """A file ``serve`` appends to, or makes."""
    if path.exists():
        if path.is_dir():
            return [f"{key}: {path} is a directory"]
        if not os.access(path, os.W_OK):
            return [f"{key}: {path}: permission denied (cannot write to it)"]
        return []
    return _creatable(key, path)


def _creatable(key: str, path: Path) -> list[str]:
    """Could ``path`` be made? Its nearest existing ancestor decides."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return [f"{key}: cannot make {path}: {ancestor} is not a directory"]
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return [f"{key}: cannot make {path}: permission denied in {ancestor}"]
    return []
