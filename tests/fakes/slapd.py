"""A real OpenLDAP slapd on a loopback port, with a test tree, for the LDAP tests.

Not a fake of LDAP: Debian's ``/usr/sbin/slapd`` itself, started in the
foreground on ``ldap://127.0.0.1:<port>/`` (and ldaps:// on another port)
with a configuration file, an mdb database and a certificate of its own (a
test CA made here, for StartTLS), and stopped (SIGTERM, then SIGKILL) by
``stop``. The tests fail, never skip, when slapd is missing.

The tree::

    dc=example,dc=test
      ou=people    the users (inetOrgPerson + relaygateTestUser for aliases)
      cn=relaygate the service account relaygate searches with
    rootdn cn=admin,dc=example,dc=test (the tests change users through it)

``relaygateTestUser`` is a small test schema: ``mailAlternateAddress`` (the
attribute qmail-style directories use for aliases) and ``employeeType`` is used
as the "disabled" marker (``(employeeType=disabled)``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

from fakes.smtp_sink import make_tls_context

SLAPD = Path("/usr/sbin/slapd")
SLAPADD = Path("/usr/sbin/slapadd")
LDAPMODIFY = Path("/usr/bin/ldapmodify")
MODULE_PATH = Path("/usr/lib/ldap")
SCHEMA_DIR = Path("/etc/ldap/schema")
BASE_DN = "dc=example,dc=test"
PEOPLE = f"ou=people,{BASE_DN}"
ADMIN_DN = f"cn=admin,{BASE_DN}"
ADMIN_PASSWORD = "admin-secret-0d1e"  # a test directory's
SERVICE_DN = f"cn=relaygate,{BASE_DN}"
SERVICE_PASSWORD = "service-secret-7f3a"  # a test directory's
START_TIMEOUT = 10.0

_TEST_SCHEMA = """\
attributetype ( 1.3.6.1.4.1.55555.1.1 NAME 'mailAlternateAddress'
    EQUALITY caseIgnoreIA5Match SUBSTR caseIgnoreIA5SubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.26{256} )
objectclass ( 1.3.6.1.4.1.55555.2.1 NAME 'relaygateTestUser' SUP top AUXILIARY
    MAY ( mailAlternateAddress ) )
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_ca_and_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key): a test CA that signed a
    certificate for localhost and 127.0.0.1 (the sinks' maker, fakes/smtp_sink.py)."""
    _, ca_path = make_tls_context("localhost", directory)
    key_path = directory / "localhost.key"
    key_path.chmod(0o600)
    return ca_path, directory / "localhost.pem", key_path


def user_ldif(
    uid: str,
    password: str,
    mail: str | None,
    aliases: tuple[str, ...] = (),
    disabled: bool = False,
    extra: tuple[str, ...] = (),
) -> str:
    lines = [
        f"dn: uid={uid},{PEOPLE}",
        "objectClass: inetOrgPerson",
        "objectClass: relaygateTestUser",
        f"uid: {uid}",
        f"cn: {uid}",
        f"sn: {uid}",
        f"userPassword: {password}",
    ]
    if mail is not None:
        lines.append(f"mail: {mail}")
    lines += [f"mailAlternateAddress: {alias}" for alias in aliases]
    if disabled:
        lines.append("employeeType: disabled")
    lines += list(extra)
    return "\n".join(lines) + "\n"


class Slapd:
    """One slapd process (``start`` / ``stop``; a context manager too)."""

    def __init__(self, directory: Path, users_ldif: str = "") -> None:
        for tool in (SLAPD, SLAPADD, LDAPMODIFY):
            if not tool.exists():
                raise AssertionError(
                    f"{tool} is missing: install Debian's slapd and ldap-utils (.ci/run does)"
                )
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}/"
        self.ldaps_port = free_port()
        self.ldaps_url = f"ldaps://127.0.0.1:{self.ldaps_port}/"
        self.ca_file, self._cert, self._key = make_ca_and_certificate(directory)
        self._db = directory / "db"
        self._db.mkdir(exist_ok=True)
        self._conf = directory / "slapd.conf"
        (directory / "relaygate-test.schema").write_text(_TEST_SCHEMA)
        self._conf.write_text(self._config())
        self.service_password_file = directory / "bind-password"
        self.service_password_file.write_text(SERVICE_PASSWORD + "\n")
        self.service_password_file.chmod(0o600)
        self.process: subprocess.Popen[bytes] | None = None
        self._log = directory / "slapd.log"
        self._load(self._tree() + users_ldif)

    def _config(self) -> str:
        schemas = ["core", "cosine", "inetorgperson", "nis"]
        return "\n".join(
            [
                *(f"include {SCHEMA_DIR / name}.schema" for name in schemas),
                f"include {self.directory / 'relaygate-test.schema'}",
                f"pidfile {self.directory / 'slapd.pid'}",
                f"modulepath {MODULE_PATH}",
                "moduleload back_mdb",
                f"TLSCertificateFile {self._cert}",
                f"TLSCertificateKeyFile {self._key}",
                f"TLSCACertificateFile {self.ca_file}",
                "loglevel none",
                # Binds need TLS (StartTLS or ldaps://): a client that skipped it fails.
                "security simple_bind=128",
                "database mdb",
                "maxsize 10485760",
                f'suffix "{BASE_DN}"',
                f'rootdn "{ADMIN_DN}"',
                f"rootpw {ADMIN_PASSWORD}",
                f"directory {self._db}",
                "index objectClass eq",
                "index mail,uid eq",
                # Passwords: only for binding; everything else readable by the
                # service account (as a real directory would set it up).
                "access to attrs=userPassword by self =x by anonymous auth by * none",
                f'access to * by dn.exact="{SERVICE_DN}" read by self read by * none',
                "",
            ]
        )

    def _tree(self) -> str:
        return (
            f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\n"
            "o: example\ndc: example\n\n"
            f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n\n"
            f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\n"
            "objectClass: simpleSecurityObject\n"
            f"cn: relaygate\nuserPassword: {SERVICE_PASSWORD}\n\n"
        )

    def _load(self, ldif: str) -> None:
        path = self.directory / "tree.ldif"
        path.write_text(ldif.replace("\n\n\n", "\n\n"))
        result = subprocess.run(
            [str(SLAPADD), "-f", str(self._conf), "-l", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"slapadd failed: {result.stderr}")

    def start(self) -> Self:
        assert self.process is None or self.process.poll() is not None
        with open(self._log, "ab") as log:
            # -d 0: stay in the foreground (so we own the process), logging nothing.
            self.process = subprocess.Popen(
                [
                    str(SLAPD),
                    "-h",
                    f"{self.url} {self.ldaps_url}",
                    "-f",
                    str(self._conf),
                    "-d",
                    "0",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"slapd exited during start: {self._log.read_text()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"slapd not listening within {START_TIMEOUT}s")
            time.sleep(0.05)

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def modify(self, ldif: str) -> None:
        """Change the tree as the directory's administrator (ldapmodify)."""
        result = subprocess.run(
            [str(LDAPMODIFY), "-x", "-ZZ", "-H", self.url, "-D", ADMIN_DN, "-w", ADMIN_PASSWORD],
            input=ldif,
            env={**os.environ, "LDAPTLS_CACERT": str(self.ca_file), "LDAPTLS_REQCERT": "demand"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"ldapmodify failed: {result.stderr}")

    def add_user(self, uid: str, password: str, mail: str, **kwargs: object) -> None:
        ldif = user_ldif(uid, password, mail, **kwargs)  # type: ignore[arg-type]
        self.modify("changetype: add\n".join(ldif.split("\n", 1)))

    def disable(self, uid: str) -> None:
        self.modify(
            f"dn: uid={uid},{PEOPLE}\nchangetype: modify\nadd: employeeType\n"
            "employeeType: disabled\n"
        )

    def enable(self, uid: str) -> None:
        self.modify(
            f"dn: uid={uid},{PEOPLE}\nchangetype: modify\ndelete: employeeType\n"
            "employeeType: disabled\n"
        )

    def delete(self, uid: str) -> None:
        self.modify(f"dn: uid={uid},{PEOPLE}\nchangetype: delete\n")

    def set_password(self, uid: str, password: str) -> None:
        self.modify(
            f"dn: uid={uid},{PEOPLE}\nchangetype: modify\nreplace: userPassword\n"
            f"userPassword: {password}\n"
        )
