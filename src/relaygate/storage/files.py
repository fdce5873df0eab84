"""Files and directories relaygate makes are private to its user, whatever the umask.

The data directory holds password hashes, app-credential hashes, TLS and DKIM
private keys and every captured message: nobody else on the machine should
read it. A umask can only take permission bits away, so asking for 0700 and
0600 explicitly (instead of the usual 0777/0666 & ~umask) is enough, and a
umask of 022 (the common default) no longer yields world-readable mail.

SQLite creates ``-wal`` and ``-shm`` with the permission bits of the database
file itself, so creating that file 0600 first covers them too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


def private_directory(path: Path) -> None:
    """``mkdir -p`` where every directory it makes is 0700; existing ones are left alone."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIRECTORY_MODE)
        except FileExistsError:
            pass  # made meanwhile by another process


def private_file(path: Path) -> None:
    """Create ``path`` empty and 0600 unless it exists.

    An existing file is never opened: closing any descriptor of a SQLite
    database drops every POSIX lock this process holds on it (fcntl semantics),
    which would break the locking of the connections already open on it.
    """
    if path.exists():
        return
    private_directory(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return  # made meanwhile by another process
    os.close(fd)


def open_private_append(path: Path) -> int:
    """A descriptor for appending to ``path``, created 0600 if missing."""
    private_directory(path.parent)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)


def shared_bits(path: Path) -> int:
    """The group and world permission bits of ``path`` (0: private)."""
    return stat.S_IMODE(path.stat().st_mode) & 0o077


def tighten(path: Path) -> bool:
    """Make an existing file of ours 0600 if it was readable by others; True if changed."""
    try:
        if not shared_bits(path):
            return False
        os.chmod(path, FILE_MODE)
    except FileNotFoundError:
        return False
    return True
