#!/usr/bin/env bash
# Install Postfix + Dovecot from Debian's packages and configure a private
# instance of each: an authenticated submission server on 127.0.0.1:11587
# (STARTTLS), SASL through Dovecot, one passwd-file user per address, every
# accepted message delivered to discard: (nothing leaves the machine).
# Safe to run again: configuration is rewritten, the certificate and the user
# list are kept while they match.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
. "$here/common.sh"

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: must run as root (installs packages, runs Postfix)" >&2
    exit 1
fi

# ---------------------------------------------------------------- packages
need_install=0
for pkg in postfix dovecot-core openssl; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        need_install=1
    fi
done
if [ "$need_install" -eq 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    printf '%s\n' \
        'postfix postfix/main_mailer_type select No configuration' \
        'postfix postfix/mailname string bench.example.test' | debconf-set-selections
    # Keep the packages' own services from starting during the install.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    cleanup_policy() { if [ "$made_policy" -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; fi; }
    trap cleanup_policy EXIT
    timeout 600 apt-get update -q
    timeout 900 apt-get install -y -q --no-install-recommends postfix dovecot-core openssl
    cleanup_policy
    trap - EXIT
fi

# ---------------------------------------------------------------- directories
install -d -m 755 -o root -g root "$BENCH_PF_ROOT" "$PF_CONF" "$PF_QUEUE" "$DC_DIR" "$TLS_DIR" "$LOG_DIR"
install -d -m 700 -o postfix -g postfix "$PF_DATA"
install -d -m 755 -o root -g root "$DC_RUN"

# ---------------------------------------------------------------- certificate
# Self-signed ECDSA P-256, made once.
if [ ! -s "$TLS_DIR/cert.pem" ] || [ ! -s "$TLS_DIR/key.pem" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -days 3650 -subj "/CN=bench.example.test" \
        -keyout "$TLS_DIR/key.pem" -out "$TLS_DIR/cert.pem" 2>/dev/null
fi
chmod 600 "$TLS_DIR/key.pem"
chmod 644 "$TLS_DIR/cert.pem"

# ---------------------------------------------------------------- users
# passwd-file for Dovecot (SHA512-CRYPT) and the sender login map for Postfix.
users_file="$DC_DIR/users"
stamp="$DC_DIR/users.count"
if [ ! -s "$users_file" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$BENCH_PF_USERS" ]; then
    tmp="$(mktemp "$DC_DIR/users.XXXXXX")"
    # One openssl process hashes every password (one per input line).
    for i in $(seq 1 "$BENCH_PF_USERS"); do printf 'pw-user%s-bench\n' "$i"; done \
        | openssl passwd -6 -stdin > "$tmp.hashes"
    i=0
    while IFS= read -r hash; do
        i=$((i + 1))
        printf 'user%s@example.test:{SHA512-CRYPT}%s\n' "$i" "$hash"
    done < "$tmp.hashes" > "$tmp"
    rm -f "$tmp.hashes"
    mv "$tmp" "$users_file"
    echo "$BENCH_PF_USERS" > "$stamp"
fi
chown root:dovecot "$users_file"
chmod 640 "$users_file"
for i in $(seq 1 "$BENCH_PF_USERS"); do
    printf 'user%s@example.test user%s@example.test\n' "$i" "$i"
done > "$PF_CONF/sender_logins"

# ---------------------------------------------------------------- dovecot (auth only)
cat > "$DC_CONF" <<CONF
# Dovecot used only as the SASL back end of the bench Postfix.
base_dir = $DC_RUN
state_dir = $DC_DIR/state
instance_name = relaygate-bench
protocols =
ssl = no
log_path = $LOG_DIR/dovecot.log
default_login_user = dovenull
default_internal_user = dovecot
auth_mechanisms = plain login
disable_plaintext_auth = no
passdb {
  driver = passwd-file
  args = scheme=SHA512-CRYPT username_format=%u $users_file
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}
service auth {
  unix_listener $PF_QUEUE/private/auth {
    mode = 0660
    user = postfix
    group = postfix
  }
}
CONF
install -d -m 750 -o root -g root "$DC_DIR/state"

# ---------------------------------------------------------------- postfix
cat > "$PF_CONF/main.cf" <<CONF
# Private Postfix instance for relaygate's benchmark comparison.
compatibility_level = 3.6
queue_directory = $PF_QUEUE
data_directory = $PF_DATA
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.example.test
mydomain = example.test
myorigin = \$myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
mydestination =
local_recipient_maps =
relay_domains =
relayhost =
default_transport = discard:
relay_transport = discard:
local_transport = discard:
virtual_transport = discard:
maillog_file = $LOG_DIR/postfix.log
biff = no
smtpd_banner = \$myhostname ESMTP
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_tls_chain_files = $TLS_DIR/key.pem, $TLS_DIR/cert.pem
smtpd_tls_protocols = >=TLSv1.2
smtpd_tls_mandatory_protocols = >=TLSv1.2
smtpd_tls_loglevel = 0
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = private/auth
smtpd_sasl_security_options = noanonymous
smtpd_sender_login_maps = texthash:$PF_CONF/sender_logins
smtpd_client_restrictions =
smtpd_helo_restrictions =
smtpd_sender_restrictions = reject_sender_login_mismatch
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
CONF

cat > "$PF_CONF/master.cf" <<CONF
# service            type  private unpriv chroot wakeup maxproc command
127.0.0.1:$BENCH_PF_PORT inet n    -      n      -      -       smtpd
pickup               unix  n       -      n      60     1       pickup
cleanup              unix  n       -      n      -      0       cleanup
qmgr                 unix  n       -      n      300    1       qmgr
tlsmgr               unix  -       -      n      1000?  1       tlsmgr
rewrite              unix  -       -      n      -      -       trivial-rewrite
bounce               unix  -       -      n      -      0       bounce
defer                unix  -       -      n      -      0       bounce
trace                unix  -       -      n      -      0       bounce
verify               unix  -       -      n      -      1       verify
flush                unix  n       -      n      1000?  0       flush
proxymap             unix  -       -      n      -      -       proxymap
proxywrite           unix  -       -      n      -      1       proxymap
showq                unix  n       -      n      -      -       showq
error                unix  -       -      n      -      -       error
retry                unix  -       -      n      -      -       error
discard              unix  -       -      n      -      -       discard
anvil                unix  -       -      n      -      1       anvil
scache               unix  -       -      n      -      1       scache
postlog              unix-dgram n  -      n      -      1       postlogd
CONF

postfix -c "$PF_CONF" set-permissions >/dev/null 2>&1 || true
postfix -c "$PF_CONF" check
echo "setup.sh: Postfix + Dovecot configured under $BENCH_PF_ROOT (port $BENCH_PF_PORT); start with start.sh"
