#!/usr/bin/env bash
# Checks scripts/setup.sh's detection against fake file trees, so that the
# trap a fresh machine showed (libclang-cpp present, libclang absent) stays
# caught: libclang-dev must be installed then, and only then.
set -euo pipefail
cd "$(dirname "$0")/.."
fake=$(mktemp -d)
trap 'rm -rf "$fake"' EXIT
passed=0 failed=0
expect() { # expect yes|no DESCRIPTION: whether libclang-dev would be installed
    local out
    out=$(SETUP_ROOT=$fake SETUP_DRY_RUN=1 scripts/setup.sh)
    if grep -qw libclang-dev <<<"$out"; then got=yes; else got=no; fi
    if [ "$got" = "$1" ]; then passed=$((passed + 1)); echo "ok: $2"; else failed=$((failed + 1)); echo "FAILED: $2 ($out)"; fi
}
mkdir -p "$fake/usr/lib/llvm-14/lib"
touch "$fake/usr/lib/llvm-14/lib/libclang-cpp.so.14"
expect yes "only libclang-cpp.so.14: libclang-dev is installed"
touch "$fake/usr/lib/llvm-14/lib/libclang.so.1"
expect yes "libclang.so.1 without clang's stddef.h: libclang-dev is installed"
mkdir -p "$fake/usr/lib/llvm-14/lib/clang/14.0.6/include"
touch "$fake/usr/lib/llvm-14/lib/clang/14.0.6/include/stddef.h"
expect no "libclang.so.1 and clang's headers: nothing to install"
rm "$fake/usr/lib/llvm-14/lib/libclang.so.1"
mkdir -p "$fake/usr/lib/x86_64-linux-gnu"
touch "$fake/usr/lib/x86_64-linux-gnu/libclang-14.so.1"
expect no "libclang-14.so.1 (libclang1-14) found"
echo "setup: $passed passed, $failed failed"
[ "$failed" = 0 ]
