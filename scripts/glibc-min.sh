#!/usr/bin/env bash
# The oldest glibc each binary runs on: the newest GLIBC_x.y symbol version
# it links against (objdump -T, from binutils).
#
#   scripts/glibc-min.sh target/release/cordon target/release/cordon-agent
set -euo pipefail
if [ "$#" -eq 0 ]; then
    echo "usage: $0 BINARY..." >&2
    exit 2
fi
for binary in "$@"; do
    newest=$(objdump -T "$binary" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/^GLIBC_//' |
        sort -t. -k1,1n -k2,2n -k3,3n -u | tail -n 1)
    echo "$binary: needs glibc ${newest:-?} or newer"
done
