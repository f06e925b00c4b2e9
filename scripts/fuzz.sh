#!/usr/bin/env bash
# Fuzzes the two parsers of untrusted input with cargo-fuzz (libFuzzer),
# SECONDS each (default 20): the safetensors header parser and the pickle
# interpreter behind DCP's .metadata and data.pkl. cargo-fuzz needs rustc's
# nightly-only sanitizer flags; this machine has only the stable toolchain,
# so RUSTC_BOOTSTRAP=1 lets stable rustc accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --quiet --locked cargo-fuzz --version 0.13.2
# The pickle target starts from fuzz/seeds/pickle too: small .metadata
# pickles sharing parts through the memo (scripts/make_fuzz_seeds.py); new
# inputs go to the first, uncommitted corpus folder.
for target in header pickle; do
    echo "fuzz $target:"
    seeds=()
    [ -d "fuzz/seeds/$target" ] && seeds=("fuzz/corpus/$target" "fuzz/seeds/$target")
    mkdir -p "fuzz/corpus/$target"
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "${seeds[@]}" -- -max_total_time="$seconds" 2>&1 | tail -n 3
done
