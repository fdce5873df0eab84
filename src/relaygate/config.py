"""Configuration: one TOML file, validated on load.

Every problem is reported as one line (``ConfigError.problems``) so an admin
sees all of them at once. No file at all means quickstart mode: loopback
listeners, self-signed TLS, capture delivery, data in ./relaygate-data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from relaygate.durations import parse_duration
from relaygate.smtp.address import AddressSyntaxError, check_mailbox
from relaygate.webhooks.events import EVENTS
from relaygate.webhooks.signing import SecretError, secret_key
from relaygate.webhooks.targets import TargetError, check_url

TLSMode = Literal["starttls", "implicit", "none"]
DeliveryMode = Literal["capture", "smarthost", "mx"]
BounceTo = Literal["sender", "capture"]

ENV_VAR = "RELAYGATE_CONFIG"


class ConfigError(Exception):
    """Raised with every problem found, one human-readable line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ListenerConfig:
    host: str
    port: int
    tls: TLSMode = "starttls"
    # A PROXY protocol header (v1 or v2) comes first, from one of these networks only.
    proxy_protocol: bool = False
    proxy_trusted: tuple[str, ...] = ()  # CIDRs, normalised
    # A development port: AUTH PLAIN/LOGIN without TLS. Only with tls = "none" on a
    # loopback address (config loading refuses it anywhere else).
    allow_plaintext_auth: bool = False

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or "localhost": addresses no other machine can reach."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback if address.version == 4 else address == ipaddress.ip_address("::1")


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class PasswordHashConfig:
    """argon2id parameters; defaults are OWASP's minimum (m=19 MiB, t=2, p=1)."""

    memory_kib: int = 19456
    time_cost: int = 2
    parallelism: int = 1


@dataclass(frozen=True)
class LimitsConfig:
    max_message_size: int = 26214400
    max_recipients: int = 100
    max_bad_commands: int = 10
    max_connections: int = 1000  # per worker process
    max_commands_before_login: int = 50  # command lines before AUTH succeeds; 0 = no cap
    max_messages_per_session: int = 1000  # then 421 at MAIL: reconnect for more; 0 = no cap
    max_session_duration: float = 3600.0  # seconds a connection may last, however busy
    idle_timeout: float = 300.0  # no bytes from the client at all
    command_timeout: float = 60.0  # one command line, from its first byte to its end
    tls_handshake_timeout: float = 15.0  # a handshake holds memory before any limit sees it
    data_timeout: float = 600.0  # one whole message body (DATA or all BDAT chunks)
    shutdown_grace: float = 10.0  # SIGTERM: how long transactions in flight may finish


@dataclass(frozen=True)
class AuthThrottleConfig:
    """Failed-login limits (``relaygate.throttle``); a count of 0 turns that rule off.

    A "network" is the client's IPv4 /24 or IPv6 /64. The account rule spares
    networks the account logged in from lately, so guessing cannot lock out the owner.
    """

    ip_per_minute: int = 10
    ip_per_day: int = 100
    network_per_minute: int = 30
    network_per_day: int = 300
    account_per_hour: int = 20  # failures against one user name, from any network
    known_network_days: int = 30  # a login exempts its network this long (>= 1: 0 = lockouts)
    # Failures (on one connection, or from one address in the last minute) answered
    # at once; each later failure reply is held delay_seconds, doubling, up to
    # max_delay. A throttled reply is held up to max_delay too. 0 = no delays.
    connection_delay_after: int = 1
    connection_close_after: int = 5  # failures on one connection before it is closed
    delay_seconds: float = 1.0
    max_delay: float = 30.0


@dataclass(frozen=True)
class SendingLimits:
    """Per-account sending limits (``relaygate.quotas``); 0 means unlimited.

    Fixed UTC windows: the hour and the day. "New" recipients are addresses the
    account never sent to before; a stolen password shows up as many of those.
    """

    messages_per_hour: int = 200
    messages_per_day: int = 1000
    recipients_per_day: int = 2000
    new_recipients_per_day: int = 300


# Capture mode keeps every message on this machine, so a stolen password cannot
# spam anyone: without an explicit [sending_limits] there are no default limits
# there (a developer's test run would otherwise hit 200 an hour). Limits set with
# `relaygate user limits` / `credential limits` apply in every mode.
NO_SENDING_LIMITS = SendingLimits(0, 0, 0, 0)


@dataclass(frozen=True)
class ConnectionLimitsConfig:
    """Per-client-IP connection limits across all workers; 0 means unlimited."""

    per_ip_concurrent: int = 50
    per_ip_per_minute: int = 600
    exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")  # CIDRs never limited


@dataclass(frozen=True)
class SmarthostConfig:
    """An upstream relay: SES, Mailgun, a corporate gateway."""

    host: str
    port: int = 587
    tls: TLSMode = "starttls"
    username: str | None = None
    password_file: Path | None = None
    verify_certificate: bool = True
    # A PEM file of CA certificates: this smarthost's certificate must chain to one
    # of them (instead of the system's CAs). None: the system's trust store.
    ca_file: Path | None = None


@dataclass(frozen=True)
class RouteConfig:
    """Mail for ``domain`` goes through this smarthost, whatever the mode."""

    domain: str
    smarthost: SmarthostConfig


DEFAULT_RETRY_SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)


MIN_LEASE_SECONDS = 10.0  # shorter, and a slow remote's reply could outlast a lease


@dataclass(frozen=True)
class DeliveryConfig:
    mode: DeliveryMode = "capture"
    smarthost: SmarthostConfig | None = None
    routes: tuple[RouteConfig, ...] = ()
    resolvers: tuple[tuple[str, int], ...] = ()  # () = the system's
    mx_port: int = 25
    tls_policy: tuple[tuple[str, str], ...] = ()  # (domain, "required" | "opportunistic")
    # Waits after the 1st, 2nd, ... failed attempt; the last repeats (Postfix-like
    # minimal/maximal backoff, 1 minute to 4 hours), each with +-20% jitter.
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    max_age: float = 5 * 86400.0  # then give up and bounce
    delay_warning_after: float = 4 * 3600.0  # 0 = never warn
    concurrency: int = 20  # outbound connections in all
    per_destination: int = 2  # connections to one destination
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    mta_sts: bool = True  # RFC 8461 policies for MX delivery
    mta_sts_port: int = 443  # HTTPS port of mta-sts.<domain> (tests use another)
    # MX-resolved addresses that are loopback/private/link-local/...: refused unless true.
    allow_private_targets: bool = False
    # Seconds one attempt may spend on DNS and on connecting across a destination's hosts.
    destination_timeout: float = 60.0
    # On a shared database: how long a node's claim on a row lasts unless renewed
    # (a killed node's rows go to another node after this).
    lease_seconds: float = 120.0
    # Where bounces and delay warnings go: "sender" delivers them (smarthost or MX,
    # routes apply) to the original envelope sender; "capture" keeps those for a
    # local account in the message log. The loader's default follows the mode:
    # "capture" in capture mode, else "sender".
    bounce_to: BounceTo = "capture"

    def route_for(self, domain: str) -> SmarthostConfig | None:
        """The smarthost for ``domain`` (a route, else the mode's), None = its MX."""
        domain = domain.lower()
        for route in self.routes:
            if route.domain == domain:
                return route.smarthost
        return self.smarthost if self.mode == "smarthost" else None

    def tls_required(self, domain: str) -> bool:
        return dict(self.tls_policy).get(domain.lower()) == "required"


def default_node_name() -> str:
    """This machine's short host name: unique per node in a usual cluster."""
    return socket.gethostname().split(".")[0] or "relaygate"


@dataclass(frozen=True)
class StorageConfig:
    """Where accounts, messages and the queue live: SQLite in data_dir, or PostgreSQL."""

    url: str | None = None  # postgresql://...; None: the embedded SQLite database
    pool_size: int = 10  # connections per process to PostgreSQL

    @property
    def backend(self) -> Literal["sqlite", "postgresql"]:
        return "sqlite" if self.url is None else "postgresql"


@dataclass(frozen=True)
class SharedConfig:
    """Short-lived state shared by nodes (throttles, connection counts, invalidation)."""

    redis_url: str | None = None  # redis://...; None: kept per node


@dataclass(frozen=True)
class HTTPConfig:
    """The admin API, web UI and metrics listener ([http]); absent: none, except in
    quickstart mode (127.0.0.1:8025)."""

    host: str = "127.0.0.1"
    port: int = 8025
    tls: bool = False  # HTTPS with the [tls] certificate (or the self-signed pair)
    public_url: str | None = None  # for links in webhooks and e-mails
    metrics: bool = True  # GET /metrics
    metrics_token_file: Path | None = None  # set: /metrics wants "Authorization: Bearer <it>"
    allow_private_targets: bool = False  # webhooks to loopback / private addresses

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """Where a person points a browser: public_url, else from the address."""
        if self.public_url is not None:
            return self.public_url.rstrip("/")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{shown}:{self.port}"


@dataclass(frozen=True)
class WebhookConfig:
    """A [[webhooks]] entry: read-only in the API (``"source": "config"``)."""

    url: str
    events: tuple[str, ...]  # empty: every event
    secret_file: Path  # holds whsec_<base64>

    @property
    def id(self) -> str:
        """Stable while the URL stays: outbox rows and attempts are filed under it."""
        return "cfg_" + hashlib.sha256(self.url.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RetentionConfig:
    """How long captured and delivered mail is kept (services/retention.py).
    None / 0: no limit of that kind."""

    max_age: int | None = 30 * 86400  # seconds a message's record is kept
    max_messages: int = 100_000  # records kept at most, the newest
    body_max_age: int | None = None  # seconds a body is kept; None: as long as its record


# --------------------------------------------------------------------- [oauth]
# OAUTHBEARER / XOAUTH2 logins (relaygate/oauth/, docs/identity.md): one block,
# so a merge with other sections stays simple.

# JWS algorithms a token may use. A JWKS holds public keys: HS* (shared secrets)
# and "none" can never be allowed.
OAUTH_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")
OAUTH_MAX_LEEWAY = 300.0


@dataclass(frozen=True)
class OAuthConfig:
    """[oauth]: who issues the tokens, for whom, and where its public keys are."""

    issuer: str  # the token's "iss", exactly
    audience: tuple[str, ...]  # the token's "aud" must name one of these
    jwks_url: str | None = None  # https:// (http:// on loopback only); or jwks_file
    jwks_file: Path | None = None  # re-read when it changes
    address_claim: str = "email"  # the claim naming the relaygate account
    algorithms: tuple[str, ...] = ("RS256", "ES256", "PS256", "EdDSA")
    leeway: float = 60.0  # seconds of clock skew allowed for exp / nbf / iat
    jwks_refresh: float = 3600.0  # seconds between routine re-fetches of jwks_url
    jwks_min_interval: float = 30.0  # seconds at least between fetches for unknown kids
    scope: str | None = None  # "scope" in the RFC 7628 error challenge, if any


def _oauth(check: _Checker, data: dict[str, Any], base: Path) -> OAuthConfig | None:
    if "oauth" not in data:
        return None
    where = "oauth"
    raw = check.table(data, where, where)
    fields = {f.name for f in dataclasses.fields(OAuthConfig)}
    check.unknown(raw, fields, where)
    issuer = ""
    if "issuer" not in raw:
        check.problem(f"{where}.issuer", "is required (the tokens' iss claim)")
    else:
        issuer = check.string(raw, "issuer", where, "")
    audience_raw = raw.get("audience")
    if isinstance(audience_raw, str) and audience_raw:
        audience: tuple[str, ...] = (audience_raw,)
    elif (
        isinstance(audience_raw, list)
        and audience_raw
        and all(isinstance(a, str) and a for a in audience_raw)
    ):
        audience = tuple(audience_raw)
    else:
        check.problem(
            f"{where}.audience", f"must be a string or a list of strings (got {audience_raw!r})"
        )
        audience = ()
    jwks_url = _url(raw, "jwks_url", where, ("https", "http"), check)
    if jwks_url is not None and jwks_url.lower().startswith("http://"):
        host = jwks_url[len("http://") :].partition("/")[0].rpartition("@")[2]
        host = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
        if not is_loopback_host(host):
            check.problem(f"{where}.jwks_url", "must be https:// (http:// only on loopback)")
    jwks_file = check.path(raw, "jwks_file", where, base, readable=True)
    if "jwks_url" not in raw and "jwks_file" not in raw:
        check.problem(where, "needs jwks_url or jwks_file (one of them)")
    elif "jwks_url" in raw and "jwks_file" in raw:
        check.problem(where, "jwks_url and jwks_file: give one, not both")
    algorithms_raw = raw.get("algorithms", list(OAuthConfig.algorithms))
    algorithms: tuple[str, ...] = OAuthConfig.algorithms
    if not isinstance(algorithms_raw, list) or not algorithms_raw:
        check.problem(f"{where}.algorithms", f"must be a non-empty list (got {algorithms_raw!r})")
    else:
        wrong = [a for a in algorithms_raw if a not in OAUTH_ALGORITHMS]
        if wrong:
            check.problem(
                f"{where}.algorithms",
                f"{wrong[0]!r} is not allowed (HS* and none never are); choose from "
                + ", ".join(OAUTH_ALGORITHMS),
            )
        else:
            algorithms = tuple(dict.fromkeys(algorithms_raw))
    leeway = _non_negative(raw, "leeway", where, check, OAuthConfig.leeway)
    if leeway > OAUTH_MAX_LEEWAY:
        check.problem(f"{where}.leeway", f"must be at most {OAUTH_MAX_LEEWAY:g} seconds")
    scope = raw.get("scope")
    if scope is not None and (not isinstance(scope, str) or not scope.strip()):
        check.problem(f"{where}.scope", f"must be a non-empty string (got {scope!r})")
        scope = None
    return OAuthConfig(
        issuer=issuer,
        audience=audience,
        jwks_url=jwks_url,
        jwks_file=jwks_file,
        address_claim=check.string(raw, "address_claim", where, OAuthConfig.address_claim),
        algorithms=algorithms,
        leeway=leeway,
        jwks_refresh=check.number(raw, "jwks_refresh", where, OAuthConfig.jwks_refresh),
        jwks_min_interval=check.number(
            raw, "jwks_min_interval", where, OAuthConfig.jwks_min_interval
        ),
        scope=scope,
    )


@dataclass(frozen=True)
class DefenceConfig:
    """Compromised-account defence (``relaygate.defence``): when an account's
    sending looks stolen its outbound mail is held (accepted, not delivered)
    until an admin releases or purges it. A count or share of 0 turns that
    trigger off."""

    enabled: bool = True
    volume_factor: float = 10.0  # an hour above factor x the busiest hour of 14 days ...
    volume_floor: int = 200  # ... and above this many messages
    new_recipient_share: float = 0.9  # share of this hour's recipients never sent to before
    new_recipient_min: int = 200  # ... once at least this many new recipients
    new_network_burst: int = 50  # messages in the hour after a login from a new network
    remote_reject_rate: float = 0.3  # share of recipients refused (5xx) by remote MX in an hour
    remote_reject_min: int = 20  # ... once at least this many were refused
    expect_hours: float = 24.0  # a release or `held expect` raises the baseline this long
    refresh_seconds: float = 2.0  # how stale a worker's view of counts and holds may get


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: Literal["logfmt", "json"] = "logfmt"
    file: Path | None = None  # None: standard error


# ------------------------------------------------------------ [verify], [submission]


@dataclass(frozen=True)
class VerifyConfig:
    """``relaygate verify``, its API route and the RCPT-time domain check
    (relaygate.verify, docs/verify.md)."""

    probe_from: str | None = None  # MAIL FROM of SMTP probes; None: postmaster@<hostname>
    cache_ttl: int = 3600  # seconds a result (and a domain's catch-all answer) is reused
    negative_cache_ttl: int = 300  # seconds for failures (no domain, timeouts, refusals)
    cache_entries: int = 100_000  # per process; the least recently used go first
    per_host: int = 2  # SMTP probe connections open at once to one MX host
    pace: float = 0.05  # seconds between probe transactions on one connection
    rcpts_per_connection: int = 100  # addresses probed on one connection, then a new one
    timeout: float = 20.0  # seconds for the connection and each SMTP reply
    max_api_addresses: int = 100  # addresses one POST /api/v1/verify may ask about


@dataclass(frozen=True)
class SubmissionConfig:
    check_recipient_domains: bool = False  # RCPT: refuse domains that cannot take mail


def _duration_setting(
    raw: dict[str, Any], key: str, where: str, check: _Checker, default: int
) -> int:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        check.problem(f"{where}.{key}", f'must be a duration such as "1h" (got {value!r})')
        return default
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        check.problem(f"{where}.{key}", str(exc))
        return default
    return seconds


def _verify(check: _Checker, data: dict[str, Any]) -> VerifyConfig:
    where = "verify"
    raw = check.table(data, where, where)
    defaults = VerifyConfig()
    check.unknown(raw, {f.name for f in dataclasses.fields(defaults)}, where)
    probe_from = raw.get("probe_from")
    if probe_from is not None:
        if not isinstance(probe_from, str) or "@" not in probe_from.strip("@"):
            check.problem(f"{where}.probe_from", f"must be an address (got {probe_from!r})")
            probe_from = None
        else:
            try:
                check_mailbox(probe_from, smtputf8=False)
            except AddressSyntaxError as exc:
                check.problem(f"{where}.probe_from", f"{exc} (got {probe_from!r})")
                probe_from = None
    return VerifyConfig(
        probe_from=probe_from,
        cache_ttl=_duration_setting(raw, "cache_ttl", where, check, defaults.cache_ttl),
        negative_cache_ttl=_duration_setting(
            raw, "negative_cache_ttl", where, check, defaults.negative_cache_ttl
        ),
        cache_entries=check.integer(raw, "cache_entries", where, defaults.cache_entries, 1),
        per_host=check.integer(raw, "per_host", where, defaults.per_host, 1),
        pace=_non_negative(raw, "pace", where, check, defaults.pace),
        rcpts_per_connection=check.integer(
            raw, "rcpts_per_connection", where, defaults.rcpts_per_connection, 1
        ),
        timeout=check.number(raw, "timeout", where, defaults.timeout),
        max_api_addresses=check.integer(
            raw, "max_api_addresses", where, defaults.max_api_addresses, 1
        ),
    )


def _submission(check: _Checker, data: dict[str, Any]) -> SubmissionConfig:
    raw = check.table(data, "submission", "submission")
    check.unknown(raw, {"check_recipient_domains"}, "submission")
    return SubmissionConfig(
        check_recipient_domains=_boolean(raw, "check_recipient_domains", "submission", check, False)
    )


@dataclass(frozen=True)
class Config:
    hostname: str
    data_dir: Path
    workers: int = 0
    listeners: tuple[ListenerConfig, ...] = ()
    tls: TLSConfig = field(default_factory=TLSConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    password_hash: PasswordHashConfig = field(default_factory=PasswordHashConfig)
    log: LogConfig = field(default_factory=LogConfig)
    auth_throttle: AuthThrottleConfig = field(default_factory=AuthThrottleConfig)
    sending_limits: SendingLimits = field(default_factory=SendingLimits)
    connection_limits: ConnectionLimitsConfig = field(default_factory=ConnectionLimitsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    shared: SharedConfig = field(default_factory=SharedConfig)
    http: HTTPConfig | None = None
    webhooks: tuple[WebhookConfig, ...] = ()
    defence: DefenceConfig = field(default_factory=DefenceConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    oauth: OAuthConfig | None = None
    ldap: LDAPConfig | None = None  # directory accounts; see the [ldap] block below
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    node_name: str = field(default_factory=default_node_name)
    quickstart: bool = False
    source: Path | None = None  # the file this came from, None in quickstart

    @property
    def database_path(self) -> Path:
        return self.data_dir / "relaygate.db"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)

    def single_process(self) -> bool:
        """One worker does everything: nothing to deliver, no HTTP, no supervisor."""
        return self.worker_count() == 1 and self.delivery.mode == "capture" and self.http is None

    def runs_delivery_process(self) -> bool:
        """Whether ``serve`` starts the delivery process. It also sends webhooks:
        in capture mode it runs for them alone when webhooks may exist (config
        ones, or the API can make some)."""
        if self.single_process():
            return False
        return self.delivery.mode != "capture" or bool(self.webhooks) or self.http is not None


QUICKSTART_LISTENERS = (
    ListenerConfig("127.0.0.1", 2587, "starttls"),
    ListenerConfig("127.0.0.1", 2465, "implicit"),
)


def quickstart_config() -> Config:
    return Config(
        hostname="localhost",
        data_dir=Path("relaygate-data").absolute(),
        listeners=QUICKSTART_LISTENERS,
        sending_limits=NO_SENDING_LIMITS,  # capture mode: nothing leaves the machine
        http=HTTPConfig(),
        quickstart=True,
    )


def default_hostname() -> str:
    return socket.getfqdn() or "localhost"


_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


# --------------------------------------------------------------------- loading

_TOP_KEYS = {
    "server",
    "listeners",
    "tls",
    "delivery",
    "limits",
    "password_hash",
    "log",
    "auth_throttle",
    "sending_limits",
    "connection_limits",
    "storage",
    "shared",
    "http",
    "webhooks",
    "defence",
    "retention",
    "oauth",
    "ldap",
    "verify",
    "submission",
}


class _Checker:
    """Collects problems while reading typed values out of parsed TOML."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, where: str, text: str) -> None:
        self.problems.append(f"{where}: {text}")

    def table(self, data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.problem(where, "must be a table")
            return {}
        return value

    def unknown(self, data: dict[str, Any], allowed: set[str], where: str) -> None:
        for key in sorted(set(data) - allowed):
            self.problem(f"{where}.{key}" if where else key, "unknown setting")

    def string(self, data: dict[str, Any], key: str, where: str, default: str) -> str:
        value = data.get(key, default)
        if not isinstance(value, str) or not value:
            self.problem(f"{where}.{key}", f"must be a non-empty string (got {value!r})")
            return default
        return value

    def integer(
        self, data: dict[str, Any], key: str, where: str, default: int, minimum: int = 0
    ) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.problem(f"{where}.{key}", f"must be a whole number >= {minimum} (got {value!r})")
            return default
        return value

    def number(self, data: dict[str, Any], key: str, where: str, default: float) -> float:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            self.problem(f"{where}.{key}", f"must be a number of seconds > 0 (got {value!r})")
            return default
        return float(value)

    def choice(
        self, data: dict[str, Any], key: str, where: str, default: str, choices: tuple[str, ...]
    ) -> str:
        value = data.get(key, default)
        if value not in choices:
            self.problem(f"{where}.{key}", f"must be one of {', '.join(choices)} (got {value!r})")
            return default
        return str(value)

    def path(
        self, data: dict[str, Any], key: str, where: str, base: Path, readable: bool = False
    ) -> Path | None:
        if key not in data:
            return None
        value = data[key]
        if not isinstance(value, str) or not value:
            self.problem(f"{where}.{key}", f"must be a path (got {value!r})")
            return None
        path = (base / value).resolve() if not Path(value).is_absolute() else Path(value)
        if readable and not os.access(path, os.R_OK):
            self.problem(f"{where}.{key}", f"cannot read {path}")
        return path


def parse_address(text: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` -> (host, port); None when malformed."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            return None
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            return None
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return host, int(port_text)


def _listeners(raw: Any, check: _Checker) -> tuple[ListenerConfig, ...]:
    if raw is None:
        return QUICKSTART_LISTENERS
    if not isinstance(raw, list) or not raw:
        check.problem("listeners", "must be a non-empty array of tables ([[listeners]])")
        return ()
    result = []
    for index, item in enumerate(raw):
        where = f"listeners[{index}]"
        if not isinstance(item, dict):
            check.problem(where, "must be a table")
            continue
        check.unknown(
            item,
            {"address", "tls", "proxy_protocol", "proxy_trusted", "allow_plaintext_auth"},
            where,
        )
        address = item.get("address")
        parsed = parse_address(address) if isinstance(address, str) else None
        if parsed is None:
            check.problem(f"{where}.address", f"must be host:port or [v6]:port (got {address!r})")
            continue
        tls = check.choice(item, "tls", where, "starttls", ("starttls", "implicit", "none"))
        proxy = _boolean(item, "proxy_protocol", where, check, False)
        trusted = _proxy_trusted(item, where, check, proxy)
        plaintext = _boolean(item, "allow_plaintext_auth", where, check, False)
        if plaintext and tls != "none":
            check.problem(
                f"{where}.allow_plaintext_auth",
                f'is only for tls = "none" listeners (this one is {tls}: log in after TLS)',
            )
        elif plaintext and proxy:
            # Behind a balancer the clients are elsewhere, whatever address we bind.
            check.problem(
                f"{where}.allow_plaintext_auth",
                "is not allowed with proxy_protocol = true: the clients are on other"
                " machines and their passwords would cross the network unencrypted",
            )
        elif plaintext and not is_loopback_host(parsed[0]):
            # A password sent in clear can be read by anyone on the path.
            check.problem(
                f"{where}.allow_plaintext_auth",
                f"is only allowed on a loopback address (127.0.0.0/8, ::1, localhost),"
                f" not {parsed[0]}: passwords would cross the network unencrypted",
            )
        result.append(
            ListenerConfig(parsed[0], parsed[1], tls, proxy, trusted, plaintext)  # type: ignore[arg-type]
        )
    seen: set[tuple[str, int]] = set()
    for listener in result:
        if (listener.host, listener.port) in seen:
            check.problem("listeners", f"{listener.address} is listed twice")
        seen.add((listener.host, listener.port))
    return tuple(result)


def _networks(value: Any, where: str, check: _Checker) -> tuple[str, ...]:
    """An array of CIDRs, normalised (``10.1.2.3/8`` means 10.0.0.0/8, as in most tools)."""
    if not isinstance(value, list):
        check.problem(where, f"must be an array of CIDRs (got {value!r})")
        return ()
    networks = []
    for index, item in enumerate(value):
        try:
            if not isinstance(item, str):
                raise TypeError  # ip_network() would take 5 as 0.0.0.5/32
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except (TypeError, ValueError):
            check.problem(
                f"{where}[{index}]", f"must be an IP network such as 192.0.2.0/24 (got {item!r})"
            )
    return tuple(networks)


def _proxy_trusted(
    item: dict[str, Any], where: str, check: _Checker, proxy: bool
) -> tuple[str, ...]:
    if "proxy_trusted" not in item:
        if proxy:
            check.problem(
                f"{where}.proxy_trusted",
                "is required with proxy_protocol = true (the balancers' networks, "
                'e.g. ["10.0.0.0/8"])',
            )
        return ()
    value = item["proxy_trusted"]
    trusted = _networks(value, f"{where}.proxy_trusted", check)
    if not proxy:
        # Likely a listener the admin believes is behind the balancer: say so.
        # (An empty list is what `config show` writes for a listener without it.)
        if value != []:
            check.problem(f"{where}.proxy_trusted", "is set but proxy_protocol is not true")
    elif value == []:
        check.problem(f"{where}.proxy_trusted", "must not be empty with proxy_protocol = true")
    return trusted


_Section = TypeVar("_Section", AuthThrottleConfig, SendingLimits)


def _number_section(
    check: _Checker, data: dict[str, Any], name: str, defaults: _Section, minimums: dict[str, int]
) -> _Section:
    """A table of numbers: whole ones >= 0 (or the minimum given) where the default
    is an int, seconds > 0 where it is a float."""
    raw = check.table(data, name, name)
    check.unknown(raw, {f.name for f in dataclasses.fields(defaults)}, name)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(defaults):
        default = getattr(defaults, f.name)
        if isinstance(default, float):
            values[f.name] = check.number(raw, f.name, name, default)
        else:
            values[f.name] = check.integer(raw, f.name, name, default, minimums.get(f.name, 0))
    return dataclasses.replace(defaults, **values)


def _connection_limits(check: _Checker, data: dict[str, Any]) -> ConnectionLimitsConfig:
    where = "connection_limits"
    raw = check.table(data, where, where)
    defaults = ConnectionLimitsConfig()
    check.unknown(raw, {f.name for f in dataclasses.fields(defaults)}, where)
    concurrent = check.integer(raw, "per_ip_concurrent", where, defaults.per_ip_concurrent)
    per_minute = check.integer(raw, "per_ip_per_minute", where, defaults.per_ip_per_minute)
    exempt = defaults.exempt
    if "exempt" in raw:
        exempt = _networks(raw["exempt"], f"{where}.exempt", check)
    return ConnectionLimitsConfig(concurrent, per_minute, exempt)


def _smarthost(raw: dict[str, Any], where: str, check: _Checker, base: Path) -> SmarthostConfig:
    check.unknown(
        raw,
        {
            "host",
            "port",
            "tls",
            "username",
            "password_file",
            "verify_certificate",
            "ca_file",
            "domain",
        },
        where,
    )
    host = check.string(raw, "host", where, "localhost")
    port = check.integer(raw, "port", where, 587, 1)
    tls = check.choice(raw, "tls", where, "starttls", ("starttls", "implicit", "none"))
    username = raw.get("username")
    if username is not None and (not isinstance(username, str) or not username):
        check.problem(f"{where}.username", "must be a non-empty string")
        username = None
    password_file = check.path(raw, "password_file", where, base, readable=True)
    if (username is None) != (password_file is None):
        check.problem(where, "username and password_file must be given together")
    verify = raw.get("verify_certificate", True)
    if not isinstance(verify, bool):
        check.problem(f"{where}.verify_certificate", f"must be true or false (got {verify!r})")
        verify = True
    ca_file = _ca_file(raw, where, check, base)
    if ca_file is not None and (tls == "none" or not verify):
        check.problem(
            f"{where}.ca_file",
            'is set but never used (tls = "none" or verify_certificate = false)',
        )
    return SmarthostConfig(host, port, tls, username, password_file, verify, ca_file)  # type: ignore[arg-type]


def _ca_file(raw: dict[str, Any], where: str, check: _Checker, base: Path) -> Path | None:
    """A readable PEM file with at least one CA certificate, checked now rather
    than at the first delivery."""
    path = check.path(raw, "ca_file", where, base, readable=True)
    if path is None or not os.access(path, os.R_OK):
        return path  # not given, or said already
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError, ValueError):
        check.problem(f"{where}.ca_file", f"{path}: no PEM CA certificate in it")
    return path


def _delivery(raw: dict[str, Any], check: _Checker, base: Path) -> DeliveryConfig:
    where = "delivery"
    defaults = DeliveryConfig()
    check.unknown(
        raw,
        {
            "mode",
            "smarthost",
            "routes",
            "resolvers",
            "mx_port",
            "tls_policy",
            "retry_schedule",
            "max_age",
            "delay_warning_after",
            "concurrency",
            "per_destination",
            "connect_timeout",
            "command_timeout",
            "mta_sts",
            "mta_sts_port",
            "allow_private_targets",
            "destination_timeout",
            "lease_seconds",
            "bounce_to",
        },
        where,
    )
    mode = check.choice(raw, "mode", where, "capture", ("capture", "smarthost", "mx"))
    bounce_to = check.choice(
        raw, "bounce_to", where, "capture" if mode == "capture" else "sender", ("sender", "capture")
    )
    lease = check.number(raw, "lease_seconds", where, defaults.lease_seconds)
    if lease < MIN_LEASE_SECONDS:
        check.problem(
            f"{where}.lease_seconds", f"must be at least {MIN_LEASE_SECONDS:g} (got {lease:g})"
        )
        lease = defaults.lease_seconds
    smarthost = None
    if "smarthost" in raw:
        smarthost = _smarthost(
            check.table(raw, "smarthost", where), f"{where}.smarthost", check, base
        )
    elif mode == "smarthost":
        check.problem(where, 'mode = "smarthost" needs a [delivery.smarthost] table')
    routes = []
    raw_routes = raw.get("routes", [])
    if not isinstance(raw_routes, list):
        check.problem(f"{where}.routes", "must be an array of tables ([[delivery.routes]])")
        raw_routes = []
    for index, item in enumerate(raw_routes):
        here = f"{where}.routes[{index}]"
        if not isinstance(item, dict):
            check.problem(here, "must be a table")
            continue
        domain = check.string(item, "domain", here, "")
        routes.append(RouteConfig(domain.lower(), _smarthost(item, here, check, base)))
    resolvers = []
    raw_resolvers = raw.get("resolvers", [])
    if not isinstance(raw_resolvers, list):
        check.problem(f"{where}.resolvers", 'must be a list like ["127.0.0.1:5353"]')
        raw_resolvers = []
    for item in raw_resolvers:
        parsed = parse_address(item) if isinstance(item, str) else None
        if parsed is None and isinstance(item, str) and ":" not in item.strip("[]"):
            parsed = (item, 53)
        if parsed is None:
            check.problem(f"{where}.resolvers", f"must be host or host:port (got {item!r})")
        else:
            resolvers.append(parsed)
    tls_policy = []
    raw_policy = check.table(raw, "tls_policy", where)
    for domain, value in raw_policy.items():
        if value not in ("required", "opportunistic"):
            check.problem(
                f"{where}.tls_policy.{domain}",
                f"must be required or opportunistic (got {value!r})",
            )
        else:
            tls_policy.append((str(domain).lower(), str(value)))
    schedule = raw.get("retry_schedule", list(defaults.retry_schedule))
    if (
        not isinstance(schedule, list)
        or not schedule
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in schedule
        )
    ):
        check.problem(f"{where}.retry_schedule", "must be a non-empty list of seconds > 0")
        schedule = list(defaults.retry_schedule)
    return DeliveryConfig(
        mode=mode,  # type: ignore[arg-type]
        smarthost=smarthost,
        routes=tuple(routes),
        resolvers=tuple(resolvers),
        mx_port=check.integer(raw, "mx_port", where, 25, 1),
        tls_policy=tuple(tls_policy),
        retry_schedule=tuple(float(v) for v in schedule),
        max_age=check.number(raw, "max_age", where, defaults.max_age),
        delay_warning_after=_non_negative(
            raw, "delay_warning_after", where, check, defaults.delay_warning_after
        ),
        concurrency=check.integer(raw, "concurrency", where, defaults.concurrency, 1),
        per_destination=check.integer(raw, "per_destination", where, defaults.per_destination, 1),
        connect_timeout=check.number(raw, "connect_timeout", where, defaults.connect_timeout),
        command_timeout=check.number(raw, "command_timeout", where, defaults.command_timeout),
        mta_sts=_boolean(raw, "mta_sts", where, check, True),
        lease_seconds=lease,
        mta_sts_port=check.integer(raw, "mta_sts_port", where, 443, 1),
        allow_private_targets=_boolean(raw, "allow_private_targets", where, check, False),
        destination_timeout=check.number(
            raw, "destination_timeout", where, defaults.destination_timeout
        ),
        bounce_to=bounce_to,  # type: ignore[arg-type]
    )


def _boolean(raw: dict[str, Any], key: str, where: str, check: _Checker, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        check.problem(f"{where}.{key}", f"must be true or false (got {value!r})")
        return default
    return value


def _non_negative(
    raw: dict[str, Any], key: str, where: str, check: _Checker, default: float
) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        check.problem(f"{where}.{key}", f"must be a number of seconds >= 0 (got {value!r})")
        return default
    return float(value)


def _url(
    raw: dict[str, Any], key: str, where: str, schemes: tuple[str, ...], check: _Checker
) -> str | None:
    if key not in raw:
        return None
    value = raw[key]
    if not isinstance(value, str) or not value.strip():
        check.problem(f"{where}.{key}", "must be a non-empty string")
        return None
    scheme = value.partition("://")[0].lower()
    if "://" not in value or scheme not in schemes:
        check.problem(f"{where}.{key}", f"must be a {' or '.join(s + '://' for s in schemes)} URL")
        return None
    return value.strip()


def _age(
    raw: dict[str, Any], key: str, where: str, check: _Checker, default: int | None
) -> int | None:
    """A duration string ("30d"), or "off" for no limit."""
    if key not in raw:
        return default
    value = raw[key]
    if isinstance(value, str) and value.strip().lower() == "off":
        return None
    if not isinstance(value, str):
        check.problem(
            f"{where}.{key}", f'must be a duration such as "30d", or "off" (got {value!r})'
        )
        return default
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        check.problem(f"{where}.{key}", str(exc))
        return default
    if seconds < 1:
        check.problem(f"{where}.{key}", f'must be at least 1s, or "off" (got {value!r})')
        return default
    return seconds


def _retention(check: _Checker, data: dict[str, Any]) -> RetentionConfig:
    where = "retention"
    raw = check.table(data, where, where)
    defaults = RetentionConfig()
    check.unknown(raw, {f.name for f in dataclasses.fields(defaults)}, where)
    max_age = _age(raw, "max_age", where, check, defaults.max_age)
    body_max_age = _age(raw, "body_max_age", where, check, defaults.body_max_age)
    if max_age is not None and body_max_age is not None and body_max_age > max_age:
        check.problem(
            f"{where}.body_max_age", "must not be longer than max_age (a record goes with its body)"
        )
    return RetentionConfig(
        max_age=max_age,
        max_messages=check.integer(raw, "max_messages", where, defaults.max_messages),
        body_max_age=body_max_age,
    )


# ------------------------------------------------------- [defence] (compromised accounts)


def _defence(check: _Checker, data: dict[str, Any]) -> DefenceConfig:
    where = "defence"
    raw = check.table(data, where, where)
    defaults = DefenceConfig()
    check.unknown(raw, {f.name for f in dataclasses.fields(defaults)}, where)
    enabled = raw.get("enabled", defaults.enabled)
    if not isinstance(enabled, bool):
        check.problem(f"{where}.enabled", f"must be true or false (got {enabled!r})")
        enabled = defaults.enabled
    values: dict[str, Any] = {"enabled": enabled}
    for name in ("new_recipient_share", "remote_reject_rate"):
        value = raw.get(name, getattr(defaults, name))
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            check.problem(f"{where}.{name}", f"must be a share from 0 to 1 (got {value!r})")
            value = getattr(defaults, name)
        values[name] = float(value)
    factor = raw.get("volume_factor", defaults.volume_factor)
    if isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 0:
        check.problem(f"{where}.volume_factor", f"must be a number >= 0 (got {factor!r})")
        factor = defaults.volume_factor
    values["volume_factor"] = float(factor)
    for name in ("volume_floor", "new_recipient_min", "new_network_burst", "remote_reject_min"):
        values[name] = check.integer(raw, name, where, getattr(defaults, name))
    for name in ("expect_hours", "refresh_seconds"):
        values[name] = check.number(raw, name, where, getattr(defaults, name))
    return DefenceConfig(**values)


def _storage(check: _Checker, data: dict[str, Any]) -> StorageConfig:
    raw = check.table(data, "storage", "storage")
    check.unknown(raw, {"url", "pool_size"}, "storage")
    return StorageConfig(
        url=_url(raw, "url", "storage", ("postgresql", "postgres"), check),
        pool_size=check.integer(raw, "pool_size", "storage", StorageConfig.pool_size, 1),
    )


def _shared(check: _Checker, data: dict[str, Any]) -> SharedConfig:
    raw = check.table(data, "shared", "shared")
    check.unknown(raw, {"redis_url"}, "shared")
    return SharedConfig(
        redis_url=_url(raw, "redis_url", "shared", ("redis", "rediss", "unix"), check)
    )


def _http(check: _Checker, data: dict[str, Any], base: Path) -> HTTPConfig | None:
    if "http" not in data:
        return None
    raw = check.table(data, "http", "http")
    check.unknown(
        raw,
        {
            "address",
            "tls",
            "public_url",
            "metrics",
            "metrics_token_file",
            "allow_private_targets",
        },
        "http",
    )
    address = raw.get("address", "127.0.0.1:8025")
    parsed = parse_address(address) if isinstance(address, str) else None
    if parsed is None:
        check.problem("http.address", f"must be host:port or [v6]:port (got {address!r})")
        parsed = ("127.0.0.1", 8025)
    public_url = _url(raw, "public_url", "http", ("http", "https"), check)
    return HTTPConfig(
        host=parsed[0],
        port=parsed[1],
        tls=_boolean(raw, "tls", "http", check, False),
        public_url=public_url,
        metrics=_boolean(raw, "metrics", "http", check, True),
        metrics_token_file=check.path(raw, "metrics_token_file", "http", base, readable=True),
        allow_private_targets=_boolean(raw, "allow_private_targets", "http", check, False),
    )


def _webhooks(
    raw: Any, check: _Checker, base: Path, allow_private: bool
) -> tuple[WebhookConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        check.problem("webhooks", "must be an array of tables ([[webhooks]])")
        return ()
    found: list[WebhookConfig] = []
    for index, item in enumerate(raw):
        where = f"webhooks[{index}]"
        if not isinstance(item, dict):
            check.problem(where, "must be a table")
            continue
        check.unknown(item, {"url", "events", "secret_file"}, where)
        url = item.get("url")
        if not isinstance(url, str) or not url.strip():
            check.problem(f"{where}.url", "must be an http:// or https:// URL")
            continue
        try:
            check_url(url.strip(), allow_private)
        except TargetError as exc:
            check.problem(f"{where}.url", str(exc))
            continue
        events = item.get("events", [])
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            check.problem(f"{where}.events", "must be a list of event names")
            continue
        unknown = [e for e in events if e not in EVENTS]
        if unknown:
            check.problem(
                f"{where}.events", f"unknown event {unknown[0]!r} (known: {', '.join(EVENTS)})"
            )
            continue
        secret_file = check.path(item, "secret_file", where, base, readable=True)
        if secret_file is None:
            if "secret_file" not in item:
                check.problem(f"{where}.secret_file", "is required (a file holding whsec_<base64>)")
            continue
        if not os.access(secret_file, os.R_OK):
            continue  # said already
        try:
            secret_key(secret_file.read_text())
        except (OSError, UnicodeDecodeError, SecretError) as exc:
            check.problem(f"{where}.secret_file", f"{secret_file}: {exc}")
            continue
        hook = WebhookConfig(url.strip(), tuple(events), secret_file)
        if any(h.url == hook.url for h in found):
            check.problem(f"{where}.url", f"{hook.url} is listed twice")
            continue
        found.append(hook)
    return tuple(found)


# ------------------------------------------------------------------ [ldap]
# Directory accounts (docs/identity.md): a login not found locally is looked up
# in an LDAP directory (relaygate/accounts/directory.py).

LDAP_SCHEMES = ("ldap", "ldaps")
LDAP_DEFAULT_FILTER = "(mail={address})"


@dataclass(frozen=True)
class LDAPConfig:
    url: str  # ldap://host[:port] or ldaps://host[:port]
    bind_dn: str  # the service account relaygate searches with
    bind_password_file: Path  # its password; read at start, never logged
    base_dn: str  # where users are searched (subtree)
    filter: str = LDAP_DEFAULT_FILTER  # {address}: the login name, escaped (RFC 4515)
    start_tls: bool = True  # with ldap:// URLs: StartTLS before any bind
    ca_file: Path | None = None  # PEM CAs the directory's certificate must chain to
    alias_attributes: tuple[str, ...] = ()  # besides mail: more sender addresses
    disabled_filter: str | None = None  # an entry matching it may not log in
    cache_ttl: int = 300  # seconds a verified directory login is trusted
    timeout: int = 5  # seconds for each directory operation (connect, bind, search)


def ldap_url_parts(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``ldap://host[:port]`` or ``ldaps://host[:port]``;
    ValueError with a one-line reason for anything else (a path, user info)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"not an LDAP URL: {url!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in LDAP_SCHEMES or not parts.hostname:
        raise ValueError(f"must be ldap://host[:port] or ldaps://host[:port] (got {url!r})")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"must be ldap://host[:port] or ldaps://host[:port] (got {url!r})")
    return scheme, parts.hostname, port or (636 if scheme == "ldaps" else 389)


_LDAP_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,63}")


def _ldap_filter_problem(text: str) -> str | None:
    """A cheap check that a filter is one parenthesised expression."""
    depth = 0
    for index, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0 or (depth == 0 and index != len(text) - 1):
                return "must be one parenthesised LDAP filter, such as (mail={address})"
    if not text.startswith("(") or depth != 0:
        return "must be one parenthesised LDAP filter, such as (mail={address})"
    return None


def _ldap(check: _Checker, data: dict[str, Any], base: Path) -> LDAPConfig | None:
    if "ldap" not in data:
        return None
    where = "ldap"
    raw = check.table(data, where, where)
    check.unknown(raw, {f.name for f in dataclasses.fields(LDAPConfig)}, where)
    for key in ("url", "bind_dn", "bind_password_file", "base_dn"):
        if key not in raw:
            check.problem(f"{where}.{key}", "is required")
    url = _url(raw, "url", where, LDAP_SCHEMES, check) or "ldap://localhost"
    try:
        scheme, host, _ = ldap_url_parts(url)
    except ValueError as exc:
        check.problem(f"{where}.url", str(exc))
        scheme, host = "ldaps", "localhost"
    start_tls = _boolean(raw, "start_tls", where, check, True)
    if scheme == "ldap" and not start_tls and not is_loopback_host(host):
        check.problem(
            f"{where}.start_tls",
            "false would send passwords in clear to a host that is not loopback:"
            " use start_tls = true or an ldaps:// URL",
        )
    password_file = check.path(raw, "bind_password_file", where, base, readable=True)
    if password_file is not None and os.access(password_file, os.R_OK):
        try:
            empty = not password_file.read_text(encoding="utf-8").strip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            check.problem(f"{where}.bind_password_file", f"{password_file}: {exc}")
        else:
            if empty:
                check.problem(f"{where}.bind_password_file", f"{password_file} is empty")
    search = check.string(raw, "filter", where, LDAP_DEFAULT_FILTER)
    if "{address}" not in search:
        check.problem(f"{where}.filter", "must contain {address} (the login name)")
    else:
        problem = _ldap_filter_problem(search.replace("{address}", "x"))
        if problem:
            check.problem(f"{where}.filter", problem)
    disabled = raw.get("disabled_filter")
    if disabled is not None:
        problem = (
            "must be a non-empty string"
            if not isinstance(disabled, str) or not disabled
            else _ldap_filter_problem(disabled)
        )
        if problem:
            check.problem(f"{where}.disabled_filter", problem)
            disabled = None
    aliases = raw.get("alias_attributes", [])
    if not isinstance(aliases, list) or not all(
        isinstance(a, str) and _LDAP_ATTRIBUTE.fullmatch(a) for a in aliases
    ):
        check.problem(f"{where}.alias_attributes", "must be a list of LDAP attribute names")
        aliases = []
    ttl = _age(raw, "cache_ttl", where, check, 300)
    if ttl is None:
        check.problem(f"{where}.cache_ttl", 'must be a duration such as "5m" ("off" is not one)')
        ttl = 300
    timeout = check.integer(raw, "timeout", where, LDAPConfig.timeout, 1)
    return LDAPConfig(
        url=url,
        bind_dn=check.string(raw, "bind_dn", where, "x"),
        bind_password_file=password_file or Path("/nonexistent"),
        base_dn=check.string(raw, "base_dn", where, "x"),
        filter=search,
        start_tls=start_tls,
        ca_file=_ca_file(raw, where, check, base),
        alias_attributes=tuple(aliases),
        disabled_filter=disabled,
        cache_ttl=ttl,
        timeout=timeout,
    )


def config_from_dict(data: dict[str, Any], base: Path, source: Path | None = None) -> Config:
    """Validate parsed TOML; raise ConfigError with every problem found."""
    check = _Checker()
    check.unknown(data, _TOP_KEYS, "")
    server = check.table(data, "server", "server")
    check.unknown(server, {"hostname", "data_dir", "workers", "node_name"}, "server")
    hostname = check.string(server, "hostname", "server", default_hostname())
    node_name = check.string(server, "node_name", "server", default_node_name())
    if not _NODE_NAME.fullmatch(node_name):
        check.problem(
            "server.node_name",
            "must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    data_dir_text = check.string(server, "data_dir", "server", "./relaygate-data")
    data_dir = (base / data_dir_text).resolve()
    workers = check.integer(server, "workers", "server", 0)

    listeners = _listeners(data.get("listeners"), check)

    tls_raw = check.table(data, "tls", "tls")
    check.unknown(tls_raw, {"cert_file", "key_file"}, "tls")
    cert = check.path(tls_raw, "cert_file", "tls", base, readable=True)
    key = check.path(tls_raw, "key_file", "tls", base, readable=True)
    if (cert is None) != (key is None):
        check.problem("tls", "cert_file and key_file must be given together")

    delivery = _delivery(check.table(data, "delivery", "delivery"), check, base)

    limits_raw = check.table(data, "limits", "limits")
    defaults = LimitsConfig()
    check.unknown(limits_raw, set(LimitsConfig.__dataclass_fields__), "limits")
    limits = LimitsConfig(
        max_message_size=check.integer(
            limits_raw, "max_message_size", "limits", defaults.max_message_size, 1024
        ),
        max_recipients=check.integer(
            limits_raw, "max_recipients", "limits", defaults.max_recipients, 1
        ),
        max_bad_commands=check.integer(
            limits_raw, "max_bad_commands", "limits", defaults.max_bad_commands, 1
        ),
        max_connections=check.integer(
            limits_raw, "max_connections", "limits", defaults.max_connections, 1
        ),
        max_commands_before_login=check.integer(
            limits_raw, "max_commands_before_login", "limits", defaults.max_commands_before_login
        ),
        max_messages_per_session=check.integer(
            limits_raw, "max_messages_per_session", "limits", defaults.max_messages_per_session
        ),
        max_session_duration=check.number(
            limits_raw, "max_session_duration", "limits", defaults.max_session_duration
        ),
        idle_timeout=check.number(limits_raw, "idle_timeout", "limits", defaults.idle_timeout),
        command_timeout=check.number(
            limits_raw, "command_timeout", "limits", defaults.command_timeout
        ),
        data_timeout=check.number(limits_raw, "data_timeout", "limits", defaults.data_timeout),
        tls_handshake_timeout=check.number(
            limits_raw, "tls_handshake_timeout", "limits", defaults.tls_handshake_timeout
        ),
        shutdown_grace=check.number(
            limits_raw, "shutdown_grace", "limits", defaults.shutdown_grace
        ),
    )

    hash_raw = check.table(data, "password_hash", "password_hash")
    check.unknown(hash_raw, {"memory_kib", "time_cost", "parallelism"}, "password_hash")
    hashing = PasswordHashConfig(
        memory_kib=check.integer(hash_raw, "memory_kib", "password_hash", 19456, 8192),
        time_cost=check.integer(hash_raw, "time_cost", "password_hash", 2, 1),
        parallelism=check.integer(hash_raw, "parallelism", "password_hash", 1, 1),
    )

    log_raw = check.table(data, "log", "log")
    check.unknown(log_raw, {"level", "format", "file"}, "log")
    log = LogConfig(
        level=check.choice(log_raw, "level", "log", "info", ("debug", "info", "warning", "error")),
        format=check.choice(log_raw, "format", "log", "logfmt", ("logfmt", "json")),  # type: ignore[arg-type]
        file=check.path(log_raw, "file", "log", base),
    )

    auth_throttle = _number_section(
        check, data, "auth_throttle", AuthThrottleConfig(), {"known_network_days": 1}
    )
    sending_limits = _number_section(
        check,
        data,
        "sending_limits",
        NO_SENDING_LIMITS
        if delivery.mode == "capture" and "sending_limits" not in data
        else SendingLimits(),
        {},
    )
    connection_limits = _connection_limits(check, data)
    storage = _storage(check, data)
    shared = _shared(check, data)
    http = _http(check, data, base)
    webhooks = _webhooks(
        data.get("webhooks"), check, base, http is not None and http.allow_private_targets
    )
    defence = _defence(check, data)
    retention = _retention(check, data)
    oauth = _oauth(check, data, base)
    ldap = _ldap(check, data, base)
    verify = _verify(check, data)
    submission = _submission(check, data)
    if http is not None and any((x.host, x.port) == (http.host, http.port) for x in listeners):
        check.problem("http.address", f"{http.address} is also an SMTP listener")

    if check.problems:
        raise ConfigError(check.problems)
    return Config(
        hostname=hostname,
        data_dir=data_dir,
        workers=workers,
        listeners=listeners,
        tls=TLSConfig(cert, key),
        delivery=delivery,
        limits=limits,
        password_hash=hashing,
        log=log,
        auth_throttle=auth_throttle,
        sending_limits=sending_limits,
        connection_limits=connection_limits,
        storage=storage,
        shared=shared,
        http=http,
        webhooks=webhooks,
        defence=defence,
        retention=retention,
        oauth=oauth,
        ldap=ldap,
        verify=verify,
        submission=submission,
        node_name=node_name,
        source=source,
    )


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load ``path`` (or $RELAYGATE_CONFIG); neither given means quickstart."""
    if path is None:
        path = os.environ.get(ENV_VAR) or None
    if path is None:
        return quickstart_config()
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{file}: not UTF-8 text"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: TOML syntax error: {exc}"]) from None
    try:
        return config_from_dict(data, file.parent.resolve(), source=file.resolve())
    except ConfigError as exc:
        raise ConfigError([f"{file}: {p}" for p in exc.problems]) from None
