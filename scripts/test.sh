#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit and property tests,
# and the end-to-end tests of the real binary under mpirun.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --release -- -D warnings
echo "== cargo test"
cargo test --release
echo "== demo"
scripts/demo.sh >/dev/null
echo "all tests passed"
