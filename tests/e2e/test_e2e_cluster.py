"""Three relaygate nodes behind HAProxy on one PostgreSQL and one Redis.

The proof of docs/scale-out.md. Each test starts a cluster of its own: three
``relaygate serve`` processes (node-a, node-b, node-c), each with its own
data_dir, all with the same TLS files, the same PostgreSQL database (made
for the test, dropped after) and the same Redis database (flushed first);
HAProxy in TCP mode spreads connections over them round robin and tells
each node the client's address with ``send-proxy-v2``. Clients connect to
HAProxy from addresses of 127.0.0.0/8 other than HAProxy's own, so the
tests also see that limits apply to the client, not to the balancer.

HAProxy, PostgreSQL or Redis missing is a failure, never a skip (.ci/run
installs and starts them).
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from postgres_helpers import scratch_database

from fakes.smtp_sink import SMTPSink

from .delivery_helpers import loopback_address
from .helpers import (
    HOST,
    RawSMTP,
    Reply,
    Server,
    ServerPool,
    TomlValue,
    User,
    free_ports,
    make_message,
    queue_id_of,
    wait_until,
)
from .security_helpers import avoid_window_edge

ALICE = User("alice@example.com", "Alice-cluster-pw-5Rt8")
NAMES = ("node-a", "node-b", "node-c")
REDIS_URL = os.environ.get("RELAYGATE_TEST_REDIS", "redis://127.0.0.1:6379/9")
THROTTLED = "454 4.7.0"
AUTH_FAILED = "535 5.7.8"


def _cluster_redis_url() -> str:
    """The test Redis server, database 12 (no other test uses it)."""
    base, _, _ = REDIS_URL.rpartition("/")
    return f"{base}/12"


def _haproxy_binary() -> str:
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


def _tls_files(directory: Path) -> tuple[Path, Path]:
    """One certificate for every node (as an operator would deploy it)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cluster.crt", directory / "cluster.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


@dataclass
class Cluster:
    nodes: dict[str, Server]
    database: str
    front: int  # HAProxy's STARTTLS frontend
    context: ssl.SSLContext
    haproxy_log: Path
    _haproxy: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def send(self, subject: str, *, source: str = "127.0.0.5", rcpt: str = "r@example.net") -> str:
        """One message on a new connection through the balancer; the queue id."""
        with smtplib.SMTP(HOST, self.front, timeout=20, source_address=(source, 0)) as smtp:
            smtp.starttls(context=self.context)
            smtp.login(ALICE.address, ALICE.password)
            message = make_message(from_addr=ALICE.address, to=[rcpt], subject=subject)
            smtp.mail(ALICE.address)
            smtp.rcpt(rcpt)
            code, text = smtp.data(message)
            assert code == 250, (code, text)
            return queue_id_of(text.decode())

    def login(self, password: str, *, source: str) -> Reply:
        """One AUTH PLAIN on a new connection through the balancer."""
        with RawSMTP.connect(self.front, source=source) as client:
            client.ehlo()
            client.starttls(self.context)
            client.ehlo()
            return client.auth_plain(ALICE.address, password)

    def nodes_json(self, via: str = "node-a") -> list[dict[str, Any]]:
        return list(self.nodes[via].quick_json("nodes", "--json"))

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database) as db:
            return list(db.execute(sql.encode(), params).fetchall())


def _haproxy_config(nodes: Mapping[str, Server], front: int) -> str:
    servers = "\n".join(
        f"    server {name} {HOST}:{node.starttls_port} send-proxy-v2"
        " check check-send-proxy inter 300 fall 1 rise 2"
        for name, node in nodes.items()
    )
    return f"""
global
    maxconn 200

defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 2
    option redispatch

frontend submission
    bind {HOST}:{front}
    default_backend relaygate

backend relaygate
    balance roundrobin
{servers}
"""


@contextmanager
def cluster(
    pool: ServerPool,
    base: Path,
    sections: Mapping[str, Mapping[str, TomlValue]] | None = None,
) -> Iterator[Cluster]:
    haproxy = _haproxy_binary()
    redis_url = _cluster_redis_url()
    shared = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        shared.flushdb()
    finally:
        shared.close()
    cert, key = _tls_files(base / "tls")
    context = ssl.create_default_context(cafile=str(cert))
    with scratch_database() as database:
        common: dict[str, dict[str, TomlValue]] = {
            "storage": {"url": database},
            "shared": {"redis_url": redis_url},
            "tls": {"cert_file": str(cert), "key_file": str(key)},
        }
        for name, values in (sections or {}).items():
            common[name] = {**common.get(name, {}), **values}
        nodes = {
            name: pool.create(
                name, sections=common, start=False, node_name=name, proxy_trusted=["127.0.0.1/32"]
            )
            for name in NAMES
        }
        for node in nodes.values():
            node.ca_file = cert
        nodes["node-a"].cli("migrate")
        nodes["node-a"].add_user(ALICE)
        for node in nodes.values():
            node.start()
        [front] = free_ports(1)
        config = base / "haproxy.cfg"
        config.write_text(_haproxy_config(nodes, front), encoding="utf-8")
        check = subprocess.run(
            [haproxy, "-c", "-f", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        log_path = base / "haproxy.out"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [haproxy, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        result = Cluster(nodes, database, front, context, log_path, process)
        try:
            wait_until(lambda: _listening(front), 10.0, what="haproxy to listen")
            time.sleep(1.0)  # every node's first health check has passed ("rise 2", 300 ms)
            yield result
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for node in nodes.values():
                node.stop()


def _node_of(c: Cluster, queue_id: str) -> str:
    rows = c.query("SELECT node FROM messages WHERE id = %s", (queue_id,))
    assert rows, queue_id
    return str(rows[0][0])


# ------------------------------------------------------------------ the proof


def test_three_nodes_one_message_log_and_one_sending_limit(
    fresh_servers: ServerPool, tmp_path: Path
) -> None:
    """Messages through the balancer land on all three nodes and in one message
    log that any node's CLI reads; a per-account limit of N an hour, set on one
    node, refuses message N+1 whichever node takes it."""
    avoid_window_edge(3600, 60)
    with cluster(fresh_servers, tmp_path) as c:
        ids = [c.send(f"cluster message {n}") for n in range(6)]
        taken_by = Counter(_node_of(c, queue_id) for queue_id in ids)
        assert taken_by == {"node-a": 2, "node-b": 2, "node-c": 2}, taken_by
        for name in NAMES:  # every node's CLI sees the whole log
            listed = json.loads(c.nodes[name].cli("messages", "list", "--json").stdout)
            assert {m["id"] for m in listed} == set(ids), name
        # The client's address, not HAProxy's, in the log and the stored message.
        records = json.loads(c.nodes["node-c"].cli("messages", "list", "--json").stdout)
        assert {m["client_ip"] for m in records} == {"127.0.0.5"}
        # Which node took each: its Received field and its log lines say so.
        for queue_id in ids:
            raw = c.nodes["node-a"].raw(queue_id)
            assert f"(relaygate node {_node_of(c, queue_id)})".encode() in raw, raw[:400]
        for name in NAMES:
            accepted = c.nodes[name].log_events("message.accepted")
            assert accepted and {e["node"] for e in accepted} == {name}, accepted

        # A limit of 8 an hour, set on node-c: two more go, on two nodes ...
        c.nodes["node-c"].cli("user", "limits", ALICE.address, "--messages-per-hour", "8")
        time.sleep(1.5)  # the change notice reaches every node within 1 s
        more = [c.send(f"under the limit {n}") for n in range(2)]
        assert len({_node_of(c, queue_id) for queue_id in more}) == 2
        # ... and the next is refused by each node in turn (three connections).
        refusals = set()
        for n in range(3):
            with smtplib.SMTP(HOST, c.front, timeout=20, source_address=("127.0.0.5", 0)) as smtp:
                smtp.starttls(context=c.context)
                smtp.login(ALICE.address, ALICE.password)
                code, text = smtp.mail(ALICE.address)
                refusals.add((code, text.decode()[:5]))
                assert code == 451 and b"Hourly message limit (8)" in text, (n, code, text)
        assert refusals == {(451, "4.7.1")}
        assert c.query("SELECT count(*) FROM messages") == [(8,)]


def test_a_password_storm_through_the_balancer_is_throttled_as_one(
    fresh_servers: ServerPool, tmp_path: Path
) -> None:
    """Wrong passwords from one client spread over three nodes by the balancer:
    the per-IP rule (4 a minute) counts them together, so the 5th guess is
    refused unchecked whichever node gets it, and so is the right password;
    another client is untouched."""
    avoid_window_edge(60, 20)
    rules: dict[str, TomlValue] = {
        "ip_per_minute": 4,
        "ip_per_day": 0,
        "network_per_minute": 0,
        "network_per_day": 0,
        "account_per_hour": 0,
        "connection_delay_after": 0,
        "connection_close_after": 0,
    }
    with cluster(fresh_servers, tmp_path, {"auth_throttle": rules}) as c:
        replies = [c.login(f"Guess-{n}-pw-2Lk", source="127.0.0.9").status for n in range(9)]
        assert replies == [AUTH_FAILED] * 4 + [THROTTLED] * 5, replies
        for _ in range(3):  # one connection to each node
            assert c.login(ALICE.password, source="127.0.0.9").status == THROTTLED
        assert c.login(ALICE.password, source="127.0.1.9").code == 235
        throttled_on = {
            name
            for name, node in c.nodes.items()
            if any(e.get("client_ip") == "127.0.0.9" for e in node.log_events("auth.throttled"))
        }
        assert throttled_on == set(NAMES), throttled_on


def test_killing_the_node_that_holds_leases_loses_no_message(
    fresh_servers: ServerPool, tmp_path: Path
) -> None:
    """Every node delivers through one slow smarthost (3 s per message). The node
    holding delivery leases is SIGKILLed mid-delivery: the others take its rows
    over once the leases expire (lease_seconds = 10), every message reaches the
    smarthost, and a message that arrives twice is one a takeover logged. The
    killed node, restarted, rejoins and takes connections again."""
    with SMTPSink(loopback_address(), 0) as sink:
        sink.delay_reply("DATA_END", 3.0, times=None)
        sections: dict[str, dict[str, TomlValue]] = {
            "delivery": {"mode": "smarthost", "lease_seconds": 10, "retry_schedule": [1, 2]},
            "delivery.smarthost": {"host": sink.host, "port": sink.port, "tls": "none"},
        }
        with cluster(fresh_servers, tmp_path, sections) as c:
            ids = [c.send(f"lease message {n}") for n in range(9)]

            def holder() -> str | None:
                held = [n for n in c.nodes_json() if n["leases"] > 0 and n["alive"]]
                return str(max(held, key=lambda n: n["leases"])["name"]) if held else None

            wait_until(lambda: holder() is not None, 15.0, what="a node to hold leases")
            victim = holder()
            assert victim is not None
            c.nodes[victim].kill()
            survivors = [name for name in NAMES if name != victim]

            sink.wait_for_messages(len(ids), timeout=60.0)
            wait_until(
                lambda: (
                    {str(s) for (s,) in c.query("SELECT status FROM messages")} == {"delivered"}
                ),
                60.0,
                what="every message to be delivered",
            )
            subjects = Counter(str(m.message()["Subject"]) for m in sink.messages)
            assert set(subjects) == {f"lease message {n}" for n in range(9)}, subjects
            twice = {s for s, count in subjects.items() if count > 1}
            taken_over = {
                e["queue_id"]
                for name in survivors
                for e in c.nodes[name].log_events("delivery.takeover")
            }
            assert all(e_node == victim for e_node in _takeover_nodes(c, survivors)), victim
            by_subject = dict(
                c.query("SELECT subject, id FROM messages")  # one id per subject
            )
            assert {by_subject[s] for s in twice} <= taken_over, (twice, taken_over)

            # The killed node comes back and takes its share of connections again.
            c.nodes[victim].start()
            wait_until(
                lambda: any(n["name"] == victim and n["alive"] for n in c.nodes_json(survivors[0])),
                15.0,
                what="the restarted node to show as alive",
            )
            time.sleep(1.0)  # HAProxy's health check sees it up ("rise 2")
            again = [c.send(f"after restart {n}") for n in range(3)]
            assert victim in {_node_of(c, queue_id) for queue_id in again}
            sink.wait_for_messages(len(ids) + len(twice) + 3, timeout=30.0)


def _takeover_nodes(c: Cluster, survivors: list[str]) -> list[str]:
    return [
        e["held_by"] for name in survivors for e in c.nodes[name].log_events("delivery.takeover")
    ]
