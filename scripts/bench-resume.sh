#!/usr/bin/env bash
# The cost of --resume (issue 25): a half-finished run resumed, against a
# fresh run of the same checkpoint, in the same run of this script.
#
#   scripts/bench-resume.sh [GB] [RUNS]      (defaults: 4 GB, 3 runs)
#
# Generates a checkpoint of about GB bytes (bf16, 8 ranks, 8 output files),
# then RUNS times each, interleaved, and reports medians of:
#   a) baseline: cat of all shard bytes into one file, then sync of it;
#   b) a fresh run into an empty OUTPUT_DIR;
#   c) --resume of that output with every other file deleted (half the files
#      kept): the kept files' tensor bytes are compared with the inputs
#      before they are kept, the other half written;
#   d) --resume with every file there (nothing to write: the comparison alone).
# Every output is checked against the manifest. Environment: BENCH_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
gb=${1:-4}
runs=${2:-3}
scripts/setup.sh
source scripts/env.sh
source scripts/bench-lib.sh
cargo build --release --quiet --bins
bin=$PWD/target/release/st-consolidate-mpi
make=$PWD/target/release/st-make-shards
work=${BENCH_DIR:-$PWD/target/bench-resume}
rm -rf "$work"; mkdir -p "$work"
read -r hidden vocab layers < <(python3 -c "
h, v = 2048, 32000
print(h, v, max(1, round(($gb * 1e9 / 2 - 2 * v * h) / (10 * h * h))))")
ckpt=$work/ckpt
"$make" "$ckpt" --layout mixed --ranks 8 --files 8 --layers "$layers" \
    --hidden "$hidden" --vocab "$vocab" --dtype bf16 --seed 1 2>/dev/null
bytes=$(cat "$ckpt"/shard-*.safetensors | wc -c)
out=$work/out
: > "$work/t.base"; : > "$work/t.fresh"; : > "$work/t.half"; : > "$work/t.all"
for run in $(seq "$runs"); do
    rm -rf "$out"; mkdir -p "$out"; sync
    timed "$work/t.base" sh -c "cat $ckpt/shard-*.safetensors > $out/cat.bin && sync $out/cat.bin"
    rm -rf "$out"; sync
    timed "$work/t.fresh" "$bin" -q --mapping "$ckpt/mapping.json" "$ckpt" "$out"
    # Half-finished: every other output file gone, and the index (a killed
    # run never wrote it).
    rm -f "$out"/model.safetensors.index.json
    ls "$out"/model-*.safetensors | awk 'NR % 2 == 0' | xargs rm -f
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    timed "$work/t.half" "$bin" -q --resume --mapping "$ckpt/mapping.json" "$ckpt" "$out"
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    timed "$work/t.all" "$bin" -q --resume --mapping "$ckpt/mapping.json" "$ckpt" "$out"
done
python3 scripts/check_manifest.py "$out" "$ckpt/manifest.json" | tail -n 1
python3 - "$bytes" "$work" <<'PY'
import statistics, sys
size, work = int(sys.argv[1]), sys.argv[2]
med = lambda name: statistics.median(float(x) for x in open(f"{work}/t.{name}"))
base, fresh, half, full = med("base"), med("fresh"), med("half"), med("all")
print("| GB | baseline s | fresh run s | resume, half kept s | resume / fresh | resume, all kept s | all kept / fresh |")
print("|---|---|---|---|---|---|---|")
print(f"| {size/1e9:.2f} | {base:.2f} | {fresh:.2f} | {half:.2f} | {half/fresh:.2f} | {full:.2f} | {full/fresh:.2f} |")
PY
rm -rf "$work"
