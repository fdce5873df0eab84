# Shared settings for the Postfix + Dovecot comparison server (sourced, not run).
# Everything lives under one state directory so it never touches a system-wide
# Postfix or Dovecot that may also be installed on the machine.
BENCH_PF_ROOT="${BENCH_PF_ROOT:-/var/lib/relaygate-bench-postfix}"
BENCH_PF_PORT="${BENCH_PF_PORT:-11587}"
BENCH_PF_USERS="${BENCH_PF_USERS:-100}"
PF_CONF="$BENCH_PF_ROOT/postfix-conf"
PF_QUEUE="$BENCH_PF_ROOT/postfix-queue"
PF_DATA="$BENCH_PF_ROOT/postfix-data"
DC_DIR="$BENCH_PF_ROOT/dovecot"
DC_CONF="$DC_DIR/dovecot.conf"
DC_RUN="$DC_DIR/run"
TLS_DIR="$BENCH_PF_ROOT/tls"
LOG_DIR="$BENCH_PF_ROOT/log"

# port_open PORT: true when something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}
