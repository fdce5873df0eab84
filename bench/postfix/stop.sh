#!/usr/bin/env bash
# Stop the bench Postfix + Dovecot; waits at most 20 seconds for each.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
. "$here/common.sh"

if [ -f "$PF_CONF/main.cf" ] && postfix -c "$PF_CONF" status >/dev/null 2>&1; then
    timeout 20 postfix -c "$PF_CONF" stop
fi

pidfile="$DC_RUN/master.pid"
if [ -f "$pidfile" ]; then
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop.sh: dovecot ($pid) still running after 20 s" >&2
            exit 1
        fi
    fi
fi
echo "stop.sh: stopped"
