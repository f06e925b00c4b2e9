#!/usr/bin/env bash
# Fuzzes the safetensors header parser with cargo-fuzz (libFuzzer) for
# SECONDS (default 20). cargo-fuzz needs rustc's nightly-only sanitizer flags;
# this machine has only the stable toolchain, so RUSTC_BOOTSTRAP=1 lets stable
# rustc accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --quiet --locked cargo-fuzz --version 0.13.2
RUSTC_BOOTSTRAP=1 cargo fuzz run header -- -max_total_time="$seconds" 2>&1 | tail -n 3
