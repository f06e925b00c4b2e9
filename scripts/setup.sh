#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test
# st-consolidate-mpi. Idempotent: does nothing when everything is present.
#   OpenMPI (libopenmpi-dev, openmpi-bin): the mpi crate finds it through `mpicc -show`.
#   libclang-dev: bindgen in mpi-sys needs it.
set -euo pipefail

need=()
command -v mpicc >/dev/null 2>&1 || need+=(libopenmpi-dev)
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c "import venv, ensurepip" 2>/dev/null || need+=(python3-venv)

if ((${#need[@]})); then
    echo "setup: installing ${need[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
