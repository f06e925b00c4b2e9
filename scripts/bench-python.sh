#!/usr/bin/env bash
# Benchmarks the Python drop-in (issue 19) against PyTorch's and NeMo's
# consolidate_safetensors_files, in-process, each with num_threads=5 as
# torchtitan and NeMo pass it, plus the CLI on the same input.
#
#   scripts/bench-python.sh [GB] [RUNS]     (defaults: 1 GB, 3 runs)
#
# Each contender runs in a child process of its own (scripts/bench_python.py),
# timed from the call to durable output (outputs and OUTPUT_DIR fsynced),
# with its extra peak RSS over the process's RSS just before the call; the
# CLI is timed as a whole process with its whole peak RSS (/usr/bin/time).
# The baseline is `cat` of the input shards into one file and a `sync` of
# it: the disk's limit for these bytes. Medians are printed as
# BENCHMARKS.md rows, with the ratios. Targets: drop-in within 1.1x of
# the CLI, at least 2.5x faster than both peers, at most 64 MB extra RSS.
# Needs target/torch-venv with the wheel installed (scripts/test-python.sh).
# Environment: BENCH_DIR (work folder), BENCH_PY (the Python to use),
# BENCH_BIN (the CLI binary to time instead of a fresh release build).
set -euo pipefail
cd "$(dirname "$0")/.."
gb=${1:-1}
runs=${2:-3}
py=${BENCH_PY:-target/torch-venv/bin/python}
dir=${BENCH_DIR:-target/bench-python}
bin=${BENCH_BIN:-target/release/st-consolidate-mpi}
[ -n "${BENCH_BIN:-}" ] || cargo build --release --quiet --bin st-consolidate-mpi
"$py" -c "import st_consolidate" 2>/dev/null || {
    echo "bench-python: st_consolidate is not installed in target/torch-venv; run scripts/test-python.sh" >&2
    exit 1
}
rm -rf "$dir" && mkdir -p "$dir"
"$py" scripts/bench_python.py make "$dir/in" "$gb"
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# Every run times each contender in turn (the baseline first), so that the
# medians compare numbers taken under the same load.
names="baseline dropin torch nemo cli"
for name in $names; do : >"$dir/$name.times" && : >"$dir/$name.rss"; done
for _ in $(seq "$runs"); do
    for name in $names; do
        rm -rf "$dir/out" "$dir/cat.out"
        sync
        case $name in
            baseline)
                # The disk's own limit: the same bytes read once, written
                # once and made durable.
                start=$(date +%s.%N)
                cat "$dir"/in/*.safetensors >"$dir/cat.out"
                sync "$dir/cat.out"
                end=$(date +%s.%N)
                echo "$end - $start" | awk '{ print $1 - $3 }' >>"$dir/$name.times"
                echo 0 >>"$dir/$name.rss"
                ;;
            cli)
                start=$(date +%s.%N)
                /usr/bin/time -f "%M" -o "$dir/cli-rss" "$bin" -q --threads 5 --mapping "$dir/in/mapping.json" "$dir/in" "$dir/out"
                end=$(date +%s.%N)
                echo "$end - $start" | awk '{ print $1 - $3 }' >>"$dir/$name.times"
                awk '{ print $1 / 1024 }' "$dir/cli-rss" >>"$dir/$name.rss"
                ;;
            *)
                line=$("$py" scripts/bench_python.py run "$name" "$dir/in" "$dir/out")
                "$py" -c "import json,sys; d=json.loads(sys.argv[1]); print(d['seconds'])" "$line" >>"$dir/$name.times"
                "$py" -c "import json,sys; d=json.loads(sys.argv[1]); print(d['extra_rss_mb'])" "$line" >>"$dir/$name.rss"
                ;;
        esac
    done
done
rm -f "$dir/cat.out"
med() { median <"$dir/$1.times"; }
echo "| contender (${gb} GB, num_threads=5) | median s | extra peak RSS MB |"
echo "|---|---|---|"
for name in $names; do
    printf "| %s | %.2f | %.0f |\n" "$name" "$(med "$name")" "$(median <"$dir/$name.rss")"
done
echo
awk -v d="$(med dropin)" -v c="$(med cli)" -v t="$(med torch)" -v n="$(med nemo)" -v b="$(med baseline)" 'BEGIN {
    printf "drop-in / CLI: %.2f; PyTorch / drop-in: %.2f; NeMo / drop-in: %.2f; drop-in / baseline: %.2f; the most any contender could be faster than PyTorch here: PyTorch / baseline = %.2f\n", d / c, t / d, n / d, d / b, t / b
}'
rm -rf "$dir"
