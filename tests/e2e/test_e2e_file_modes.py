"""Nothing relaygate writes is readable by other local users (issue 7, item 6).

Before the fix, with the common umask 022, ``relaygate.db`` (password hashes,
every captured message), its ``-wal`` and ``-shm`` and the self-signed TLS
certificate were 0644 in a 0755 data_dir. Now directories relaygate makes are
0700 and files 0600 whatever the umask, an existing data_dir open to others
gets a warning at start, and our own files in it are made private.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .helpers import ALICE, Server, ServerPool, make_message, session


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """The umask every process the test starts inherits (CLI and server)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_everything_in_data_dir_is_private_under_umask_022(fresh_servers: ServerPool) -> None:
    with umask(0o022):
        server: Server = fresh_servers.create("private", users=[ALICE])  # CLI makes data_dir
        server.cli("dkim", "generate", "example.com")
        with session(server, user=ALICE) as client:
            message = make_message(from_addr=ALICE.address, to=["r@example.net"], subject="m")
            client.send_mail(ALICE.address, ["r@example.net"], message)
    data = server.data_dir
    assert mode(data) == 0o700
    seen = {p.relative_to(data).as_posix(): p for p in data.rglob("*")}
    for wanted in ("relaygate.db", "relaygate.db-wal", "relaygate.db-shm", "throttle.db",
                   "changes", "tls/selfsigned-ecdsa.key", "tls/selfsigned-ecdsa.crt"):  # fmt: skip
        assert wanted in seen, sorted(seen)
    assert any(name.startswith("dkim/") for name in seen), sorted(seen)
    loose = {
        name: oct(mode(path))
        for name, path in seen.items()
        if mode(path) != (0o700 if path.is_dir() else 0o600)
    }
    assert loose == {}
    assert mode(server.log_path) == 0o600


def test_an_open_data_dir_is_reported_and_our_files_made_private(
    fresh_servers: ServerPool,
) -> None:
    with umask(0o022):
        server = fresh_servers.create("open", users=[ALICE], start=False)
        os.chmod(server.data_dir, 0o755)
        os.chmod(server.data_dir / "relaygate.db", 0o644)  # as an older relaygate left it
        server.start()
    warning = server.wait_for_event("data_dir.shared")
    assert warning["mode"] == "755"
    assert "chmod 700" in server.stderr_path.read_text()
    assert mode(server.data_dir) == 0o755  # the admin's directory: reported, not changed
    assert mode(server.data_dir / "relaygate.db") == 0o600
    with session(server, user=ALICE):
        pass  # and it serves
