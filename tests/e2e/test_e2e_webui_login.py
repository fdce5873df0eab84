"""The web UI's login form without a browser: the same failed-login windows as
SMTP AUTH. (A module of its own: Playwright's sync API keeps an event loop
running in the browser modules, and PostgreSQL scratch databases need one.)"""

from __future__ import annotations

import http.client
import ssl
import urllib.error
import urllib.parse
import urllib.request

import pytest

from .helpers import ALICE, ServerPool, free_ports
from .test_e2e_webui import _post


def test_wrong_passwords_in_the_login_form_are_throttled(fresh_servers: ServerPool) -> None:
    (http_port,) = free_ports(1)
    server = fresh_servers.create(
        "webui-throttle",
        users=[ALICE],
        sections={
            "http": {"address": f"127.0.0.1:{http_port}"},
            "auth_throttle": {"ip_per_minute": 3},
        },
    )
    base = f"http://127.0.0.1:{http_port}"
    codes = [
        _post(base + "/login", f"address={ALICE.address}&password=wrong{n}".encode())
        for n in range(4)
    ]
    assert codes == [401, 401, 401, 429]
    assert (
        _post(base + "/login", f"address={ALICE.address}&password={ALICE.password}".encode()) == 429
    )
    assert [e["reason"] for e in server.log_events("ui.login_failed")][-1].startswith("too many")
    assert server.secrets_in_log([ALICE.password, "wrong0"]) == []


def test_https_listener_and_a_secure_session_cookie(fresh_servers: ServerPool) -> None:
    """[http] tls = true: HTTPS with the server's certificate; the session cookie
    is then Secure, and plain HTTP to that port gets nothing."""
    (http_port,) = free_ports(1)
    server = fresh_servers.create(
        "webui-https",
        users=[ALICE],
        sections={"http": {"address": f"127.0.0.1:{http_port}", "tls": True}},
    )
    context = ssl.create_default_context(cafile=str(server.ca_bundle()))
    form = urllib.parse.urlencode({"address": ALICE.address, "password": ALICE.password}).encode()
    request = urllib.request.Request(f"https://localhost:{http_port}/login", data=form)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), NoRedirect)
    try:
        opener.open(request, timeout=10)
        raise AssertionError("expected a 303 to the dashboard")
    except urllib.error.HTTPError as exc:
        assert exc.code == 303 and exc.headers["Location"] == "/"
        cookie = exc.headers["Set-Cookie"]
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= flags
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/login", timeout=5)
