#!/usr/bin/env bash
# Launcher tests, run by scripts/test.sh: a real local Slurm cluster (sbatch,
# srun --mpi=pmix with OpenMPI, srun --mpi=pmi2 with MPICH, the wrong-plugin
# case), MPICH's mpiexec, and 64 OpenMPI ranks. Each output is checked
# against the checkpoint's manifest. The cluster is taken down on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --all
source scripts/env.sh
cargo build --release --quiet --workspace --bins
MPICC=mpicc.mpich CARGO_TARGET_DIR=target/mpich cargo build --release --quiet --bin st-consolidate-mpi
openmpi_bin=$PWD/target/release/st-consolidate-mpi
mpich_bin=$PWD/target/mpich/release/st-consolidate-mpi

work=$(mktemp -d)
export SLURM_LOCAL_DIR=$work/slurm
cleanup() {
    scripts/slurm-local.sh down >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "ok: $1"; }
fail() { failed=$((failed + 1)); echo "FAILED: $1"; shift; printf '%s\n' "$@" | tail -n 20 | sed 's/^/    /'; }
# Checks an output folder against the manifest of a checkpoint.
matches() { python3 scripts/check_manifest.py "$1" "$2/manifest.json" >/dev/null; }

ckpt=$work/ckpt
target/release/st-make-shards "$ckpt" --layout mixed --ranks 4 --files 4 --layers 4 --hidden 48 --vocab 500 2>/dev/null

scripts/slurm-local.sh up
export SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf

# 1. sbatch --wait with the job template, 4 tasks.
log=$work/sbatch.log
if ST_CONSOLIDATE=$openmpi_bin sbatch --wait --ntasks=4 --output="$log" \
        slurm/consolidate.sbatch "$ckpt" "$work/out-sbatch" "$ckpt/mapping.json" >/dev/null &&
    matches "$work/out-sbatch" "$ckpt" && grep -q "on 4 ranks" "$log"; then
    pass "sbatch --wait slurm/consolidate.sbatch: 4 ranks, outputs match the manifest"
else
    fail "sbatch --wait slurm/consolidate.sbatch" "$(cat "$log" 2>/dev/null)"
fi

# 2. srun --mpi=pmix with the OpenMPI build.
if out=$(srun -n 4 --mpi=pmix "$openmpi_bin" --mapping "$ckpt/mapping.json" "$ckpt" "$work/out-pmix" 2>&1) &&
    matches "$work/out-pmix" "$ckpt" && grep -q "on 4 ranks" <<<"$out"; then
    pass "srun -n 4 --mpi=pmix (OpenMPI)"
else
    fail "srun -n 4 --mpi=pmix (OpenMPI)" "$out"
fi

# 3. srun --mpi=pmi2 with the MPICH build.
if out=$(srun -n 4 --mpi=pmi2 "$mpich_bin" --mapping "$ckpt/mapping.json" "$ckpt" "$work/out-pmi2" 2>&1) &&
    matches "$work/out-pmi2" "$ckpt" && grep -q "on 4 ranks" <<<"$out"; then
    pass "srun -n 4 --mpi=pmi2 (MPICH)"
else
    fail "srun -n 4 --mpi=pmi2 (MPICH)" "$out"
fi

# 4. The wrong plugin: MPICH under pmix gives 4 singletons. It must fail
#    loudly, once, naming the fix, and write nothing.
if out=$(srun -n 4 --mpi=pmix "$mpich_bin" --mapping "$ckpt/mapping.json" "$ckpt" "$work/out-wrong" 2>&1); then
    fail "wrong plugin must fail" "$out"
elif [ "$(grep -c "^st-consolidate-mpi: error:" <<<"$out")" = 1 ] && grep -q -- "--mpi=pmi2" <<<"$out" &&
    grep -q "SLURM_STEP_NUM_TASKS=4" <<<"$out" && ! ls "$work/out-wrong"/model* >/dev/null 2>&1; then
    pass "srun --mpi=pmix with MPICH fails once, naming --mpi=pmi2, writing nothing"
else
    fail "wrong plugin message" "$out"
fi

# 5. MPICH's own launcher.
if out=$(mpiexec.mpich -n 4 "$mpich_bin" --mapping "$ckpt/mapping.json" "$ckpt" "$work/out-mpich" 2>&1) &&
    matches "$work/out-mpich" "$ckpt" && grep -q "on 4 ranks" <<<"$out"; then
    pass "mpiexec.mpich -n 4 (MPICH)"
else
    fail "mpiexec.mpich -n 4 (MPICH)" "$out"
fi
scripts/slurm-local.sh down >/dev/null

# 6. 64 OpenMPI ranks, one thread each, on a checkpoint with 24 output files.
big=$work/ckpt24
target/release/st-make-shards "$big" --layout 2d --ranks 16 --files 24 --layers 24 --hidden 32 --vocab 300 2>/dev/null
if out=$(mpirun -n 64 --oversubscribe "$openmpi_bin" --threads 1 --mapping "$big/mapping.json" "$big" "$work/out-64" 2>&1) &&
    matches "$work/out-64" "$big" && grep -q "into 24 files on 64 ranks x 1 thread" <<<"$out"; then
    pass "mpirun -n 64 --threads 1, 24 output files"
else
    fail "mpirun -n 64" "$out"
fi

echo "launchers: $passed passed, $failed failed"
[ "$failed" = 0 ]
