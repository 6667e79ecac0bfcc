#!/usr/bin/env bash
# The console's third-party modules (Preact, its hooks, htm) are committed
# under crates/server/console/vendor/, so that `cargo build` needs no Node.js.
# They are copied unchanged from the npm packages that
# crates/server/console/package-lock.json pins (with their integrity hashes).
#
#   ./scripts/console-vendor.sh          # npm ci, then copy into vendor/
#   ./scripts/console-vendor.sh --check  # npm ci, then fail if vendor/ differs
#
# To move to new versions: edit package.json, run `npm install` in
# crates/server/console, then this script, and commit all three.
set -euo pipefail
cd "$(dirname "$0")/../crates/server/console"
check=false
[ "${1:-}" = --check ] && check=true
npm ci --ignore-scripts --no-audit --no-fund --silent
# source in node_modules -> file in vendor/
files=(
    "preact/dist/preact.mjs preact.mjs"
    "preact/hooks/dist/hooks.mjs hooks.mjs"
    "htm/dist/htm.mjs htm.mjs"
    "preact/LICENSE LICENSE.preact"
    "htm/LICENSE LICENSE.htm"
)
status=0
mkdir -p vendor
for entry in "${files[@]}"; do
    from="node_modules/${entry%% *}"
    to="vendor/${entry##* }"
    if $check; then
        if ! cmp -s "$from" "$to"; then
            echo "$to differs from $from: run ./scripts/console-vendor.sh and commit" >&2
            status=1
        fi
    else
        cp "$from" "$to"
    fi
done
$check && [ $status = 0 ] && echo "console vendor/ matches package-lock.json"
exit $status
