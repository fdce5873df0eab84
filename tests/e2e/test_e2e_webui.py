"""The web UI in a real browser (Debian's Chromium driven by Playwright): log
in, watch mail sent over SMTP appear without a reload, open hostile mail and
see that nothing in it runs, manage credentials and the queue. Screenshots go
to test-artifacts/screenshots/ (the README's pictures come from there)."""

from __future__ import annotations

import base64
import email.policy
import http.server
import json
import re
import shutil
import smtplib
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Dialog, Page, expect, sync_playwright

from fakes.dns_server import FakeDNS

from .helpers import ALICE, BOB, E2E_STORAGE, Server, ServerPool, free_ports, session

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
HOSTILE_HTML = """<html><head><script>parent.document.title = "pwned-script"</script>
<style>body { background: url(http://127.0.0.1:{port}/css.gif) }</style></head>
<body><h2 id="mail-heading">Order #123 confirmed</h2>
<img src="http://127.0.0.1:{port}/pixel.gif" alt="tracker">
<img src="x" onerror="parent.document.title = 'pwned-onerror'">
<a id="js-link" href="javascript:parent.document.title='pwned-link'">click me</a>
<svg onload="parent.document.title='pwned-svg'"><circle r="5"/></svg>
<iframe src="javascript:parent.document.title='pwned-iframe'"></iframe>
<form action="http://127.0.0.1:{port}/steal"><input name="x"><button>go</button></form>
</body></html>"""
HOSTILE_SUBJECT = (
    '<script>document.title="pwned-subject"</script><img src=x onerror=alert(1)> Ünïcödé '
    + "W" * 300
)


REALISTIC = [
    ("Reset your password", None),
    (
        "Your order #10231 has shipped",
        "<h2>Good news!</h2><p>Your order <b>#10231</b> is on its way.</p>"
        "<table><tr><td>1 x Espresso beans, 1 kg</td><td>EUR 24.90</td></tr></table>",
    ),
    (
        "Welcome to Example Shop",
        "<p>Thanks for signing up. <a href='https://shop.example'>Shop now</a></p>",
    ),
]


class PixelServer:
    """A remote image host (on 127.0.0.1): counts what a browser fetched."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.posts: list[tuple[dict[str, str], bytes]] = []
        hits = self.paths
        posts = self.posts

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.end_headers()
                self.wfile.write(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")

            def do_POST(self) -> None:  # a webhook receiver
                length = int(self.headers.get("Content-Length", "0"))
                posts.append((dict(self.headers.items()), self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDNS]:
    with FakeDNS() as server:
        yield server


@pytest.fixture(scope="module")
def ui(servers: ServerPool, dns: FakeDNS) -> Iterator[tuple[Server, str]]:
    http_port, refusing = free_ports(2)
    server = servers.create(
        "webui",
        users=[ALICE, BOB],
        sections={
            "http": {"address": f"127.0.0.1:{http_port}", "allow_private_targets": True},
            # Onward delivery to a port nobody listens on: mail waits in the queue.
            "delivery": {"mode": "smarthost", "retry_schedule": [3600], "resolvers": [dns.address]},
            "delivery.smarthost": {"host": "127.0.0.1", "port": refusing, "tls": "none"},
        },
    )
    server.cli("user", "admin", ALICE.address, "on")
    for subject, html in REALISTIC:  # what a web team's log looks like (screenshots)
        _send(server, subject, html)
    yield server, f"http://127.0.0.1:{http_port}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], headless=True
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(15_000)
    dialogs: list[str] = []  # anything but our own confirm() questions is a finding

    def answer(dialog: Dialog) -> None:
        if dialog.type == "confirm":
            dialog.accept()
        else:
            dialogs.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

    opened.on("dialog", answer)
    opened.dialogs = dialogs  # type: ignore[attr-defined]
    yield opened
    context.close()


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _log_in(page: Page, base: str, address: str, password: str) -> None:
    page.goto(base + "/")
    expect(page).to_have_url(re.compile(r"/login\?next=/$"))
    page.fill("input[name=address]", address)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Dashboard")


def _send(server: Server, subject: str, html: str | None = None, attachment: str = "") -> str:
    message = EmailMessage()
    message["From"] = ALICE.address
    message["To"] = "someone@example.net"
    message["Subject"] = subject
    message.set_content("The plain text body.\n")
    if html is not None:
        message.add_alternative(html, subtype="html")
    if attachment:
        message.add_attachment(
            b"%PDF-1.4 not really", maintype="application", subtype="pdf", filename=attachment
        )
    with session(server, user=ALICE) as client:
        return client.send_mail(
            ALICE.address, ["someone@example.net"], message.as_bytes(policy=email.policy.SMTP)
        )


def test_log_in_watch_mail_arrive_and_open_it_safely(ui: tuple[Server, str], page: Page) -> None:
    server, base = ui
    pixels = PixelServer()
    try:
        _log_in(page, base, ALICE.address, ALICE.password)
        _shot(page, "dashboard")
        page.click("nav >> text=Messages")
        expect(page.locator("#live")).to_have_class(re.compile("on"), timeout=10_000)
        queue_id = _send(
            server,
            HOSTILE_SUBJECT,
            HOSTILE_HTML.replace("{port}", str(pixels.port)),
            attachment='<img src=x onerror=alert(1)>"; evil.html',
        )
        row = page.locator(f'tr[data-id="{queue_id}"]')
        expect(row).to_be_visible(timeout=10_000)  # no reload: the page polled it in
        expect(row.locator("td.subject")).to_contain_text("<script>")  # shown as text
        # The poll's RFC 3339 time, shown as on the server-rendered rows.
        expect(row.locator("td").first).to_have_text(
            re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$")
        )
        _shot(page, "messages")
        row.locator("a").click()
        expect(page.locator("h1.subject")).to_contain_text("<img src=x onerror=alert(1)>")
        frame_element = page.locator("iframe.mail")
        assert frame_element.get_attribute("sandbox") == ""
        frame = page.frame_locator("iframe.mail")
        expect(frame.locator("#mail-heading")).to_have_text("Order #123 confirmed")
        expect(page.get_by_test_id("images-blocked")).to_be_visible()
        frame.locator("#js-link").click()
        page.wait_for_timeout(500)
        _shot(page, "message")
        assert not page.title().startswith("pwned"), page.title()
        assert page.dialogs == []  # type: ignore[attr-defined]
        assert pixels.paths == []  # the tracker learned nothing
        attachment = page.locator("ul.attachments a")
        expect(attachment).to_have_text('<img src=x onerror=alert(1)>"; evil.html')
        with page.expect_download() as download:
            attachment.click()
        assert download.value.suggested_filename.endswith("evil.html")
        page.click("text=Show them")
        expect(frame.locator("#mail-heading")).to_be_visible()
        for _ in range(50):  # the frame reloads with images allowed
            if "/pixel.gif" in pixels.paths:
                break
            page.wait_for_timeout(100)
        assert "/pixel.gif" in pixels.paths, pixels.paths
        assert not page.title().startswith("pwned"), page.title()
        page.click("nav.tabs >> text=Headers")
        expect(page.locator("table.headers")).to_contain_text("Subject")
        page.click("nav.tabs >> text=Source")
        expect(page.locator("pre.raw")).to_contain_text("Content-Type: multipart")
        assert page.dialogs == []  # type: ignore[attr-defined]
        page.goto(f"{base}/messages/{queue_id.lower()}")  # an id in any case
        expect(page.locator("h1.subject")).to_contain_text("<img src=x onerror=alert(1)>")
        # Opened on its own (a link, a new tab), the HTML still runs nothing:
        # its CSP carries "sandbox" and no script-src.
        page.goto(f"{base}/messages/{queue_id}/html")
        expect(page.locator("#mail-heading")).to_have_text("Order #123 confirmed")
        page.locator("#js-link").click()
        page.wait_for_timeout(300)
        assert page.evaluate("document.title") == ""
        assert page.dialogs == []  # type: ignore[attr-defined]
        assert pixels.paths.count("/pixel.gif") == 1  # blocked again without ?images=1
    finally:
        pixels.close()


def test_an_account_manages_its_own_credentials(ui: tuple[Server, str], page: Page) -> None:
    server, base = ui
    _log_in(page, base, BOB.address, BOB.password)
    expect(page.locator("nav")).not_to_contain_text("Queue")  # not an admin
    page.click("nav >> text=Credentials")
    page.fill("input[name=name]", "laptop")
    page.click("text=Create credential")
    secret = page.get_by_test_id("new-secret").inner_text()
    assert secret.startswith("rgc_")
    _shot(page, "credentials")
    with smtplib.SMTP_SSL("127.0.0.1", server.implicit_port, context=server.client_context()) as c:
        c.login(BOB.address, secret)
    page.locator('tr[data-name="laptop"] button:has-text("Revoke")').click()
    expect(page.locator('tr[data-name="laptop"] .status')).to_have_text("revoked")
    with (
        pytest.raises(smtplib.SMTPAuthenticationError),
        smtplib.SMTP_SSL("127.0.0.1", server.implicit_port, context=server.client_context()) as c,
    ):
        c.login(BOB.address, secret)
    changes = server.log_events("admin.change")
    assert {"credential.create", "credential.revoke"} <= {e["action"] for e in changes}
    assert all(e["by"] == f"account:{BOB.address}" for e in changes if e.get("name") == "laptop")
    assert server.secrets_in_log([secret]) == []


def test_others_mail_and_admin_pages_are_closed_to_non_admins(
    ui: tuple[Server, str], page: Page
) -> None:
    server, base = ui
    queue_id = _send(server, "alice's private mail")
    _log_in(page, base, BOB.address, BOB.password)
    response = page.goto(f"{base}/messages/{queue_id}")
    assert response is not None and response.status == 404
    for path in ("/queue", "/accounts", "/dkim"):
        response = page.goto(base + path)
        assert response is not None and response.status == 403, path
    page.goto(base + "/messages")
    expect(page.locator(f'tr[data-id="{queue_id}"]')).to_have_count(0)


def test_retry_a_queued_message(ui: tuple[Server, str], page: Page) -> None:
    server, base = ui
    queue_id = _send(server, "waits in the queue")
    _log_in(page, base, ALICE.address, ALICE.password)
    page.goto(base + "/queue")
    row = page.locator(f'tr[data-id="{queue_id}"]')
    expect(row).to_be_visible()
    attempts = int(row.locator("td").nth(4).inner_text())
    row.locator('button:has-text("Retry")').click()
    for _ in range(100):  # the delivery process tries again within seconds
        page.goto(base + "/queue")
        if int(page.locator(f'tr[data-id="{queue_id}"] td').nth(4).inner_text()) > attempts:
            break
        page.wait_for_timeout(200)
    assert int(page.locator(f'tr[data-id="{queue_id}"] td').nth(4).inner_text()) > attempts
    _shot(page, "queue")
    page.locator(f'tr[data-id="{queue_id}"] button:has-text("Delete")').click()
    expect(page.locator(f'tr[data-id="{queue_id}"]')).to_have_count(0)
    assert any(e["action"] == "queue.delete" for e in server.log_events("admin.change"))


def _post(url: str, data: bytes, cookie: str = "", origin: str | None = None) -> int:
    request = urllib.request.Request(url, data=data, method="POST")
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    if cookie:
        request.add_header("Cookie", cookie)
    if origin:
        request.add_header("Origin", origin)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_forms_need_the_csrf_token_and_our_origin(ui: tuple[Server, str], page: Page) -> None:
    server, base = ui
    _log_in(page, base, ALICE.address, ALICE.password)
    cookies = page.context.cookies()
    (session_cookie,) = [c for c in cookies if c["name"] == "relaygate_session"]
    assert session_cookie["httpOnly"] and session_cookie["sameSite"] == "Strict"
    cookie = f"relaygate_session={session_cookie['value']}"
    body = b"action=add&address=mallory%40example.com"
    assert _post(base + "/accounts/action", body, cookie) == 403  # no token
    assert _post(base + "/accounts/action", body + b"&csrf=forged", cookie) == 403
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    assert csrf
    assert (
        _post(
            base + "/accounts/action", body + f"&csrf={csrf}".encode(), cookie, "http://evil.test"
        )
        == 403
    )
    assert _post(base + "/logout", b"", "") == 401
    assert "mallory@example.com" not in server.cli("user", "list").stdout


def test_app_credentials_cannot_log_in_to_the_ui(ui: tuple[Server, str]) -> None:
    server, base = ui
    out = server.cli("credential", "add", BOB.address, "--name", "ci").stdout
    secret = re.search(r"rgc_\S+", out)
    assert secret is not None
    status = _post(base + "/login", f"address={BOB.address}&password={secret.group(0)}".encode())
    assert status == 401


def test_dkim_keys_and_whether_dns_publishes_them(
    ui: tuple[Server, str], dns: FakeDNS, page: Page
) -> None:
    _, base = ui
    _log_in(page, base, ALICE.address, ALICE.password)
    page.click("nav >> text=DKIM")
    page.fill("input[name=domain]", "shop.example")
    page.click("text=Generate key")
    key = page.locator('section.key[data-domain="shop.example"]')
    expect(key.locator(".status")).to_have_text("not in DNS yet")
    record = key.locator("pre.raw").inner_text()  # name IN TXT "v=DKIM1; ..." "..."
    value = "".join(re.findall(r'"([^"]*)"', record))
    assert value.startswith("v=DKIM1; k=rsa; p=")
    dns.add_txt("relaygate._domainkey.shop.example", value)
    page.goto(base + "/dkim")
    expect(key.locator(".status")).to_have_text("published in DNS")
    _shot(page, "dkim")
    page.fill("input[name=domain]", "other.example")
    page.click("text=Generate key")
    dns.add_txt("relaygate._domainkey.other.example", "v=DKIM1; k=rsa; p=QUJD")
    page.goto(base + "/dkim")
    other = page.locator('section.key[data-domain="other.example"]')
    expect(other.locator(".status")).to_have_text("DNS has another key")
    page.fill("input[name=domain]", "not a domain!")
    page.click("text=Generate key")
    expect(page.locator(".error")).to_contain_text("invalid domain")


PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def test_inline_cid_images_show_without_asking(ui: tuple[Server, str], page: Page) -> None:
    """A logo sent with the message (multipart/related, cid:) is part of it:
    shown at once, while remote images still wait for the reader."""
    server, base = ui
    message = EmailMessage()
    message["From"] = ALICE.address
    message["To"] = "someone@example.net"
    message["Subject"] = "Newsletter with a logo"
    message.set_content("Text version.\n")
    message.add_alternative(
        '<p><img id="logo" src="cid:logo@shop.example"> Example Shop</p>', subtype="html"
    )
    html_part = message.get_body(("html",))
    assert isinstance(html_part, EmailMessage)
    html_part.add_related(PNG_1X1, "image", "png", cid="<logo@shop.example>")
    with session(server, user=ALICE) as client:
        queue_id = client.send_mail(
            ALICE.address, ["someone@example.net"], message.as_bytes(policy=email.policy.SMTP)
        )
    _log_in(page, base, ALICE.address, ALICE.password)
    page.goto(f"{base}/messages/{queue_id}")
    logo = page.frame_locator("iframe.mail").locator("#logo")
    expect(logo).to_be_visible()
    assert logo.evaluate("image => image.naturalWidth") == 1
    expect(page.get_by_test_id("images-blocked")).to_have_count(0)


def test_dashboard_charts_the_hourly_stats(ui: tuple[Server, str], page: Page) -> None:
    """Admins see the server's hours (accepted, delivered, ..., failed logins) as
    bars; the stats reach storage within seconds (flushed every 10 s)."""
    server, base = ui
    with (
        pytest.raises(smtplib.SMTPAuthenticationError),
        smtplib.SMTP_SSL("127.0.0.1", server.implicit_port, context=server.client_context()) as c,
    ):
        c.login(BOB.address, "not-the-password")
    _log_in(page, base, ALICE.address, ALICE.password)
    charts = page.get_by_test_id("charts")
    accepted = charts.locator("figure", has_text="Accepted").locator("strong")
    failed = charts.locator("figure", has_text="Failed logins").locator("strong")
    for _ in range(40):  # up to 20 s: one flush period and a margin
        if int(accepted.inner_text()) >= len(REALISTIC) and int(failed.inner_text()) >= 1:
            break
        page.wait_for_timeout(500)
        page.goto(base + "/")
    assert int(accepted.inner_text()) >= len(REALISTIC)
    assert int(failed.inner_text()) >= 1
    assert charts.locator("svg.bars rect").count() == 6 * 24
    _shot(page, "dashboard")
    page.click("text=last 7 days")
    expect(charts.locator("svg.bars").first.locator("rect")).to_have_count(7 * 24)
    # Not an admin: no server-wide charts.
    page.context.clear_cookies()
    _log_in(page, base, BOB.address, BOB.password)
    expect(page.get_by_test_id("charts")).to_have_count(0)


def test_message_log_search_and_status_filter(ui: tuple[Server, str], page: Page) -> None:
    _, base = ui
    _log_in(page, base, ALICE.address, ALICE.password)
    page.goto(base + "/messages")
    page.fill("input[name=q]", "SHIPPED")
    page.click("text=Filter")
    rows = page.locator("#message-table tbody tr[data-id]")
    expect(rows).to_have_count(1)
    expect(rows.first.locator("td.subject")).to_have_text("Your order #10231 has shipped")
    page.goto(base + "/messages?status=delivered")
    expect(rows).to_have_count(0)
    expect(page.locator("tr.empty")).to_be_visible()
    page.goto(base + "/messages?q=" + "%25_%5C" * 50)  # LIKE wildcards are text here
    expect(rows).to_have_count(0)


def test_webhooks_page_adds_tests_and_shows_attempts(ui: tuple[Server, str], page: Page) -> None:
    server, base = ui
    receiver = PixelServer()
    try:
        _log_in(page, base, ALICE.address, ALICE.password)
        page.click("nav >> text=Webhooks")
        page.fill("input[name=url]", f"http://127.0.0.1:{receiver.port}/hook")
        page.check("input[name='event-message.delivered']")
        page.click("text=Add webhook")
        secret = page.get_by_test_id("new-webhook-secret").inner_text()
        assert secret.startswith("whsec_")
        section = page.locator("section.webhook", has_text=f"127.0.0.1:{receiver.port}/hook")
        expect(section).to_contain_text("Events: message.delivered")
        section.locator("button", has_text="Send a test event").click()
        expect(page.locator(".notice")).to_contain_text("A test event")
        for _ in range(60):  # the delivery process's sender polls twice a second
            if receiver.posts:
                break
            page.wait_for_timeout(250)
        headers, body = receiver.posts[0]
        assert json.loads(body)["type"] == "webhook.test"
        assert headers["webhook-signature"].startswith("v1,")
        page.goto(base + "/webhooks")
        expect(section.locator("table.attempts")).to_contain_text("delivered", timeout=10_000)
        _shot(page, "webhooks")
        section.locator("button", has_text="Remove").click()
        expect(section).to_have_count(0)
        page.fill("input[name=url]", "ftp://example.com/x")
        page.click("text=Add webhook")
        expect(page.locator(".error")).to_be_visible()
        actions = [e["action"] for e in server.log_events("admin.change")]
        assert {"webhook.add", "webhook.test", "webhook.remove"} <= set(actions)
        assert server.secrets_in_log([secret]) == []
    finally:
        receiver.close()


def test_admin_adds_an_account_and_edits_it(ui: tuple[Server, str], page: Page) -> None:
    """What `relaygate user add/senders/limits/passwd` do, from the accounts page."""
    server, base = ui
    _log_in(page, base, ALICE.address, ALICE.password)
    page.click("nav >> text=Accounts")
    page.fill("input[name=address]", "Shop@Example.com")
    page.click("text=Add account")
    first = page.get_by_test_id("new-password").inner_text()
    page.click("a:has-text('Shop@example.com')")
    expect(page.locator("h1")).to_have_text("Shop@example.com")
    page.fill("input[name=senders]", "shop@example.com @shop.example")
    page.click("text=Save senders")
    expect(page.locator("input[name=senders]")).to_have_value("@shop.example shop@example.com")
    page.fill("input[name=messages_per_hour]", "25")
    page.click("text=Save limits")
    expect(page.locator("input[name=messages_per_hour]")).to_have_value("25")
    page.fill("input[name=messages_per_day]", "lots")
    page.click("text=Save limits")
    expect(page.locator(".error")).to_contain_text("messages_per_day: give a whole number")
    page.click("text=Set a new generated password")
    second = page.get_by_test_id("new-password").inner_text()
    assert second != first
    listed = {a["address"]: a for a in json.loads(server.cli("user", "list", "--json").stdout)}
    shop = listed["Shop@example.com"]
    assert shop["senders"] == ["@shop.example", "shop@example.com"]
    assert shop["limits"] == {"messages_per_hour": 25}
    with smtplib.SMTP_SSL("127.0.0.1", server.implicit_port, context=server.client_context()) as c:
        c.login("shop@example.com", second)
    assert server.secrets_in_log([first, second]) == []


def test_api_tokens_made_in_the_ui_work_and_revoke(ui: tuple[Server, str], page: Page) -> None:
    _, base = ui
    _log_in(page, base, ALICE.address, ALICE.password)
    page.click("nav >> text=API tokens")
    page.fill("input[name=name]", "from-the-ui")
    page.check("input[name=read_only]")
    page.click("text=Create token")
    token = page.get_by_test_id("new-token").inner_text()
    request = urllib.request.Request(f"{base}/api/v1/messages?limit=1")
    request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    page.locator('tr[data-name="from-the-ui"] button:has-text("Revoke")').click()
    expect(page.locator('tr[data-name="from-the-ui"]')).to_have_count(0)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    page.fill("input[name=name]", "bad name!")
    page.click("text=Create token")
    expect(page.locator(".error")).to_contain_text("invalid token name")


def test_credential_limits_and_the_nodes_page(ui: tuple[Server, str], page: Page) -> None:
    server, base = ui
    out = server.cli("credential", "add", BOB.address, "--name", "limited").stdout
    assert "rgc_" in out
    _log_in(page, base, BOB.address, BOB.password)
    page.goto(base + "/credentials")
    row = page.locator('tr[data-name="limited"]')
    row.locator("summary").click()
    row.locator("input[name=messages_per_day]").fill("40")
    row.locator("button", has_text="Save limits").click()
    expect(page.locator('tr[data-name="limited"] summary')).to_have_text("messages per day 40")
    listed = json.loads(server.cli("credential", "list", BOB.address, "--json").stdout)
    assert next(c for c in listed if c["name"] == "limited")["limits"] == {"messages_per_day": 40}
    response = page.goto(base + "/nodes")  # admins only
    assert response is not None and response.status == 403
    page.context.clear_cookies()
    _log_in(page, base, ALICE.address, ALICE.password)
    page.goto(base + "/nodes")
    if E2E_STORAGE == "postgresql":
        expect(page.locator("tr[data-node] .status").first).to_have_text("up")
    else:
        expect(page.locator("main")).to_contain_text("One machine")
