"""What every HTTP route works with, made once when the HTTP process starts."""

from __future__ import annotations

from dataclasses import dataclass

from relaygate.config import Config
from relaygate.services.admin import AdminServices
from relaygate.services.login import LoginService
from relaygate.services.web_login import WebLogin
from relaygate.storage.api import LoginFailures


@dataclass
class HttpContext:
    config: Config
    admin: AdminServices  # the admin use cases, as the CLI has them
    logins: LoginService  # account password logins (web UI), SMTP's throttles
    failures: LoginFailures  # failed-login windows, shared with SMTP AUTH
    web: WebLogin  # web UI logins and sessions


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request: an API token or a logged-in account (web UI)."""

    kind: str  # "token" | "account"
    name: str  # the token's name, or the account's address
    read_only: bool = False
    admin: bool = True  # False: an account that sees only its own

    @property
    def who(self) -> str:
        """As logs name it: token=NAME or account=ADDRESS."""
        return f"{self.kind}:{self.name}"
