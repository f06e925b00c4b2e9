#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks. Idempotent: installs nothing
# when everything is present.
#
#   scripts/setup.sh          build and run: OpenMPI, libclang (for the mpi crate's bindgen), python3
#   scripts/setup.sh --all    also what the tests and benchmarks use: MPICH, Slurm, python3-venv, GNU time
#
# The mpi crate finds OpenMPI through `mpicc -show`; Debian keeps mpicc
# pointing at OpenMPI when MPICH is installed beside it.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have mpicc.openmpi || need+=(libopenmpi-dev)
have mpirun.openmpi || need+=(openmpi-bin)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
have python3 || need+=(python3)
if [ "${1:-}" = "--all" ]; then
    have mpicc.mpich || need+=(libmpich-dev)
    have mpiexec.mpich || need+=(mpich)
    have slurmctld || need+=(slurm-wlm)
    [ -x /usr/bin/time ] || need+=(time)
    python3 -c "import venv, ensurepip" 2>/dev/null || need+=(python3-venv)
fi

if ((${#need[@]})); then
    echo "setup: installing ${need[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
have cargo || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
