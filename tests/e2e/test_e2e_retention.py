"""Captured mail to read, find and remove from the CLI, and retention in the
background, against a real server: mail goes in with smtplib, the CLI runs as
a subprocess. Runs on SQLite, and on PostgreSQL with RELAYGATE_E2E_STORAGE.
"""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY

import pytest

from .helpers import ALICE, HOST, Server, ServerPool, TomlValue, free_ports, queue_id_of, wait_until

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 4 + b"\n%%EOF\n"
INTERVAL = "0.3"  # RELAYGATE_RETENTION_INTERVAL: seconds between rounds in these tests


def submit(server: Server, message: EmailMessage | bytes, rcpt: str = "dev@example.net") -> str:
    """Send one message with smtplib over implicit TLS; its queue id."""
    with smtplib.SMTP_SSL(
        HOST, server.implicit_port, "client.test", timeout=10, context=server.client_context()
    ) as smtp:
        smtp.login(ALICE.address, ALICE.password)
        data = message if isinstance(message, bytes) else message.as_bytes(policy=SMTP_POLICY)
        smtp.mail(ALICE.address)
        smtp.rcpt(rcpt)
        code, text = smtp.data(data)
        assert code == 250, text
        return queue_id_of(text.decode())


def newsletter(tag: str) -> EmailMessage:
    """Text (quoted-printable, Latin-1), HTML, and a PDF attachment."""
    message = EmailMessage()
    message["From"] = ALICE.address
    message["To"] = "dev@example.net"
    message["Subject"] = f"Rapport été {tag}"
    message.set_content(
        f"Bonjour, voilà le rapport {tag}.\n", charset="iso-8859-1", cte="quoted-printable"
    )
    message.add_alternative(
        f"<html><body><p>Bonjour, <b>voil&agrave;</b> le rapport {tag}.</p></body></html>\n",
        subtype="html",
    )
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="rapport.pdf")
    return message


def html_only(tag: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = ALICE.address
    message["To"] = "ops@example.org"
    message["Subject"] = f"Alert {tag}"
    message.set_content(
        f"<h1>Disk full \x1b[2J{tag}</h1><p>Free <a href='https://x.test/d'>some</a> space.</p>",
        subtype="html",
    )
    return message


def plain(tag: str, subject: str) -> bytes:
    return (
        f"From: {ALICE.address}\r\nTo: dev@example.net\r\nSubject: {subject} {tag}\r\n\r\n"
        f"just text {tag}\r\n"
    ).encode()


def cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return server.cli(*args, check=False)


NOT_FOUND = 1  # a message (or its body) that is not there: a runtime error


def one_line_error(result: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("relaygate: "), result.stderr
    assert text in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def capture(servers: ServerPool) -> Server:
    return servers.create("capture", users=[ALICE])


def test_show_decodes_text_html_headers_parts_and_json(capture: Server) -> None:
    tag = uuid.uuid4().hex[:8]
    rich = submit(capture, newsletter(tag))
    alert = submit(capture, html_only(tag), rcpt="ops@example.org")

    # Ids in any case; the text part decoded from quoted-printable Latin-1.
    text = cli(capture, "messages", "show", rich.lower(), "--text")
    assert text.returncode == 0 and text.stdout == f"Bonjour, voilà le rapport {tag}.\n"
    html = cli(capture, "messages", "show", rich, "--html").stdout
    assert html.startswith("<html><body><p>Bonjour, <b>voil&agrave;</b>")
    headers = cli(capture, "messages", "show", rich, "--headers").stdout.splitlines()
    assert f"Subject: Rapport été {tag}" in headers
    assert "From: alice@example.com" in headers

    detail = json.loads(cli(capture, "messages", "show", rich, "--json").stdout)
    assert detail["id"] == rich and RFC3339.fullmatch(detail["created_at"])
    assert detail["subject"] == f"Rapport été {tag}"
    assert detail["body_removed_at"] is None and detail["history"] == []
    assert detail["text"] is True and detail["html"] is True
    assert ["Subject", f"Rapport été {tag}"] in detail["headers"]
    (pdf,) = detail["parts"]
    assert (pdf["filename"], pdf["content_type"], pdf["size"]) == (
        "rapport.pdf",
        "application/pdf",
        len(PDF),
    )
    part = subprocess.run(
        capture.command("messages", "show", rich, "--part", str(pdf["index"])),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert part.returncode == 0 and part.stdout == PDF  # the exact decoded bytes

    # No text part: the HTML as text; no escape sequence reaches the terminal.
    shown = cli(capture, "messages", "show", alert, "--text")
    assert shown.returncode == 0
    assert f"Disk full \\x1b[2J{tag}" in shown.stdout and "\x1b" not in shown.stdout
    assert "Free some <https://x.test/d> space." in shown.stdout
    assert "\x1b" not in cli(capture, "messages", "show", alert, "--html").stdout
    one_line_error(
        cli(capture, "messages", "show", alert, "--part", "7"),
        NOT_FOUND,
        f"message {alert} has no part 7 (its parts: none)",
    )
    one_line_error(
        cli(capture, "messages", "show", "NOSUCHID", "--text"), NOT_FOUND, "no such message"
    )
    bad = cli(capture, "messages", "show", rich, "--text", "--html")
    assert bad.returncode == 2 and "not allowed with" in bad.stderr


def test_search_by_sender_recipient_subject_and_time(capture: Server) -> None:
    tag = uuid.uuid4().hex[:8]
    first = submit(capture, plain(tag, "Invoice 100%"))
    second = submit(capture, plain(tag, "Welcome"), rcpt="Carol@Example.org")

    def ids(*options: str) -> list[str]:
        result = cli(capture, "messages", "search", "--json", *options)
        assert result.returncode == 0, result.stderr
        return [m["id"] for m in json.loads(result.stdout)]

    assert ids("--subject", f"invoice 100% {tag}") == [first]
    assert ids("--subject", tag, "--to", "carol@example") == [second]
    assert ids("--subject", tag, "--from", "ALICE@example.com") == [second, first]
    assert ids("--subject", tag, "--account", "alice@example.com", "--limit", "1") == [second]
    assert ids("--subject", tag, "--status", "captured") == [second, first]
    assert ids("--subject", tag, "--since", "2999-01-01") == []
    assert ids("--subject", tag, "--until", "2000-01-01T00:00:00Z") == []
    assert ids("--subject", "100_") == []  # "_" is a character, not a wildcard
    table = cli(capture, "messages", "search", "--subject", tag).stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "CREATED", "USER"] and len(table) == 3
    none = cli(capture, "messages", "search", "--subject", f"nothing-{tag}")
    assert none.stdout == "no message matches\n"
    one_line_error(cli(capture, "messages", "search", "--since", "yesterday"), 2, "--since")


def test_delete_and_prune(capture: Server) -> None:
    tag = uuid.uuid4().hex[:8]
    doomed = submit(capture, newsletter(tag))
    kept = submit(capture, plain(tag, "kept"))

    result = cli(capture, "messages", "delete", doomed.lower(), "NOSUCHID")
    assert result.returncode == 1
    assert result.stdout == f"deleted {doomed}\n"
    assert result.stderr == "relaygate: no such message: NOSUCHID\n"
    one_line_error(
        cli(capture, "messages", "show", doomed), NOT_FOUND, f"no such message: {doomed}"
    )
    assert cli(capture, "messages", "show", kept).returncode == 0

    assert cli(capture, "messages", "prune", "--older-than", "1h").stdout == (
        "removed 0 messages older than 1h\n"
    )
    time.sleep(1.1)
    pruned = cli(capture, "messages", "prune", "--older-than", "1s")
    assert pruned.returncode == 0
    assert re.fullmatch(r"removed [1-9]\d* messages? older than 1s\n", pruned.stdout)
    assert cli(capture, "messages", "search", "--subject", tag, "--json").stdout.strip() == "[]"
    usage = cli(capture, "messages", "prune", "--older-than", "30x")
    assert usage.returncode == 2 and "not a duration: '30x'" in usage.stderr
    assert "Traceback" not in usage.stderr


def _body_removed(server: Server, queue_id: str) -> bool:
    found = json.loads(cli(server, "messages", "search", "--json", "--limit", "1000").stdout)
    return any(m["id"] == queue_id and m["body_removed_at"] for m in found)


def _present(server: Server, queue_id: str) -> bool:
    return cli(server, "messages", "show", queue_id).returncode == 0


def test_background_retention_while_submission_goes_on(fresh_servers: ServerPool) -> None:
    """Two workers, no delivery process: worker 0 prunes. Bodies go after 2 s,
    records after 12 s, while mail keeps being accepted without a refusal."""
    server = fresh_servers.create(
        "retention",
        workers=2,
        users=[ALICE],
        sections={"retention": {"max_age": "12s", "body_max_age": "2s"}},
        start=False,
    )
    server.serve_env["RELAYGATE_RETENTION_INTERVAL"] = INTERVAL
    server.start()
    tag = uuid.uuid4().hex[:8]
    old = submit(server, newsletter(tag))
    accepted: list[tuple[float, str]] = []
    failures: list[str] = []
    slowest = [0.0]  # seconds, the slowest whole submission (connect, TLS, AUTH, DATA)
    stop = threading.Event()

    def sender() -> None:
        n = 0
        while not stop.is_set() and n < 2000:
            try:
                started = time.monotonic()
                accepted.append((time.time(), submit(server, plain(tag, f"load {n}"))))
                slowest[0] = max(slowest[0], time.monotonic() - started)
            except (smtplib.SMTPException, OSError, AssertionError) as exc:
                failures.append(repr(exc))
            n += 1
            time.sleep(0.02)

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        wait_until(lambda: _body_removed(server, old), 10, 0.2, "the old body removed")
        removed = cli(server, "messages", "show", old)
        assert removed.returncode == 0
        assert re.search(
            r"\(message \w+: its body was removed by retention at \S+Z\)", removed.stdout
        )
        one_line_error(
            cli(server, "messages", "show", old, "--text"),
            NOT_FOUND,
            "its body was removed by retention",
        )
        gone = json.loads(cli(server, "messages", "show", old, "--json").stdout)
        assert RFC3339.fullmatch(gone["body_removed_at"]) and gone["parts"] == []
        assert gone["headers"] == [] and gone["text"] is False
        wait_until(lambda: not _present(server, old), 20, 0.2, "the old record removed")
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(15)
    assert failures == [] and len(accepted) > 20, (failures[:3], len(accepted))
    assert slowest[0] < 5.0, slowest  # never held up behind retention (generous: a busy box)
    # What was accepted in the last max_age seconds is still there.
    listed = {
        m["id"]
        for m in json.loads(cli(server, "messages", "list", "--json", "--limit", "100000").stdout)
    }
    recent = [qid for at, qid in accepted if at > time.time() - 3]
    assert recent and set(recent) <= listed
    events = server.log_events("retention.pruned")
    assert sum(int(e["messages"]) for e in events) >= 1
    assert sum(int(e["bodies"]) for e in events) >= 1


@pytest.mark.parametrize("process", ["single", "delivery"])
def test_max_messages_keeps_the_newest(fresh_servers: ServerPool, process: str) -> None:
    """max_messages on its own, in the only process (one worker, capture, no
    HTTP) and in the delivery process (there when the HTTP listener is)."""
    sections: dict[str, dict[str, TomlValue]] = {"retention": {"max_messages": 3, "max_age": "off"}}
    if process == "delivery":
        sections["http"] = {"address": f"127.0.0.1:{free_ports(1)[0]}"}
    server = fresh_servers.create(f"count-{process}", users=[ALICE], sections=sections, start=False)
    server.serve_env["RELAYGATE_RETENTION_INTERVAL"] = INTERVAL
    server.start()
    tag = uuid.uuid4().hex[:8]
    sent = [submit(server, plain(tag, f"n{i}")) for i in range(6)]

    def kept() -> list[str]:
        return [m["id"] for m in json.loads(cli(server, "messages", "list", "--json").stdout)]

    wait_until(lambda: len(kept()) == 3, 10, 0.2, "three messages kept")
    assert kept() == list(reversed(sent[3:]))
    (event, *_) = server.log_events("retention.pruned")
    assert int(event["messages"]) >= 1


def test_times_are_rfc3339_in_json(capture: Server) -> None:
    submit(capture, plain(uuid.uuid4().hex[:8], "times"))
    (first,) = json.loads(cli(capture, "messages", "list", "--json", "--limit", "1").stdout)
    assert RFC3339.fullmatch(first["created_at"])
    assert abs(datetime.fromisoformat(first["created_at"]).timestamp() - time.time()) < 60


def test_a_removed_body_in_the_api_and_the_web_ui(fresh_servers: ServerPool) -> None:
    """body_max_age alone, pruned by the delivery process (the HTTP listener is on):
    the API and the message page say the body is gone; the record stays."""
    (port,) = free_ports(1)
    server = fresh_servers.create(
        "bodies-http",
        users=[ALICE],
        sections={
            "http": {"address": f"127.0.0.1:{port}"},
            "retention": {"max_age": "off", "max_messages": 0, "body_max_age": "1s"},
        },
        start=False,
    )
    server.serve_env["RELAYGATE_RETENTION_INTERVAL"] = INTERVAL
    server.start()
    queue_id = submit(server, newsletter(uuid.uuid4().hex[:8]))
    wait_until(lambda: _body_removed(server, queue_id), 10, 0.2, "the body removed")
    base = f"http://127.0.0.1:{port}"

    out = server.cli("token", "add", "reader", "--read-only").stdout
    token = re.findall(r"rgt_[A-Za-z0-9_-]+", out)[0]
    assert token.startswith("rgt_"), token

    def api(path: str) -> tuple[int, dict[str, object]]:
        request = urllib.request.Request(base + path)
        request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, record = api(f"/api/v1/messages/{queue_id.lower()}")
    assert status == 200 and record["id"] == queue_id
    assert RFC3339.fullmatch(str(record["body_removed_at"])) and record["headers"] == []
    for path in ("raw", "parts"):
        status, error = api(f"/api/v1/messages/{queue_id}/{path}")
        assert status == 404 and "its body was removed by retention at" in str(error["error"])

    form = urllib.parse.urlencode({"address": ALICE.address, "password": ALICE.password})
    login = urllib.request.Request(f"{base}/login", data=form.encode())

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(login, timeout=10)
        raise AssertionError("expected a 303 after logging in")
    except urllib.error.HTTPError as exc:
        assert exc.code == 303
        cookie = exc.headers["Set-Cookie"].split(";")[0]
    page = urllib.request.Request(f"{base}/messages/{queue_id.lower()}")
    page.add_header("Cookie", cookie)
    with urllib.request.urlopen(page, timeout=10) as response:
        html = response.read().decode()
    assert 'data-testid="body-removed"' in html and "removed by retention at" in html
    assert queue_id in html
    events = server.log_events("retention.pruned")
    assert events and all(e["messages"] == "0" and e["webhooks"] == "0" for e in events)


def test_retention_settings_change_with_a_reload(fresh_servers: ServerPool) -> None:
    """[retention] off, then on with `relaygate reload`: the one process
    (one capture worker) applies it from its next round, no restart."""
    server = fresh_servers.create(
        "reload",
        users=[ALICE],
        sections={"retention": {"max_age": "off", "max_messages": 0}},
        start=False,
    )
    server.serve_env["RELAYGATE_RETENTION_INTERVAL"] = INTERVAL
    server.start()
    tag = uuid.uuid4().hex[:8]
    sent = [submit(server, plain(tag, f"r{i}")) for i in range(4)]
    time.sleep(1.0)  # several rounds: nothing is removed while retention is off
    assert len(json.loads(cli(server, "messages", "list", "--json").stdout)) == 4
    pid = server.pid
    server.sections["retention"] = {"max_age": "off", "max_messages": 2}
    server.write_config()
    reloaded = cli(server, "reload")
    assert reloaded.returncode == 0, reloaded.stderr

    def kept() -> list[str]:
        return [m["id"] for m in json.loads(cli(server, "messages", "list", "--json").stdout)]

    wait_until(lambda: len(kept()) == 2, 10, 0.2, "two messages kept after the reload")
    assert kept() == list(reversed(sent[2:])) and server.pid == pid
