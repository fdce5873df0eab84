#!/usr/bin/env bash
# Start the bench Postfix + Dovecot (configured by setup.sh) and wait, at most
# 30 seconds, until 127.0.0.1:$BENCH_PF_PORT accepts connections.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
. "$here/common.sh"

if [ ! -f "$PF_CONF/main.cf" ] || [ ! -f "$DC_CONF" ]; then
    echo "start.sh: not configured; run setup.sh first" >&2
    exit 1
fi

if [ -f "$DC_RUN/master.pid" ] && kill -0 "$(cat "$DC_RUN/master.pid")" 2>/dev/null; then
    echo "start.sh: dovecot already running"
else
    dovecot -c "$DC_CONF" </dev/null
fi

if postfix -c "$PF_CONF" status >/dev/null 2>&1; then
    echo "start.sh: postfix already running"
else
    postfix -c "$PF_CONF" start </dev/null
fi

for _ in $(seq 1 60); do
    if port_open "$BENCH_PF_PORT" && [ -S "$PF_QUEUE/private/auth" ]; then
        echo "start.sh: Postfix submission on 127.0.0.1:$BENCH_PF_PORT (STARTTLS)"
        exit 0
    fi
    sleep 0.5
done
echo "start.sh: 127.0.0.1:$BENCH_PF_PORT did not open within 30 s; see $LOG_DIR" >&2
exit 1
