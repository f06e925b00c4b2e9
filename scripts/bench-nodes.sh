#!/usr/bin/env bash
# Times a ~1 GB consolidation on 1 node x 2 ranks against 2 emulated nodes x
# 1 rank (scripts/node-agent.sh, TCP over loopback), median of RUNS each:
#
#   scripts/bench-nodes.sh [RUNS]      (default 3)
#
# Rows: 1 node x 2 ranks over shared memory (vader, as scripts/env.sh sets),
# the same over TCP, and 2 emulated nodes x 1 rank over TCP, each with the
# default threads (cores / ranks on the node) and with --threads 1. Wall
# time of the whole mpirun, launch included. Every output is checked
# against the manifest. Last, the launch alone (`true` instead of the tool).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
source scripts/env.sh
cargo build --release --quiet --workspace --bins
bin=$PWD/target/release/st-consolidate-mpi
work=${BENCH_DIR:-$PWD/target/bench-nodes}
rm -rf "$work" && mkdir -p "$work"
ckpt=$work/ckpt
# 1.02 GB of bf16 tensors, the 1 GB mixed layout of scripts/bench.sh.
target/release/st-make-shards "$ckpt" --layout mixed --ranks 8 --files 4 --layers 9 --hidden 2048 --vocab 32000 2>&1 | tail -n 1
tcp=(env OMPI_MCA_btl=self,tcp OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo)
nodes=(--mca plm_rsh_agent "$PWD/scripts/node-agent.sh" --mca plm_rsh_no_tree_spawn 1 --host nodea:1,nodeb:1)

# median SETUP...: runs `SETUP -n 2 BIN ...` RUNS times, prints the median seconds.
median() {
    local times=()
    for _ in $(seq "$runs"); do
        rm -rf "$work/out"
        sync
        local start end
        start=$(date +%s.%N)
        "$@" -q --mapping "$ckpt/mapping.json" "$ckpt" "$work/out"
        end=$(date +%s.%N)
        python3 scripts/check_manifest.py "$work/out" "$ckpt/manifest.json" >/dev/null
        times+=("$(python3 -c "print($end - $start)")")
    done
    python3 -c "import statistics, sys; print(f'{statistics.median(map(float, sys.argv[1:])):.2f}')" "${times[@]}"
}
# launch_only SETUP...: median seconds of `SETUP -n 2 true`, MPI startup alone.
launch_only() {
    local times=() start end
    for _ in $(seq "$runs"); do
        start=$(date +%s.%N)
        "$@" true
        end=$(date +%s.%N)
        times+=("$(python3 -c "print($end - $start)")")
    done
    python3 -c "import statistics, sys; print(f'{statistics.median(map(float, sys.argv[1:])):.2f}')" "${times[@]}"
}
echo "| setup | transport | threads per rank | median s of $runs |"
echo "|---|---|---|---|"
for threads in default 1; do
    extra=()
    [ "$threads" = 1 ] && extra=(--threads 1)
    echo "| 1 node x 2 ranks | shared memory (vader) | $threads | $(median mpirun -n 2 "$bin" "${extra[@]}") |"
    echo "| 1 node x 2 ranks | TCP, loopback | $threads | $(median "${tcp[@]}" mpirun -n 2 "$bin" "${extra[@]}") |"
    echo "| 2 emulated nodes x 1 rank | TCP, loopback | $threads | $(median "${tcp[@]}" mpirun "${nodes[@]}" -n 2 "$bin" "${extra[@]}") |"
done
echo "| 1 node x 2 ranks, launching \`true\` | - | - | $(launch_only mpirun -n 2) |"
echo "| 2 emulated nodes x 1 rank, launching \`true\` | - | - | $(launch_only "${tcp[@]}" mpirun "${nodes[@]}" -n 2) |"
