"""One description per configuration key, and the example file made from them.

``relaygate config example`` prints relaygate.example.toml: every setting of
the types in config.py, commented out with its default, under its description
here. A unit test fails when the checked-in file is not what this produces, or
when a key has no line below. Adding a setting is one line in DOCS (with an
``example=`` when the type has no default to show), then
``.venv/bin/relaygate config example > relaygate.example.toml``.
"""

from __future__ import annotations

from relaygate.config_toml import Doc, render_example, sections

REGENERATE = ".venv/bin/relaygate config example > relaygate.example.toml"

# Keys are TOML paths: "table.key" (arrays of tables without brackets). A route's
# smarthost keys are described once, under delivery.smarthost.
DOCS: dict[str, Doc] = {
    # [server]
    "server": Doc("The server itself."),
    "server.hostname": Doc(
        "Name in the banner, EHLO, Received and the self-signed certificate."
        " Default: this machine's fully qualified name.",
        example="mail.example.com",
    ),
    "server.data_dir": Doc(
        "Database, generated certificates, DKIM keys; made 0700 (its files 0600). One `serve`"
        " at a time (data_dir/serve.lock). The default is relative to this file's directory.",
        example="./relaygate-data",
    ),
    "server.workers": Doc("Processes sharing the listeners; 0 = one per CPU."),
    "server.node_name": Doc(
        "Unique per node of a cluster (logs, Received, message log, leases, `relaygate nodes`)."
        " Default: this machine's short host name.",
        example="mx-a",
    ),
    # [[listeners]]
    "listeners": Doc(
        "SMTP submission listeners, one table each. None at all: 127.0.0.1:2587 (STARTTLS)"
        " and 127.0.0.1:2465 (implicit TLS)."
    ),
    "listeners.address": Doc("host:port or [v6]:port.", example="0.0.0.0:587"),
    "listeners.tls": Doc("starttls | implicit | none. AUTH is offered only over TLS."),
    "listeners.proxy_protocol": Doc(
        "A PROXY v1 or v2 header comes first (before TLS on implicit-TLS listeners); its"
        " client address is what limits, throttles, logs and Received see."
    ),
    "listeners.proxy_trusted": Doc(
        "Required with proxy_protocol = true: the balancers' networks (CIDRs). Any other peer"
        " is closed at once.",
        example=["10.0.0.0/8"],
    ),
    "listeners.allow_plaintext_auth": Doc(
        'A development port: AUTH without TLS. Only with tls = "none" on a loopback address'
        " (127.0.0.0/8, ::1, localhost)."
    ),
    # [tls]
    "tls": Doc(
        "The certificate of the SMTP listeners (and of [http] with tls = true). Not set: a"
        " self-signed ECDSA P-256 and RSA-2048 pair made once in data_dir/tls."
    ),
    "tls.cert_file": Doc(
        "Certificate chain, PEM, leaf first; with key_file.", example="/etc/relaygate/fullchain.pem"
    ),
    "tls.key_file": Doc("Its private key, PEM, unencrypted.", example="/etc/relaygate/privkey.pem"),
    # [delivery]
    "delivery": Doc("What happens to accepted mail."),
    "delivery.mode": Doc(
        "capture (kept here, nothing leaves the machine) | smarthost (all through"
        " [delivery.smarthost]) | mx (straight to the recipients' MX hosts)."
    ),
    "delivery.resolvers": Doc(
        'DNS servers for MX look-ups, such as ["127.0.0.1:5353"]; empty: the system\'s.'
    ),
    "delivery.mx_port": Doc("Port of the MX hosts (tests use another)."),
    "delivery.retry_schedule": Doc(
        "Seconds to wait after the 1st, 2nd, ... failed attempt; the last repeats. Each wait"
        " gets +-20% jitter."
    ),
    "delivery.max_age": Doc("Seconds a message may wait before it bounces."),
    "delivery.delay_warning_after": Doc(
        "Seconds before the sender gets a delay warning; 0 = never."
    ),
    "delivery.concurrency": Doc("Outbound connections in all."),
    "delivery.per_destination": Doc("Outbound connections to one destination."),
    "delivery.connect_timeout": Doc("Seconds to connect and get the banner, per host."),
    "delivery.command_timeout": Doc("Seconds for each reply of the remote server."),
    "delivery.mta_sts": Doc("Follow RFC 8461 MTA-STS policies in mx mode."),
    "delivery.mta_sts_port": Doc("HTTPS port of mta-sts.<domain> (tests use another)."),
    "delivery.allow_private_targets": Doc(
        "true: MX hosts in loopback, private or link-local ranges are used (else refused)."
    ),
    "delivery.destination_timeout": Doc(
        "Seconds one attempt may spend on DNS and connecting, over all of a destination's hosts."
    ),
    "delivery.lease_seconds": Doc(
        "Several nodes: how long a claimed delivery stays one node's unless renewed (at least 10)."
    ),
    "delivery.bounce_to": Doc(
        'Where bounces and delay warnings for a local account go: "sender" (delivered to the'
        ' envelope sender, by smarthost or MX) or "capture" (kept in the message log).'
        ' Default: "capture" in capture mode, else "sender".'
    ),
    "delivery.smarthost": Doc(
        'The upstream relay of mode = "smarthost" (SES, Mailgun, a corporate gateway).'
    ),
    "delivery.smarthost.host": Doc("Its host name or address.", example="smtp.example.net"),
    "delivery.smarthost.port": Doc("Its port."),
    "delivery.smarthost.tls": Doc("starttls | implicit | none."),
    "delivery.smarthost.username": Doc(
        "AUTH user name, with password_file; not set: no AUTH.", example="relaygate"
    ),
    "delivery.smarthost.password_file": Doc(
        "File holding the AUTH password (surrounding white space is dropped), so the config"
        " itself holds no secret.",
        example="/etc/relaygate/smarthost.password",
    ),
    "delivery.smarthost.verify_certificate": Doc(
        "Check the relay's certificate and name (false only for a test relay)."
    ),
    "delivery.smarthost.ca_file": Doc(
        "PEM file of the CA certificates the relay's certificate must chain to, instead of"
        " the system's.",
        example="/etc/relaygate/smarthost-ca.pem",
    ),
    "delivery.routes": Doc(
        "Mail for one domain goes through its own smarthost, whatever the mode. Takes every"
        " [delivery.smarthost] key besides domain."
    ),
    "delivery.routes.domain": Doc("The recipients' domain.", example="example.org"),
    "delivery.tls_policy": Doc(
        'Per recipient domain: "required" (no delivery without verified TLS) or'
        ' "opportunistic" (the default).',
        example={"example.org": "required"},
    ),
    # [limits]
    "limits": Doc("Limits of SMTP sessions."),
    "limits.max_message_size": Doc("Octets; announced in EHLO SIZE."),
    "limits.max_recipients": Doc("Recipients per message."),
    "limits.max_bad_commands": Doc("Bad commands in a session before 421 and close."),
    "limits.max_connections": Doc("Connections per worker process."),
    "limits.max_commands_before_login": Doc(
        "Command lines before AUTH succeeds, then 421; 0 = no cap."
    ),
    "limits.max_messages_per_session": Doc(
        "Then 421 at MAIL and the client reconnects; 0 = no cap."
    ),
    "limits.max_session_duration": Doc("Seconds a connection may last, however busy."),
    "limits.idle_timeout": Doc("Seconds without a byte from the client."),
    "limits.command_timeout": Doc(
        "Seconds for one command line; also for a client that stops reading our replies."
    ),
    "limits.tls_handshake_timeout": Doc("Seconds for a TLS handshake (implicit or STARTTLS)."),
    "limits.data_timeout": Doc("Seconds for one whole message body (DATA or all BDAT chunks)."),
    "limits.shutdown_grace": Doc("SIGTERM: seconds transactions in flight may take to finish."),
    # [password_hash]
    "password_hash": Doc("argon2id parameters for new password hashes; defaults: OWASP's minimum."),
    "password_hash.memory_kib": Doc("Memory per hash, KiB (at least 8192)."),
    "password_hash.time_cost": Doc("Passes over the memory."),
    "password_hash.parallelism": Doc("Lanes."),
    # [log]
    "log": Doc("The log: one event per line (docs/logging.md)."),
    "log.level": Doc("debug | info | warning | error."),
    "log.format": Doc("logfmt | json."),
    "log.file": Doc(
        "Appended to, made 0600. Not set: standard error (the journal under systemd).",
        example="/var/log/relaygate/relaygate.log",
    ),
    # [auth_throttle]
    "auth_throttle": Doc(
        "Failed-login limits (docs/security.md); a count of 0 turns that rule off. A network"
        " is an IPv4 /24 or an IPv6 /64."
    ),
    "auth_throttle.ip_per_minute": Doc("Failures from one address in a minute."),
    "auth_throttle.ip_per_day": Doc("Failures from one address in a day."),
    "auth_throttle.network_per_minute": Doc("Failures from one network in a minute."),
    "auth_throttle.network_per_day": Doc("Failures from one network in a day."),
    "auth_throttle.account_per_hour": Doc(
        "Failures against one user name, from networks it has not logged in from lately."
    ),
    "auth_throttle.known_network_days": Doc(
        "A login exempts its network from the account rule this many days (at least 1)."
    ),
    "auth_throttle.connection_delay_after": Doc(
        "Failures answered at once; each later failure reply is held delay_seconds, doubling."
    ),
    "auth_throttle.connection_close_after": Doc("Failures on one connection before it is closed."),
    "auth_throttle.delay_seconds": Doc("The first delay, in seconds."),
    "auth_throttle.max_delay": Doc("The longest delay (and the hold of a throttled reply)."),
    # [sending_limits]
    "sending_limits": Doc(
        "Per account, in fixed UTC hours and days; 0 = unlimited; `relaygate user limits`"
        " overrides them per account. In capture mode, without this table, all are 0."
    ),
    "sending_limits.messages_per_hour": Doc("Messages an account may send in an hour."),
    "sending_limits.messages_per_day": Doc("Messages an account may send in a day."),
    "sending_limits.recipients_per_day": Doc("Recipients over all its messages in a day."),
    "sending_limits.new_recipients_per_day": Doc(
        "Addresses it never sent to before, in a day (a stolen password shows up as many)."
    ),
    # [connection_limits]
    "connection_limits": Doc("Per client address, over all workers; 0 = unlimited."),
    "connection_limits.per_ip_concurrent": Doc("Open connections from one address."),
    "connection_limits.per_ip_per_minute": Doc("New connections from one address in a minute."),
    "connection_limits.exempt": Doc("Networks (CIDRs) never limited."),
    # [storage]
    "storage": Doc(
        "Where accounts, messages and the queue live: SQLite in data_dir, or PostgreSQL"
        " (docs/scale-out.md)."
    ),
    "storage.url": Doc(
        "PostgreSQL, shared by every node; `serve` migrates its schema. Not set: SQLite in"
        " data_dir. `config show` masks its password.",
        example="postgresql://relaygate@db.example.internal:5432/relaygate",
    ),
    "storage.pool_size": Doc("PostgreSQL connections per process."),
    # [shared]
    "shared": Doc("Short-lived state several nodes must share."),
    "shared.redis_url": Doc(
        "Redis for login throttles, connection counts and change notices; required with two"
        " nodes or more. `config show` masks its password.",
        example="redis://127.0.0.1:6379/0",
    ),
    # [http]
    "http": Doc(
        "The admin API, web UI and metrics (docs/api.md, docs/web-ui.md); without this table"
        " there is none (quickstart: 127.0.0.1:8025)."
    ),
    "http.address": Doc("host:port or [v6]:port; keep it on loopback or behind your proxy."),
    "http.tls": Doc("HTTPS with the [tls] certificate (or the self-signed pair)."),
    "http.public_url": Doc(
        "Base of links in webhooks and e-mails. Not set: made from address.",
        example="https://mail-admin.example.com",
    ),
    "http.metrics": Doc("Serve GET /metrics (Prometheus, docs/metrics.md)."),
    "http.metrics_token_file": Doc(
        'Set: /metrics wants "Authorization: Bearer <the file\'s content>".',
        example="/etc/relaygate/metrics.token",
    ),
    "http.allow_private_targets": Doc("true: webhooks may go to loopback or private addresses."),
    # [[webhooks]]
    "webhooks": Doc(
        "Signed POSTs for events (docs/webhooks.md), one table each; read-only in the API."
    ),
    "webhooks.url": Doc(
        "http:// or https://, no credentials.", example="https://hooks.example.com/relaygate"
    ),
    "webhooks.events": Doc(
        "Event names; empty: every event.", example=["message.bounced", "auth.throttled"]
    ),
    "webhooks.secret_file": Doc(
        "File holding the signing secret, whsec_<base64>.", example="/etc/relaygate/webhook.secret"
    ),
    # [defence]
    "defence": Doc(
        "Compromised-account defence (docs/security.md): an account whose sending looks stolen"
        " gets its outbound mail held (accepted with 250, not delivered) until `relaygate held"
        " release` or `held purge`. A count or share of 0 turns that trigger off."
    ),
    "defence.enabled": Doc("Watch accounts and hold their mail when a trigger fires."),
    "defence.volume_factor": Doc(
        "Hold when an hour's messages pass this many times the account's busiest hour of the"
        " last 14 days (its baseline) ..."
    ),
    "defence.volume_floor": Doc(
        "... and this many messages: the threshold is max(factor x baseline, floor), so a new"
        " account (baseline 0) gets the floor; 0 = no volume trigger."
    ),
    "defence.new_recipient_share": Doc(
        "Hold when this share of an hour's recipients are addresses the account never sent to ..."
    ),
    "defence.new_recipient_min": Doc("... once at least this many of them are new."),
    "defence.new_network_burst": Doc(
        "Hold when, in the hour after a login from a network (/24, /48) the account never used"
        " before, it sends more than this many messages (or its baseline, if higher)."
    ),
    "defence.remote_reject_rate": Doc(
        "Hold when remote mail servers refused (5xx) this share of the account's recipients in"
        " the last hour ..."
    ),
    "defence.remote_reject_min": Doc("... once at least this many were refused."),
    "defence.expect_hours": Doc(
        "How long a release or `relaygate held expect` raises the account's baseline."
    ),
    "defence.refresh_seconds": Doc(
        "How old a worker's view of an account's counts and hold may get (the window in which"
        " other workers and nodes may still see an account as not held)."
    ),
    # [retention]
    "retention": Doc(
        "How long mail is kept, applied in the background a few hundred rows at a time (by the"
        " delivery process, else worker 0); a message still waiting for delivery is never"
        ' removed. Durations: 30d, 12h, 90m, 45s, 1w, or "off".'
    ),
    "retention.max_age": Doc(
        "A message (record, body, delivery history) goes this long after it arrived; settled"
        ' webhook rows too (after an hour at least). "off": kept however old.'
    ),
    "retention.max_messages": Doc("The newest this many records are kept at most; 0 = no cap."),
    "retention.body_max_age": Doc(
        "Bodies of messages nothing waits to deliver go earlier than their records (which"
        ' then say so); "off": a body is kept as long as its record.'
    ),
    # [oauth]
    "oauth": Doc(
        "OAuth 2.0 bearer-token logins (AUTH OAUTHBEARER, RFC 7628, and XOAUTH2), offered"
        " over TLS only. The token is a JWT signed by your identity provider; its address"
        " claim must name an enabled account. Not set: no token logins (docs/identity.md)."
        " A change needs a restart."
    ),
    "oauth.issuer": Doc(
        'The tokens\' "iss", exactly (Keycloak: https://sso.example.com/realms/mail).',
        example="https://sso.example.com/realms/mail",
    ),
    "oauth.audience": Doc(
        'The tokens\' "aud" must name this (or one of this list): the client ID or API'
        " identifier the tokens are issued for.",
        example="relaygate",
    ),
    "oauth.jwks_url": Doc(
        "Where the provider publishes its signing keys (JWKS). https://, or http:// on"
        " loopback only. Fetched at start, every jwks_refresh, and for a key id not seen"
        " yet; the last good set is kept when a fetch fails. Or jwks_file.",
        example="https://sso.example.com/realms/mail/protocol/openid-connect/certs",
    ),
    "oauth.jwks_file": Doc(
        "A JWKS file instead of jwks_url; re-read when it changes.",
        example="/etc/relaygate/jwks.json",
    ),
    "oauth.address_claim": Doc(
        "The claim holding the account's address (email; Entra ID: email, upn or"
        " preferred_username). With email, email_verified = false is refused."
    ),
    "oauth.algorithms": Doc(
        "Signature algorithms a token may use: RS256/384/512, PS256/384/512, ES256, ES384,"
        " EdDSA. HS* and none never (a JWKS holds public keys)."
    ),
    "oauth.leeway": Doc("Seconds of clock difference allowed for exp and nbf (0-300)."),
    "oauth.jwks_refresh": Doc("Seconds between routine fetches of jwks_url."),
    "oauth.jwks_min_interval": Doc(
        "Seconds at least between two fetches, whatever asks (tokens with unknown key ids"
        " cannot make relaygate hammer the provider)."
    ),
    "oauth.scope": Doc(
        'The "scope" named in the error challenge a client gets for a bad token.',
        example="openid email",
    ),
    # [ldap]
    "ldap": Doc(
        "Directory accounts (docs/identity.md): a login name not found among the local accounts"
        " is looked up in this LDAP directory (search with the service account, then a bind as"
        " the user). Not set: local accounts only. Applied at start (a change needs a restart)."
    ),
    "ldap.url": Doc(
        "ldap://host[:port] or ldaps://host[:port].", example="ldap://ldap.example.com"
    ),
    "ldap.bind_dn": Doc(
        "The service account that searches for users.",
        example="cn=relaygate,ou=services,dc=example,dc=com",
    ),
    "ldap.bind_password_file": Doc(
        "File holding the service account's password (read at start, never logged).",
        example="/etc/relaygate/ldap.password",
    ),
    "ldap.base_dn": Doc(
        "Where users are searched (the whole subtree).", example="dc=example,dc=com"
    ),
    "ldap.filter": Doc(
        "Finds the user; {address} is the login name, escaped (RFC 4515). Exactly one entry"
        " must match. Active Directory: (userPrincipalName={address})."
    ),
    "ldap.start_tls": Doc(
        "With ldap://: StartTLS before any bind (false only to a loopback host). ldaps:// is TLS"
        " from the start either way."
    ),
    "ldap.ca_file": Doc(
        "PEM CA certificates the directory's certificate must chain to. Not set: the system's.",
        example="/etc/relaygate/ldap-ca.pem",
    ),
    "ldap.alias_attributes": Doc(
        "Attributes holding more addresses the user may send as, besides mail (AD's"
        " proxyAddresses values lose their smtp: prefix).",
        example=["mailAlternateAddress"],
    ),
    "ldap.disabled_filter": Doc(
        "An entry that also matches this may not log in. Not set: every entry found may."
        " Active Directory: (userAccountControl:1.2.840.113556.1.4.803:=2).",
        example="(pwdAccountLockedTime=*)",
    ),
    "ldap.cache_ttl": Doc(
        "A verified directory login is trusted this long (per worker): a disabled, deleted or"
        " re-passworded directory user loses access within it. Duration: 5m, 30s, 1h."
    ),
    "ldap.timeout": Doc(
        "Whole seconds for each directory operation (connect, StartTLS, bind, search); a login"
        " gives up (454 4.7.0) after three times this."
    ),
    # [verify]
    "verify": Doc(
        "relaygate verify, POST /api/v1/verify and the RCPT-time domain check"
        " (docs/verify.md). DNS goes through [delivery] resolvers, probes to [delivery] mx_port."
        " Results are cached in memory, per process. Reloadable with SIGHUP."
    ),
    "verify.probe_from": Doc(
        "MAIL FROM of SMTP probes (never <>, which many servers refuse). Use a real mailbox"
        " that reads replies; unset: postmaster@ + [server] hostname.",
        example="postmaster@mail.example.com",
    ),
    "verify.cache_ttl": Doc(
        "How long a result, a domain's DNS answer and its catch-all answer are reused."
    ),
    "verify.negative_cache_ttl": Doc(
        "The same for failures (no domain, null MX, DNS timeouts, 4xx): shorter, so a fixed"
        " domain is seen soon."
    ),
    "verify.cache_entries": Doc("Cached entries per process at most; the least recently used go."),
    "verify.per_host": Doc("Probe connections open at once to one MX host."),
    "verify.pace": Doc("Seconds between probe transactions on one connection (be polite)."),
    "verify.rcpts_per_connection": Doc(
        "Addresses probed on one connection (MAIL, RCPT, RSET each) before a new one."
    ),
    "verify.timeout": Doc("Seconds for a probe's connection and for each SMTP reply."),
    "verify.max_api_addresses": Doc(
        "Addresses one POST /api/v1/verify may ask about; more get 400."
    ),
    # [submission]
    "submission": Doc("Checks on mail submitted by logged-in senders. Reloadable with SIGHUP."),
    "submission.check_recipient_domains": Doc(
        "At RCPT, refuse a recipient whose domain does not exist, has a null MX or neither MX"
        " nor address records (550 5.1.2); a DNS timeout gets 451 4.4.3. Saves bounces and"
        " the sending reputation they cost. Answers are cached ([verify] cache_ttl)."
    ),
}

PREFACE = (
    "relaygate.example.toml: every setting, with its default.",
    "",
    "Generated from the configuration types by `relaygate config example`: do not edit it",
    "by hand. As it stands it sets nothing: a line `#key = value` is a setting at its default;",
    "to change one, uncomment it and its #[table] header. Where there is no fixed default the",
    "value is an example, and the description says what applies without it. Relative paths",
    "are relative to the directory of the config file.",
    "",
    "Check a config with `relaygate config check FILE`; see every value in effect with",
    "`relaygate config show FILE` (add --changed for only what differs from the defaults).",
)


def described_keys() -> list[str]:
    """Every table and key of the types, as DOCS names them."""
    keys: list[str] = []
    for section in sections(None):
        keys += [section.doc, *(s.doc for s in section.settings)]
    return list(dict.fromkeys(keys))


def missing() -> list[str]:
    """Keys without a description, or without the example their type cannot give."""
    found = [key for key in described_keys() if key not in DOCS]
    for section in sections(None):
        for s in section.settings:
            if s.doc in DOCS and s.default is None and DOCS[s.doc].example is None:
                found.append(f"{s.doc} (no default: give an example=)")
    return list(dict.fromkeys(found))


def unused() -> list[str]:
    """Descriptions of keys that are no longer there (renamed or removed)."""
    known = set(described_keys())
    return [key for key in DOCS if key not in known]


def example() -> str:
    """The text of relaygate.example.toml."""
    return render_example(sections(None), DOCS, PREFACE)
