#!/usr/bin/env bash
# Try Cordon on one Linux machine, as root, without touching its network:
# builds a lab of network namespaces (a bridge in a namespace of its own;
# addresses from 198.18.0.0/15 only; nothing attached to the root namespace),
# starts a server in `srv`, agents in `m1` and `m2`, a web server in `ext`,
# isolates m1, shows what it can and can't reach, and releases it.
#
#   sudo ./scripts/try-it.sh            run the demo, then remove everything
#   sudo ./scripts/try-it.sh --keep     (or KEEP=1) leave the lab running to explore
#   sudo ./scripts/try-it.sh --down LAB remove a lab left by --keep
#
# The binaries are built with cargo (in CARGO_TARGET_DIR, if set); without
# cargo in root's PATH, set CORDON_BIN_DIR to where cordon and cordon-agent
# are. Each step times out; on failure the logs are shown and kept.
set -euo pipefail
cd "$(dirname "$0")/.."

STEP_TIMEOUT=${STEP_TIMEOUT:-30}
KEEP=${KEEP:-0}
NAMESPACES="srv m1 m2 ext br"

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

# Stops whatever runs in the lab's namespaces, then removes them.
teardown() { # LAB
    local lab=$1 ns
    for ns in $NAMESPACES; do
        ip netns pids "$lab-$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    done
    sleep 0.2
    for ns in $NAMESPACES; do
        ip netns pids "$lab-$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns delete "$lab-$ns" 2>/dev/null || true
    done
}

case "${1:-}" in
-h | --help)
    usage
    exit 0
    ;;
--keep)
    KEEP=1
    shift
    ;;
--down)
    [ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
    lab=${2:?"--down needs the lab's name, such as cordon-try-12345 (printed by --keep)"}
    [[ $lab =~ ^cordon-try-[0-9]+$ ]] || { echo "'$lab' is not a lab name such as cordon-try-12345" >&2; exit 1; }
    ip netns list | grep -q "^$lab-" || echo "no namespaces of $lab are left"
    teardown "$lab"
    dir=$(cat "/run/$lab.dir" 2>/dev/null || true)
    [ -n "$dir" ] && [[ $dir == /tmp/cordon-try.* ]] && rm -rf "$dir"
    rm -f "/run/$lab.dir"
    echo "removed $lab"
    exit 0
    ;;
"") ;;
*)
    echo "unknown argument '$1'" >&2
    usage >&2
    exit 2
    ;;
esac

[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces and nftables need it)" >&2; exit 1; }
for tool in ip nsenter curl python3 timeout; do
    command -v $tool >/dev/null || { echo "needs $tool" >&2; exit 1; }
done

# The binaries: built here, found where cargo puts them.
if [ -n "${CORDON_BIN_DIR:-}" ]; then
    BIN=$CORDON_BIN_DIR
elif command -v cargo >/dev/null; then
    cargo build --release --bin cordon --bin cordon-agent
    TARGET=$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json,sys;print(json.load(sys.stdin)["target_directory"])')
    BIN=$TARGET/release
else
    BIN=$PWD/target/release
fi
for exe in cordon cordon-agent; do
    if [ ! -x "$BIN/$exe" ]; then
        echo "no $BIN/$exe. Build as yourself first:" >&2
        echo "  cargo build --release --bin cordon --bin cordon-agent" >&2
        echo "then run this again with CORDON_BIN_DIR=<target dir>/release if it is not ./target" >&2
        exit 1
    fi
done

# Not `cdn-<pid>-`: the lab crate's tests remove such namespaces once their
# process is gone, which would take a lab kept by --keep.
P=cordon-try-$$
NET=198.18.250
DIR=$(mktemp -d /tmp/cordon-try.XXXXXX)
echo "$DIR" >"/run/$P.dir"
SERVER_PID=

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() {
    echo "FAILED: $*" >&2
    exit 1
}

show_logs() {
    local log
    for log in "$DIR"/server.log "$DIR"/m1.log "$DIR"/m2.log; do
        [ -s "$log" ] || continue
        printf '\n--- %s (last 40 lines) ---\n' "$log" >&2
        tail -n 40 "$log" >&2
    done
}

finish() {
    local status=$?
    if [ "$status" != 0 ]; then
        show_logs
        teardown "$P"
        rm -f "/run/$P.dir"
        echo >&2
        echo "The lab is removed; its logs are kept in $DIR" >&2
    elif [ "$KEEP" = 1 ]; then
        explore
    else
        teardown "$P"
        rm -rf "$DIR" "/run/$P.dir"
    fi
}
trap finish EXIT

in_ns() { local ns=$1; shift; nsenter --net=/run/netns/$P-$ns "$@"; }

ip netns add $P-br
ip -n $P-br link add br0 type bridge
ip -n $P-br link set br0 up
host() {
    ip netns add $P-$1
    ip -n $P-$1 link set lo up
    ip -n $P-$1 link add eth0 type veth peer name $1 netns $P-br
    ip -n $P-br link set $1 master br0 up
    ip -n $P-$1 addr add $NET.$2/24 dev eth0
    ip -n $P-$1 link set eth0 up
}
host srv 1; host m1 2; host m2 3; host ext 4

say "Server in srv ($NET.1)"
in_ns srv "$BIN/cordon" serve --data-dir "$DIR/server" --listen 0.0.0.0:8443 \
    --public-url https://$NET.1:8443 --tls-san $NET.1 >"$DIR/server.out" 2>"$DIR/server.log" &
SERVER_PID=$!
deadline=$((SECONDS + STEP_TIMEOUT))
until [ -s "$DIR/server/ca.pem" ] && grep -q "CA file" "$DIR/server.out"; do
    kill -0 $SERVER_PID 2>/dev/null || fail "the server exited at start"
    [ $SECONDS -lt $deadline ] || fail "the server did not start within ${STEP_TIMEOUT}s"
    sleep 0.1
done
cat "$DIR/server.out"
CA=$DIR/server/ca.pem

say "A web server in ext ($NET.4), standing in for the internet"
in_ns ext python3 -m http.server 8080 --bind $NET.4 --directory "$DIR" >/dev/null 2>&1 &

json() { python3 -c 'import json,sys;print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

say "An application and an enroll token"
"$BIN/cordon" app create --data-dir "$DIR/server" --name "Try-it playbook" \
    --permission Machine.Isolate --permission Machine.Read.All --json >"$DIR/app.json"
TENANT=$(json tenantId <"$DIR/app.json")
CLIENT=$(json clientId <"$DIR/app.json")
SECRET=$(json clientSecret <"$DIR/app.json")
ENROLL=$("$BIN/cordon" enroll-token create --data-dir "$DIR/server" --max-uses 2 --json | json token)

say "Agents in m1 and m2"
declare -A MACHINE
for m in m1 m2; do
    MACHINE[$m]=$(in_ns $m timeout $STEP_TIMEOUT "$BIN/cordon-agent" enroll \
        --server https://$NET.1:8443 --token "$ENROLL" \
        --ca-file "$CA" --state-dir "$DIR/$m" --name $m --json 2>"$DIR/$m.log" |
        json machineId) || fail "$m could not enroll"
    in_ns $m "$BIN/cordon-agent" run --state-dir "$DIR/$m" >/dev/null 2>>"$DIR/$m.log" &
    echo "$m is machine ${MACHINE[$m]}"
done

api() { # METHOD PATH [BODY]
    in_ns srv curl -sS -m 10 --cacert "$CA" -X "$1" -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: application/json' "https://$NET.1:8443$2" ${3:+-d "$3"}
}
TOKEN=$(in_ns srv curl -sS -m 10 --cacert "$CA" https://$NET.1:8443/$TENANT/oauth2/v2.0/token \
    -d grant_type=client_credentials -d client_id=$CLIENT --data-urlencode client_secret=$SECRET \
    -d scope=https://api.securitycenter.microsoft.com/.default | json access_token)

reach() {
    for m in m1 m2; do
        if in_ns $m curl -s -m 2 -o /dev/null http://$NET.4:8080/; then
            echo "  $m -> ext: reachable"
        else
            echo "  $m -> ext: CUT"
        fi
    done
}
wait_action() {
    local id=$1 status=Pending deadline=$((SECONDS + STEP_TIMEOUT))
    while [ "$status" = Pending ] || [ "$status" = InProgress ]; do
        [ $SECONDS -lt $deadline ] || fail "action $id is still $status after ${STEP_TIMEOUT}s"
        sleep 0.05
        status=$(api GET /api/machineactions/$id | json status) || status=Pending
    done
    echo "  action $id: $status"
    [ "$status" = Succeeded ] || fail "action $id ended $status"
}

say "Before isolation"
reach

say "Isolate m1"
ID=$(api POST /api/machines/${MACHINE[m1]}/isolate '{"Comment":"Try it: suspicious beacon","IsolationType":"Full"}' |
    json id)
wait_action $ID
reach
echo "  m1's firewall now:"
in_ns m1 nft list table inet cordon 2>/dev/null | sed 's/^/    /' || true

say "Release m1"
ID=$(api POST /api/machines/${MACHINE[m1]}/unisolate '{"Comment":"Try it: all clear"}' | json id)
wait_action $ID
reach

say "The machines as the API shows them"
api GET '/api/machines?$select=computerDnsName,isolationState,healthStatus' | python3 -m json.tool

explore() {
    cat >"$DIR/env.sh" <<ENV
# Source this to explore the lab: . $DIR/env.sh
export CORDON_DATA_DIR=$DIR/server
CA=$CA
TOKEN=$TOKEN
M1=${MACHINE[m1]}
M2=${MACHINE[m2]}
in_ns() { local ns=\$1; shift; nsenter --net=/run/netns/$P-\$ns "\$@"; }
api() { in_ns srv curl -sS --cacert "\$CA" -X "\$1" -H "Authorization: Bearer \$TOKEN" \\
    -H 'Content-Type: application/json' "https://$NET.1:8443\$2" \${3:+-d "\$3"}; echo; }
ENV
    say "The lab $P is still running"
    cat <<TEXT
Server: https://$NET.1:8443 in namespace $P-srv (log: $DIR/server.log)
Agents: $P-m1 (machine ${MACHINE[m1]}), $P-m2 (machine ${MACHINE[m2]}); logs in $DIR
Web server: http://$NET.4:8080 in $P-ext

As root, in this shell:
  . $DIR/env.sh                             # CA, TOKEN (valid an hour), M1, M2, in_ns, api
  api POST /api/machines/\$M1/isolate '{"Comment":"again","IsolationType":"Full"}'
  api GET "/api/machineactions?\\\$filter=machineId%20eq%20'\$M1'"
  in_ns m1 curl -m 2 http://$NET.4:8080/      # cut while m1 is isolated
  in_ns m1 $BIN/cordon-agent status --state-dir $DIR/m1
  $BIN/cordon machine list                   # admin commands use CORDON_DATA_DIR

When done, remove everything:
  sudo $0 --down $P
TEXT
}
