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
#   c) st-consolidate-mpi under mpirun -n 2 (one core each);
#   and, for the scaling from parallelism alone, 1 rank with --threads 1;
# with peak RSS per rank (/usr/bin/time, maximum resident set size).
# Every output is checked against the manifest; a mismatch exits non-zero.
# The table is printed and saved to target/bench/results.md, followed by the
# scale simulation of scripts/scale.sh (70B and 405B layouts, sparse).
#
# The DCP section (issue 12) times the same on a checkpoint of about GB bytes
# in PyTorch DCP's default format (.metadata + __R_I.distcp), written by
# PyTorch's own dcp.save from 2 gloo ranks (scripts/make_dcp_bench.py), and
# adds a peer: `accelerate merge-weights`, timed as a whole process with its
# peak RSS, min(RUNS, 3) times. It also times 1 rank with --verify (every byte
# read back, every chunk's CRC-32 checked) against the plain copy, and
# --verify-only on that output. PyTorch and accelerate come from PyPI into
# target/torch-venv (created, or completed, when missing).
#
# Environment: BENCH_DIR (work folder, default target/bench); BENCH_BIN (the
# st-consolidate-mpi binary to time, default the one just built: time an
# older build against a newer one back to back); BENCH_COPY_ONLY=1 skips the
# coverage benchmark and the scale simulation; BENCH_DCP_ONLY=1 runs only the
# DCP section.
set -euo pipefail
cd "$(dirname "$0")/.."
gb=${1:-1}
runs=${2:-5}
scripts/setup.sh --all
source scripts/env.sh
source scripts/bench-lib.sh
cargo build --release --quiet --workspace --bins --examples
bin=${BENCH_BIN:-$PWD/target/release/st-consolidate-mpi}
make=$PWD/target/release/st-make-shards
work=${BENCH_DIR:-$PWD/target/bench}
mkdir -p "$work"

# Llama-like shapes: hidden 2048, vocab 32000 (hidden 256, vocab 4000 for a
# smoke run under 0.5 GB); layers sized to reach GB of bf16.
read -r hidden vocab layers < <(python3 -c "
h, v = (2048, 32000) if $gb >= 0.5 else (256, 4000)
print(h, v, max(1, round(($gb * 1e9 / 2 - 2 * v * h) / (10 * h * h))))")


results=$work/results.md
: > "$results"
# The safetensors-shard checkpoints of st-make-shards (not indented: the
# Python heredocs inside must start at column 0).
if [ "${BENCH_DCP_ONLY:-0}" != 1 ]; then
{
    echo "| layout | GB | baseline s | 1 rank s | ratio to baseline | 2 ranks s | 2 ranks / 1 rank | 1 rank, 1 thread s | 2 ranks / (1 rank, 1 thread) | GB/s (2 ranks) | peak RSS MB per rank |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
} >> "$results"

for layout in mixed tp; do
    ckpt=$work/ckpt-$layout
    rm -rf "$ckpt" "$work/out"
    "$make" "$ckpt" --layout "$layout" --ranks 8 --files 4 --layers "$layers" \
        --hidden "$hidden" --vocab "$vocab" --dtype bf16 --seed 1 2>/dev/null
    bytes=$(cat "$ckpt"/shard-*.safetensors | wc -c)
    : > "$work/t.base"; : > "$work/t.one"; : > "$work/t.one1"; : > "$work/t.two"; : > "$work/rss"
    for run in $(seq "$runs"); do
        rm -rf "$work/out"; mkdir -p "$work/out"; sync
        timed "$work/t.base" sh -c "cat $ckpt/shard-*.safetensors > $work/out/cat.bin && sync $work/out/cat.bin"

        rm -rf "$work/out"; sync
        timed "$work/t.one" /usr/bin/time -f %M -a -o "$work/rss" \
            "$bin" -q --mapping "$ckpt/mapping.json" "$ckpt" "$work/out"

        rm -rf "$work/out"; sync
        timed "$work/t.one1" "$bin" -q --threads 1 --mapping "$ckpt/mapping.json" "$ckpt" "$work/out"

        rm -rf "$work/out"; sync
        timed "$work/t.two" mpirun -n 2 /usr/bin/time -f %M -a -o "$work/rss" \
            "$bin" -q --mapping "$ckpt/mapping.json" "$ckpt" "$work/out"
    done
    python3 scripts/check_manifest.py "$work/out" "$ckpt/manifest.json" | tail -n 1
    python3 - "$layout" "$bytes" "$work" >> "$results" <<'PY'
import statistics, sys
layout, size, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
med = lambda name: statistics.median(float(x) for x in open(f"{work}/t.{name}"))
base, one, one1, two = med("base"), med("one"), med("one1"), med("two")
rss = max(int(x) for x in open(f"{work}/rss")) / 1024
print(f"| {layout} | {size/1e9:.2f} | {base:.2f} | {one:.2f} | {one/base:.2f} | {two:.2f} | "
      f"{two/one:.2f} | {one1:.2f} | {two/one1:.2f} | {size/1e9/two:.2f} | {rss:.0f} |")
PY
    rm -rf "$ckpt" "$work/out"
done
# --dtype: f32 master weights exported as bf16, against the same
# consolidation without conversion and the baseline.
ckpt=$work/ckpt-f32
rm -rf "$ckpt" "$work/out"
"$make" "$ckpt" --layout mixed --ranks 8 --files 4 --layers "$(( (layers + 1) / 2 ))" \
    --hidden "$hidden" --vocab "$vocab" --dtype f32 --seed 2 2>/dev/null
bytes=$(cat "$ckpt"/shard-*.safetensors | wc -c)
: > "$work/t.base"; : > "$work/t.plain"; : > "$work/t.cast"
for run in $(seq "$runs"); do
    rm -rf "$work/out"; mkdir -p "$work/out"; sync
    timed "$work/t.base" sh -c "cat $ckpt/shard-*.safetensors > $work/out/cat.bin && sync $work/out/cat.bin"
    rm -rf "$work/out"; sync
    timed "$work/t.plain" "$bin" -q --mapping "$ckpt/mapping.json" "$ckpt" "$work/out"
    rm -rf "$work/out"; sync
    timed "$work/t.cast" "$bin" -q --dtype bf16 --mapping "$ckpt/mapping.json" "$ckpt" "$work/out"
done
"$bin" -q --verify-only "$ckpt" "$work/out"
python3 - "$bytes" "$work" >> "$results" <<'PY'
import statistics, sys
size, work = int(sys.argv[1]), sys.argv[2]
med = lambda name: statistics.median(float(x) for x in open(f"{work}/t.{name}"))
base, plain, cast = med("base"), med("plain"), med("cast")
print()
print("| --dtype | GB in | baseline s | 1 rank, f32 kept s | 1 rank, --dtype bf16 s | bf16 / kept | bf16 / baseline |")
print("|---|---|---|---|---|---|---|")
print(f"| f32 → bf16 | {size/1e9:.2f} | {base:.2f} | {plain:.2f} | {cast:.2f} | {cast/plain:.2f} | {cast/base:.2f} |")
PY
rm -rf "$ckpt" "$work/out"
fi

# DCP format (issue 12): PyTorch's own FileSystemWriter output, consolidated
# with no mapping (format detected from .metadata), against the same cat
# baseline and against accelerate merge-weights.
venv=$PWD/target/torch-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import torch, accelerate, numpy" 2>/dev/null ||
    "$venv/bin/pip" install -q "torch==2.15.0" "accelerate==1.15.0" numpy
dcp=$work/dcp
ckpt=$dcp/checkpoint
rm -rf "$dcp" "$work/out"
"$venv/bin/python" scripts/make_dcp_bench.py "$dcp" --gb "$gb" >&2
bytes=$(cat "$ckpt"/*.distcp | wc -c)
acc_runs=$(( runs < 3 ? runs : 3 ))
for name in base one two acc acc_sync rss rss.acc verify verify_only; do : > "$work/t.dcp.$name"; done
for run in $(seq "$runs"); do
    rm -rf "$work/out"; mkdir -p "$work/out"; sync
    timed "$work/t.dcp.base" sh -c "cat $ckpt/*.distcp > $work/out/cat.bin && sync $work/out/cat.bin"

    # Outputs are checked on the first run, so a wrong one stops the
    # benchmark before the other runs.
    rm -rf "$work/out"; sync
    timed "$work/t.dcp.one" /usr/bin/time -f %M -a -o "$work/t.dcp.rss" "$bin" -q "$ckpt" "$work/out"
    [ "$run" != 1 ] || python3 scripts/check_manifest.py "$work/out" "$dcp/manifest.json" | tail -n 1

    rm -rf "$work/out"; sync
    timed "$work/t.dcp.two" mpirun -n 2 /usr/bin/time -f %M -a -o "$work/t.dcp.rss" "$bin" -q "$ckpt" "$work/out"
    [ "$run" != 1 ] || python3 scripts/check_manifest.py "$work/out" "$dcp/manifest.json" | tail -n 1

    # --verify (every byte read back and compared, every chunk checked
    # against its stored CRC-32) against the plain copy above, and
    # --verify-only on the output it leaves.
    rm -rf "$work/out"; sync
    timed "$work/t.dcp.verify" "$bin" -q --verify "$ckpt" "$work/out"
    timed "$work/t.dcp.verify_only" "$bin" -q --verify-only "$ckpt" "$work/out"

    if [ "$run" -le "$acc_runs" ]; then
        rm -rf "$work/out"; sync
        timed "$work/t.dcp.acc" /usr/bin/time -f %M -a -o "$work/t.dcp.rss.acc" \
            "$venv/bin/accelerate" merge-weights "$ckpt" "$work/out"
        # accelerate does not fsync its output; its sync is timed apart and
        # not counted in its time (which favours accelerate).
        timed "$work/t.dcp.acc_sync" sync "$work/out/model.safetensors"
        [ "$run" != 1 ] || "$venv/bin/python" - "$work/out/model.safetensors" "$dcp/manifest.json" <<'PY'
import hashlib, json, sys
import safetensors
manifest = json.load(open(sys.argv[2]))
want = {n: (d["shape"], d["dtype"], d["sha256"]) for n, d in manifest.items()}
with open(sys.argv[1], "rb") as f:
    got = {n: (list(t["shape"]), t["dtype"], hashlib.sha256(t["data"]).hexdigest())
           for n, t in safetensors.deserialize(f.read())}
bad = sorted(n for n in set(want) | set(got) if want.get(n) != got.get(n))
for n in bad:
    print("MISMATCH accelerate", n, got.get(n), want.get(n))
print(f"accelerate: {len(want) - len(bad)} passed, {len(bad)} failed")
sys.exit(1 if bad else 0)
PY
    fi
done
rm -rf "$work/out"
python3 - "$bytes" "$work" "$acc_runs" >> "$results" <<'PY'
import statistics, sys
size, work, acc_runs = int(sys.argv[1]), sys.argv[2], sys.argv[3]
med = lambda name: statistics.median(float(x) for x in open(f"{work}/t.dcp.{name}"))
peak_mb = lambda name: max(int(x) for x in open(f"{work}/t.dcp.{name}")) / 1024
base, one, two, acc, acc_sync = med("base"), med("one"), med("two"), med("acc"), med("acc_sync")
print()
print("| format | GB | baseline s | 1 rank s | ratio to baseline | 2 ranks s | accelerate s | accelerate / 1 rank | peak RSS MB per rank (ours) | peak RSS MB (accelerate) |")
print("|---|---|---|---|---|---|---|---|---|---|")
print(f"| dcp | {size/1e9:.2f} | {base:.2f} | {one:.2f} | {one/base:.2f} | {two:.2f} | {acc:.2f} | "
      f"{acc/one:.1f} | {peak_mb('rss'):.0f} | {peak_mb('rss.acc'):.0f} |")
print(f"accelerate: median of {acc_runs} runs, the process alone; the sync of its output "
      f"(it does not fsync) took {acc_sync:.2f} s more, not counted")
verify, verify_only = med("verify"), med("verify_only")
print()
print("| dcp, 1 rank | copy s | --verify s | --verify / copy | --verify-only s | --verify-only / copy |")
print("|---|---|---|---|---|---|")
print(f"| {size/1e9:.2f} GB | {one:.2f} | {verify:.2f} | {verify/one:.2f} | {verify_only:.2f} | {verify_only/one:.2f} |")
print("--verify and --verify-only compare every byte with the inputs and every chunk with its stored CRC-32")
PY
rm -rf "$dcp"
echo "medians of $runs runs; $(nproc) cores; $(uname -sr); $bin" >> "$results"
if [ "${BENCH_COPY_ONLY:-0}" != 1 ] && [ "${BENCH_DCP_ONLY:-0}" != 1 ]; then
    target/release/examples/coverage_bench >> "$results"
    echo >> "$results"
    scripts/scale.sh >> "$results"
fi
cat "$results"
