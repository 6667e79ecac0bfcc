#!/usr/bin/env bash
# The test command of README.md, for a fresh machine with only Rust:
#
#   ./scripts/test.sh [--setup-only] [CARGO TEST ARGUMENTS...]
#
# Checks what the build and the tests need. What is missing is installed when
# run as root on Debian/Ubuntu (apt-get) or Fedora/RHEL (dnf); otherwise the
# script says exactly what to install and exits with status 1. Then it runs
# `cargo test --workspace --locked` with any further arguments (a `-p`/
# `--package` argument replaces `--workspace`). With --setup-only it stops
# after the set-up (.ci/run uses that before clippy).
#
# Needed to build: a C compiler (cc), pkg-config, and the development files
# of libnftnl and libmnl (the nft crate links libnftnl; see ARCHITECTURE.md).
# Needed by the network-namespace lab tests, which run only as root: ip
# (iproute2), nsenter and unshare (util-linux), nft (nftables), and curl (the
# Selective-isolation test copies it as the application to exclude).
# Needed by the console's browser tests (crates/server/tests/console.rs):
# Chromium (/usr/bin/chromium), Node.js 20 or later with npm, and the npm
# packages of crates/server/tests/console, which this script installs with
# `npm ci` when they are missing or older than its package-lock.json.
# Without them those tests say they were skipped, except under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
-h | --help)
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
    echo "(Other arguments are passed to cargo test; `cargo test --help` lists them.)"
    exit 0
    ;;
esac
setup_only=false
args=()
for arg in "$@"; do
    if [ "$arg" = --setup-only ]; then
        setup_only=true
    else
        args+=("$arg")
    fi
done
set -- ${args[@]+"${args[@]}"}

if ! command -v cargo >/dev/null; then
    echo "cargo is missing: install Rust first (https://rustup.rs)" >&2
    exit 1
fi

is_root=false
[ "$(id -u)" = 0 ] && is_root=true

# Each check: a test, the Debian package, the Fedora package.
build_missing=() # "debian fedora"
lab_missing=()
have() { command -v "$1" >/dev/null 2>&1; }
has_lib() { have pkg-config && pkg-config --exists "$1"; }
have cc || build_missing+=("gcc gcc")
have pkg-config || build_missing+=("pkg-config pkgconf-pkg-config")
has_lib libnftnl || build_missing+=("libnftnl-dev libnftnl-devel")
has_lib libmnl || build_missing+=("libmnl-dev libmnl-devel")
have ip || lab_missing+=("iproute2 iproute")
have nsenter && have unshare || lab_missing+=("util-linux util-linux")
have nft || lab_missing+=("nftables nftables")
have curl || lab_missing+=("curl curl")
browser_missing=()
have chromium || have chromium-browser || browser_missing+=("chromium chromium")
have node || browser_missing+=("nodejs nodejs")
have npm || browser_missing+=("npm npm")

# The lab tests are skipped unless root, so their tools matter only to
# root; so are the browser tests' (elsewhere they are named below).
wanted=("${build_missing[@]}")
$is_root && wanted+=("${lab_missing[@]}" "${browser_missing[@]}")

packages() { # debian|fedora
    local column=$1 entry
    for entry in "${wanted[@]}"; do
        if [ "$column" = debian ]; then echo -n "${entry%% *} "; else echo -n "${entry##* } "; fi
    done
}

if [ ${#wanted[@]} -gt 0 ]; then
    if $is_root && have apt-get; then
        echo "Installing: $(packages debian)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2046
        apt-get install -y -qq --no-install-recommends ca-certificates $(packages debian)
    elif $is_root && have dnf; then
        echo "Installing: $(packages fedora)"
        # shellcheck disable=SC2046
        dnf install -y $(packages fedora)
    else
        echo "Missing to build and test Cordon:" >&2
        for entry in "${wanted[@]}"; do echo "  ${entry%% *}" >&2; done
        echo "Install them, then run this again:" >&2
        echo "  Debian/Ubuntu: sudo apt-get install -y $(packages debian)" >&2
        echo "  Fedora/RHEL:   sudo dnf install -y $(packages fedora)" >&2
        exit 1
    fi
fi
if ! $is_root; then
    echo "Not root: the network-namespace lab tests will say they were skipped" \
        "(run as root to include them)."
fi

# The browser tests' npm packages, exactly as locked.
console_tests=crates/server/tests/console
if ! $is_root && [ ${#browser_missing[@]} -gt 0 ]; then
    echo "The console's browser tests will say they were skipped: they need" \
        "$(for e in "${browser_missing[@]}"; do echo -n "${e%% *} "; done)(Debian packages;" \
        "run this as root to install them, then again as you)."
elif have node && [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
    echo "The console's browser tests need Node.js 20 or later (found $(node --version));" \
        "until it is installed they say they were skipped (they fail under CI=true)."
elif [ ! -f "$console_tests/node_modules/.package-lock.json" ] ||
    [ "$console_tests/package-lock.json" -nt "$console_tests/node_modules/.package-lock.json" ] ||
    [ "$console_tests/package.json" -nt "$console_tests/node_modules/.package-lock.json" ]; then
    echo "Installing the browser tests' npm packages (npm ci in $console_tests)"
    (cd "$console_tests" && npm ci --ignore-scripts --no-audit --no-fund)
fi
$setup_only && exit 0

workspace=(--workspace)
for arg in "$@"; do
    case $arg in
    -p | --package | --package=* | -p?*) workspace=() ;;
    --) break ;;
    esac
done
exec cargo test "${workspace[@]}" --locked "$@"
