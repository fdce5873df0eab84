"""relaygate behind a real HAProxy (Debian's ``haproxy``, TCP mode, ``send-proxy-v2``).

The test writes an HAProxy config with two frontends on free loopback ports,
one to relaygate's STARTTLS listener and one to its implicit-TLS listener,
both with ``send-proxy-v2``, and starts HAProxy in the foreground. Python's
smtplib connects through it from 127.0.0.5 (any 127/8 address is loopback);
relaygate must see 127.0.0.5, not HAProxy's 127.0.0.1. HAProxy missing is a
failure, not a skip: .ci/run installs it.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import ALICE, HOST, TLS_NAME, Server, ServerPool, free_ports, make_message

CLIENT = "127.0.0.5"


@pytest.fixture
def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None
    )
    if found is None:
        pytest.fail("haproxy is not installed (apt-get install haproxy; .ci/run does)")
    return found


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def balanced(
    fresh_servers: ServerPool, haproxy_binary: str, tmp_path: Path
) -> Iterator[tuple[Server, int, int]]:
    server = fresh_servers.create("behind-haproxy", users=[ALICE], proxy_trusted=["127.0.0.1/32"])
    starttls_front, implicit_front = free_ports(2)
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"""
global
    maxconn 100

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend submission
    bind {HOST}:{starttls_front}
    default_backend relaygate_starttls

frontend submissions
    bind {HOST}:{implicit_front}
    default_backend relaygate_implicit

backend relaygate_starttls
    server rg {HOST}:{server.starttls_port} send-proxy-v2

backend relaygate_implicit
    server rg {HOST}:{server.implicit_port} send-proxy-v2
""",
        encoding="utf-8",
    )
    check = subprocess.run(
        [haproxy_binary, "-c", "-f", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    log = (tmp_path / "haproxy.out").open("wb")
    process = subprocess.Popen(
        [haproxy_binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while not (_listening(starttls_front) and _listening(implicit_front)):
            assert process.poll() is None, (tmp_path / "haproxy.out").read_text()
            assert time.monotonic() < deadline, "haproxy did not start listening"
            time.sleep(0.05)
        yield server, starttls_front, implicit_front
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_smtplib_through_haproxy_send_proxy_v2(balanced: tuple[Server, int, int]) -> None:
    server, starttls_front, implicit_front = balanced
    context = server.client_context()
    sent = []
    with smtplib.SMTP(HOST, starttls_front, timeout=10, source_address=(CLIENT, 0)) as smtp:
        smtp.starttls(context=context)
        smtp.login(ALICE.address, ALICE.password)
        message = make_message(
            from_addr=ALICE.address, to=["a@example.net"], subject="via haproxy starttls"
        )
        smtp.sendmail(ALICE.address, ["a@example.net"], message)
        sent.append("via haproxy starttls")
    with smtplib.SMTP_SSL(
        TLS_NAME, implicit_front, timeout=10, source_address=(CLIENT, 0), context=context
    ) as smtp:
        smtp.login(ALICE.address, ALICE.password)
        message = make_message(
            from_addr=ALICE.address, to=["a@example.net"], subject="via haproxy implicit"
        )
        smtp.sendmail(ALICE.address, ["a@example.net"], message)
        sent.append("via haproxy implicit")
    messages = {m["subject"]: m for m in server.messages()}
    for subject in sent:
        assert messages[subject]["client_ip"] == CLIENT, messages[subject]
    connects = server.log_events("connect")
    proxied = [e for e in connects if e.get("client_ip") == CLIENT]
    assert len(proxied) == 2, connects
    assert all(e["proxy"] == HOST for e in proxied)
    assert not server.log_events("proxy.refused")
