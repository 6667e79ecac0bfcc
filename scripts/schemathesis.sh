#!/usr/bin/env bash
# Conformance check of the published OpenAPI document: starts a throwaway
# `cordon serve` on loopback, enrolls nothing, creates an application with
# every permission, and lets schemathesis (from PyPI) send generated requests
# to every operation. It fails on any 5xx and on any response that does not
# match the document (status code, content type, headers, body schema), on
# any schema-violating request that is accepted, and on calls that succeed
# without a token. (Not checked: that every schema-valid request succeeds.
# The OData query grammar, opaque `$skiptoken`s and rules such as "printable
# characters" can't be written as JSON Schema, so the server rightly answers
# 400 to many requests the document's schemas allow.)
#
# `GET /events` is left out: it is a server-sent-events stream that stays
# open until the token expires, so every call would only end at the request
# timeout (and schemathesis can't check a body that never ends).
# crates/server/tests/events.rs covers it.
#
#   scripts/schemathesis.sh [MAX_EXAMPLES]   (default 30 examples per operation)
#
# Needs python3 with venv; installs schemathesis into target/schemathesis-venv.
# Set CORDON_BIN to use an already built `cordon` binary.
set -euo pipefail
cd "$(dirname "$0")/.."

max_examples=${1:-30}
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys;print(json.load(sys.stdin)["target_directory"])')
venv="$target_dir/schemathesis-venv"
if [ ! -x "$venv/bin/schemathesis" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'schemathesis==4.32.5'
fi
if [ -z "${CORDON_BIN:-}" ]; then
    cargo build --quiet --locked --bin cordon --bin cordon-agent
    CORDON_BIN="$target_dir/debug/cordon"
fi
AGENT_BIN=${AGENT_BIN:-$(dirname "$CORDON_BIN")/cordon-agent}

work=$(mktemp -d)
server_pid=
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

data="$work/data"
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
# Rate limits off: schemathesis sends far more than 100 calls a minute.
"$CORDON_BIN" serve --data-dir "$data" --listen "127.0.0.1:$port" \
    --rate-limit-per-minute 0 --rate-limit-per-hour 0 >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
    [ -f "$data/ca.pem" ] && curl -s --cacert "$data/ca.pem" -o /dev/null "https://127.0.0.1:$port/api/openapi.json" && break
    if ! kill -0 "$server_pid" 2>/dev/null; then cat "$work/server.log"; echo "the server exited" >&2; exit 1; fi
    sleep 0.2
done

"$CORDON_BIN" app create --data-dir "$data" --name schemathesis --json \
    --permission Machine.Isolate --permission Machine.Read.All \
    --permission Machine.ReadWrite.All >"$work/app.json"
read -r tenant client secret < <(python3 -c '
import json,sys;a=json.load(open(sys.argv[1]));print(a["tenantId"],a["clientId"],a["clientSecret"])' "$work/app.json")
token=$(curl -s --cacert "$data/ca.pem" "https://127.0.0.1:$port/$tenant/oauth2/v2.0/token" \
    -d grant_type=client_credentials -d "client_id=$client" --data-urlencode "client_secret=$secret" \
    -d scope=https://api.securitycenter.microsoft.com/.default |
    python3 -c 'import json,sys;print(json.load(sys.stdin)["access_token"])')

# Two enrolled machines (enrollment only: no agent runs, nothing is enforced),
# so that the machine and action operations have something to act on.
for name in st-one st-two; do
    enroll_token=$("$CORDON_BIN" enroll-token create --data-dir "$data" --json |
        python3 -c 'import json,sys;print(json.load(sys.stdin)["token"])')
    "$AGENT_BIN" enroll --server "https://127.0.0.1:$port" --token "$enroll_token" \
        --ca-file "$data/ca.pem" --state-dir "$work/agent-$name" --name "$name" >/dev/null
done

status=0
REQUESTS_CA_BUNDLE="$data/ca.pem" SSL_CERT_FILE="$data/ca.pem" \
"$venv/bin/schemathesis" --config-file scripts/schemathesis.toml \
    run "https://127.0.0.1:$port/api/openapi.json" \
    --url "https://127.0.0.1:$port/api" \
    --header "Authorization: Bearer $token" \
    --tls-verify "$data/ca.pem" \
    --checks all \
    --exclude-checks positive_data_acceptance \
    --exclude-path /events \
    --max-examples "$max_examples" \
    --seed 1 \
    --workers 1 \
    --request-timeout 10 \
    --no-color || status=$?
if [ "$status" -ne 0 ]; then
    echo "--- server log (last 50 lines)"; tail -50 "$work/server.log"
fi
exit "$status"
