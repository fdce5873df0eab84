"""The web UI's login form without a browser: the same failed-login windows as
SMTP AUTH. (A module of its own: Playwright's sync API keeps an event loop
running in the browser modules, and PostgreSQL scratch databases need one.)"""

from __future__ import annotations

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
