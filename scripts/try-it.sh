#!/usr/bin/env bash
# Try Cordon on one Linux machine, as root, without touching its network:
# builds a lab of network namespaces (a bridge in a namespace of its own;
# addresses from 198.18.0.0/15 only; nothing attached to the root namespace),
# starts a server in `srv`, agents in `m1` and `m2`, a web server in `ext`,
# isolates m1, shows what it can and can't reach, and releases it.
# Everything it made is removed when it exits.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces and nftables need it)"; exit 1; }
for tool in ip nsenter curl python3; do
    command -v $tool >/dev/null || { echo "needs $tool"; exit 1; }
done

cargo build --release --bin cordon --bin cordon-agent
BIN=$PWD/target/release
P=cdn-$$
NET=198.18.250
DIR=$(mktemp -d /tmp/cordon-try.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    # Whatever still runs in a lab namespace goes too, then the namespaces.
    for ns in srv m1 m2 ext br; do
        ip netns pids "$P-$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    done
    wait 2>/dev/null || true
    for ns in srv m1 m2 ext br; do ip netns delete "$P-$ns" 2>/dev/null || true; done
    rm -rf "$DIR"
}
trap cleanup EXIT

in_ns() { local ns=$1; shift; nsenter --net=/run/netns/$P-$ns "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

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
PIDS+=($!)
until [ -s "$DIR/server/ca.pem" ] && grep -q "CA file" "$DIR/server.out"; do sleep 0.1; done
cat "$DIR/server.out"
CA=$DIR/server/ca.pem

say "A web server in ext ($NET.4), standing in for the internet"
in_ns ext python3 -m http.server 8080 --bind $NET.4 --directory "$DIR" >/dev/null 2>&1 &
PIDS+=($!)

say "An application and an enroll token"
"$BIN/cordon" app create --data-dir "$DIR/server" --name "Try-it playbook" \
    --permission Machine.Isolate --permission Machine.Read.All --json >"$DIR/app.json"
TENANT=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["tenantId"])' "$DIR/app.json")
CLIENT=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["clientId"])' "$DIR/app.json")
SECRET=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["clientSecret"])' "$DIR/app.json")
ENROLL=$("$BIN/cordon" enroll-token create --data-dir "$DIR/server" --max-uses 2 --json |
    python3 -c 'import json,sys;print(json.load(sys.stdin)["token"])')

say "Agents in m1 and m2"
declare -A MACHINE
for m in m1 m2; do
    MACHINE[$m]=$(in_ns $m "$BIN/cordon-agent" enroll --server https://$NET.1:8443 --token "$ENROLL" \
        --ca-file "$CA" --state-dir "$DIR/$m" --name $m --json |
        python3 -c 'import json,sys;print(json.load(sys.stdin)["machineId"])')
    in_ns $m "$BIN/cordon-agent" run --state-dir "$DIR/$m" --name $m 2>"$DIR/$m.log" &
    PIDS+=($!)
    echo "$m is machine ${MACHINE[$m]}"
done
sleep 1

api() {  # METHOD PATH [BODY]
    in_ns srv curl -s --cacert "$CA" -X "$1" -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: application/json' "https://$NET.1:8443$2" ${3:+-d "$3"}
}
TOKEN=$(in_ns srv curl -s --cacert "$CA" https://$NET.1:8443/$TENANT/oauth2/v2.0/token \
    -d grant_type=client_credentials -d client_id=$CLIENT --data-urlencode client_secret=$SECRET \
    -d scope=https://api.securitycenter.microsoft.com/.default |
    python3 -c 'import json,sys;print(json.load(sys.stdin)["access_token"])')

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
    local id=$1 status=Pending
    while [ "$status" = Pending ] || [ "$status" = InProgress ]; do
        sleep 0.05
        status=$(api GET /api/machineactions/$id | python3 -c 'import json,sys;print(json.load(sys.stdin)["status"])')
    done
    echo "  action $id: $status"
}

say "Before isolation"
reach

say "Isolate m1"
ID=$(api POST /api/machines/${MACHINE[m1]}/isolate '{"Comment":"Try it: suspicious beacon","IsolationType":"Full"}' |
    python3 -c 'import json,sys;print(json.load(sys.stdin)["id"])')
wait_action $ID
reach
echo "  m1's firewall now:"
in_ns m1 nft list table inet cordon 2>/dev/null | sed 's/^/    /' || true

say "Release m1"
ID=$(api POST /api/machines/${MACHINE[m1]}/unisolate '{"Comment":"Try it: all clear"}' |
    python3 -c 'import json,sys;print(json.load(sys.stdin)["id"])')
wait_action $ID
reach

say "The machines as the API shows them"
api GET '/api/machines?$select=computerDnsName,isolationState,healthStatus' | python3 -m json.tool
