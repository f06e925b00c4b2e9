#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks. Idempotent: installs nothing
# when everything is present.
#
#   scripts/setup.sh          build and run: OpenMPI, libclang (for the mpi crate's bindgen), python3
#   scripts/setup.sh --all    also what the tests and benchmarks use: MPICH, Slurm, python3-venv, GNU time
#
# Each check looks for the file the build or run actually uses, not for a
# neighbour of it: many machines carry libclang-cpp (a different library)
# without libclang, and an MPI launcher without the headers the build needs.
# The mpi crate finds OpenMPI through `mpicc -show`; Debian keeps mpicc
# pointing at OpenMPI when MPICH is installed beside it.
#
# SETUP_ROOT (default: /) and SETUP_DRY_RUN=1 let scripts/test-setup.sh check
# the detection against a fake file tree: it then prints what it would install.
set -euo pipefail

root=${SETUP_ROOT:-}
need=()
have() { command -v "$1" >/dev/null 2>&1; }

# What clang-sys (bindgen's loader) accepts: libclang.so, libclang-*.so,
# libclang.so.*, libclang-*.so.* -- but never libclang-cpp*, which is the C++
# API library and cannot be loaded by bindgen. bindgen also needs clang's own
# resource headers (stddef.h), which come with libclang-dev.
has_libclang() {
    local dir lib
    for dir in "$root"/usr/lib/llvm-*/lib "$root"/usr/lib/x86_64-linux-gnu "$root"/usr/lib64 "$root"/usr/local/lib ${LIBCLANG_PATH:-}; do
        for lib in "$dir"/libclang.so "$dir"/libclang-*.so "$dir"/libclang.so.* "$dir"/libclang-*.so.*; do
            case "${lib##*/}" in libclang-cpp*) continue ;; esac
            [ -e "$lib" ] && return 0
        done
    done
    return 1
}
has_clang_headers() { compgen -G "$root/usr/lib/llvm-*/lib/clang/*/include/stddef.h" >/dev/null; }

# mpi.h and the wrapper compiler come from different packages.
has_openmpi_dev() { have mpicc.openmpi && compgen -G "$root/usr/lib/*/openmpi/include/mpi.h" >/dev/null; }
has_mpich_dev() { have mpicc.mpich && compgen -G "$root/usr/include/*/mpich/mpi.h" >/dev/null; }

has_openmpi_dev || need+=(libopenmpi-dev)
have mpirun.openmpi || need+=(openmpi-bin)
{ has_libclang && has_clang_headers; } || need+=(libclang-dev)
have python3 || need+=(python3)
if [ "${1:-}" = "--all" ]; then
    has_mpich_dev || need+=(libmpich-dev)
    have mpiexec.mpich || need+=(mpich)
    { have slurmctld && have slurmd && have srun; } || need+=(slurm-wlm)
    [ -x /usr/bin/time ] || need+=(time)
    python3 -c "import venv, ensurepip" 2>/dev/null || need+=(python3-venv)
fi

if [ "${SETUP_DRY_RUN:-0}" = 1 ]; then
    echo "would install: ${need[*]}"
    exit 0
fi
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
has_libclang || { echo "setup: libclang still not found after installing libclang-dev" >&2; exit 1; }
have cargo || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
