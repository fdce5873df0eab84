#!/usr/bin/env bash
# Smoke test of the container image and compose.yaml, for a machine with Docker
# (CI machines have no Docker daemon; README.md "Run it in a container"):
#   1. build the image and start relaygate + PostgreSQL + Redis (project "relaygate-smoke",
#      host ports on 127.0.0.1 only: 10587, 10465 and 18025 unless SMOKE_*_PORT say otherwise),
#   2. wait until Docker reports the relaygate container healthy (`relaygate health`),
#   3. create an account and submit a message with swaks over STARTTLS,
#   4. find the message with the CLI in the container and through the admin API,
#   5. tear everything down, volumes included (also on failure).
# Needs docker with the compose plugin, swaks and curl. Every wait is bounded.
# Exit status: 0 passed, 1 failed, 2 a tool is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

for tool in docker swaks curl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "smoke: needs $tool" >&2; exit 2; }
done

project=relaygate-smoke
smtp_port=${SMOKE_SMTP_PORT:-10587}
http_port=${SMOKE_HTTP_PORT:-18025}
export RELAYGATE_SUBMISSION_PORT="127.0.0.1:${smtp_port}"
export RELAYGATE_SUBMISSIONS_PORT="127.0.0.1:${SMOKE_SMTPS_PORT:-10465}"
export RELAYGATE_HTTP_PORT="$http_port"
RELAYGATE_DB_PASSWORD="smoke-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
export RELAYGATE_DB_PASSWORD

compose() { docker compose -p "$project" -f compose.yaml "$@"; }
step() { echo "smoke: $*"; }
fail() {
  echo "smoke: FAILED: $*" >&2
  compose logs --no-color --tail 80 relaygate >&2 || true
  exit 1
}
trap 'step "tearing down"; compose down -v --remove-orphans >/dev/null 2>&1 || true' EXIT

step "building the image"
compose build relaygate
step "starting relaygate, postgres, redis"
compose up -d

step "waiting for the healthcheck (at most 180 s)"
container=$(compose ps -q relaygate)
[ -n "$container" ] || fail "no relaygate container"
status=starting
for _ in $(seq 1 90); do
  status=$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$container")
  [ "$status" = healthy ] && break
  [ "$(docker inspect --format '{{.State.Running}}' "$container")" = true ] || fail "relaygate exited"
  sleep 2
done
[ "$status" = healthy ] || fail "relaygate not healthy after 180 s (health: ${status:-none})"
[ "$(docker inspect --format '{{.Config.User}}' "$container")" != root ] || fail "runs as root"

address=smoke@example.test
password="Smoke-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
subject="container smoke $(date +%s)"
step "creating $address"
printf '%s\n' "$password" | compose exec -T relaygate relaygate user add "$address" --password-stdin \
  >/dev/null || fail "user add"

step "sending a message over STARTTLS on 127.0.0.1:${smtp_port}"
swaks --server "127.0.0.1:${smtp_port}" --tls --auth PLAIN \
      --auth-user "$address" --auth-password "$password" \
      --from "$address" --to someone@example.org --header "Subject: $subject" \
      --timeout 30 --silent 2 || fail "swaks could not submit the message"

step "looking for it with the CLI"
found=""
for _ in $(seq 1 20); do
  if compose exec -T relaygate relaygate messages list --json | grep -qF "\"$subject\""; then
    found=yes; break
  fi
  sleep 0.5
done
[ -n "$found" ] || fail "the message is not in 'relaygate messages list'"

step "looking for it through the admin API on 127.0.0.1:${http_port}"
token=$(compose exec -T relaygate relaygate token add smoke --read-only | grep -o 'rgt_[A-Za-z0-9_-]*' | head -1)
[ -n "$token" ] || fail "token add printed no token"
curl -fsS --max-time 10 -H "Authorization: Bearer $token" \
     "http://127.0.0.1:${http_port}/api/v1/messages" | grep -qF "\"$subject\"" \
  || fail "the message is not in GET /api/v1/messages"
curl -fsS --max-time 10 "http://127.0.0.1:${http_port}/login" | grep -q 'name="password"' \
  || fail "the web UI's login page is not served"

step "PASSED"
