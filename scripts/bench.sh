#!/usr/bin/env bash
# Benchmarks st-consolidate-mpi against the copy limit.
#
#   scripts/bench.sh [GB] [RUNS]      (defaults: 1 GB, 5 runs)
#
# For each layout (mixed, tp) it generates a checkpoint of about GB bytes
# saved from 8 ranks into 4 output files, then times, RUNS times each, and
# reports medians of:
#   a) the baseline: cat of all shard bytes into one file, then sync of it;
#   b) st-consolidate-mpi on 1 rank;
#   c) st-consolidate-mpi under mpirun -n 2;
# with peak RSS per rank (/usr/bin/time, maximum resident set size).
# Every output is checked against the manifest; a mismatch exits non-zero.
# The table is printed and saved to target/bench/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
gb=${1:-1}
runs=${2:-5}
scripts/setup.sh
command -v /usr/bin/time >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
source scripts/env.sh
cargo build --release --quiet --bins --examples
bin=$PWD/target/release/st-consolidate-mpi
make=$PWD/target/release/st-make-shards
work=${BENCH_DIR:-$PWD/target/bench}
mkdir -p "$work"

# Llama-like shapes: hidden 2048, vocab 32000; layers sized to reach GB.
hidden=2048 vocab=32000
layers=$(python3 -c "print(max(1, round(($gb*1e9/2 - 2*$vocab*$hidden) / (10*$hidden*$hidden))))")

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

results=$work/results.md
{
    echo "| layout | GB | baseline s | 1 rank s | ratio to baseline | 2 ranks s | 2 ranks / 1 rank | GB/s (2 ranks) | peak RSS MB per rank |"
    echo "|---|---|---|---|---|---|---|---|---|"
} > "$results"

for layout in mixed tp; do
    ckpt=$work/ckpt-$layout
    rm -rf "$ckpt" "$work/out"
    "$make" "$ckpt" --layout "$layout" --ranks 8 --files 4 --layers "$layers" \
        --hidden "$hidden" --vocab "$vocab" --dtype bf16 --seed 1 2>/dev/null
    bytes=$(cat "$ckpt"/shard-*.safetensors | wc -c)
    : > "$work/t.base"; : > "$work/t.one"; : > "$work/t.two"; : > "$work/rss"
    for run in $(seq "$runs"); do
        rm -rf "$work/out"; mkdir -p "$work/out"; sync
        t0=$(now); cat "$ckpt"/shard-*.safetensors > "$work/out/cat.bin"; sync "$work/out/cat.bin"; t1=$(now)
        echo "$t1 - $t0" | bc -l >> "$work/t.base"

        rm -rf "$work/out"; sync
        t0=$(now)
        /usr/bin/time -f %M -a -o "$work/rss" "$bin" -q --mapping "$ckpt/mapping.json" "$ckpt" "$work/out"
        t1=$(now)
        echo "$t1 - $t0" | bc -l >> "$work/t.one"

        rm -rf "$work/out"; sync
        t0=$(now)
        mpirun -n 2 /usr/bin/time -f %M -a -o "$work/rss" "$bin" -q --mapping "$ckpt/mapping.json" "$ckpt" "$work/out"
        t1=$(now)
        echo "$t1 - $t0" | bc -l >> "$work/t.two"
    done
    python3 scripts/check_manifest.py "$work/out" "$ckpt/manifest.json" | tail -n 1
    base=$(median < "$work/t.base"); one=$(median < "$work/t.one"); two=$(median < "$work/t.two")
    rss=$(sort -n "$work/rss" | tail -n 1)
    printf "| %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %d |\n" \
        "$layout" "$(echo "$bytes/1e9" | bc -l)" "$base" "$one" "$(echo "$one/$base" | bc -l)" \
        "$two" "$(echo "$two/$one" | bc -l)" "$(echo "$bytes/1e9/$two" | bc -l)" "$((rss / 1024))" >> "$results"
    rm -rf "$ckpt" "$work/out"
done
echo "medians of $runs runs; $(nproc) cores; $(uname -sr)" >> "$results"
target/release/examples/coverage_bench >> "$results"
cat "$results"
