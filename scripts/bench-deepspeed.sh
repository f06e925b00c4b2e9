#!/usr/bin/env bash
# Benchmarks st-consolidate-mpi on DeepSpeed ZeRO-3 checkpoints (issue 26).
#
#   scripts/bench-deepspeed.sh [RUNS]        (default 5 repetitions)
#
# Checkpoints (made once by scripts/make_deepspeed_bench.py with DeepSpeed
# 0.19.8 on CPU/gloo, then reused): untied stacks of Linear(2048, 2048)
# trained in bf16 with AdamW (torch_adam) for 1 step, ZeRO-3, 2 ranks:
#   1x: 24 layers, 100.7M params (0.40 GB of fp32 masters in 1.21 GB of optim files)
#   4x: 96 layers, 402.7M params (1.61 GB of fp32 masters in 4.83 GB)
# For each size, in ONE run, each repetition times every contender once, the
# order rotated by one each repetition (so no contender always runs first
# after another's writeback), with peak RSS from /usr/bin/time:
#   base   dd of exactly the fp32 master partitions' bytes (byte ranges inside
#          the optim files found by scripts/ds_bench_masters.py) into one
#          file, then sync of that file: the read+write+sync floor;
#   one    st-consolidate-mpi on 1 rank (no mpirun), fresh output folder; it
#          fsyncs its own output;
#   two    mpirun -n 2 st-consolidate-mpi (peak RSS per rank);
#   z2f    DeepSpeed's zero_to_fp32.py CKPT OUT --safe_serialization as a whole
#          process, then sync of its output (it does not fsync).
# Medians of RUNS; ratios are against the baseline of the same run. The
# output of `one` is compared with zero_to_fp32's, tensor by tensor (name,
# dtype, shape, sha256), once per size; a mismatch exits non-zero.
# The page cache is dropped before each timed command when
# /proc/sys/vm/drop_caches is writable; otherwise every run is warm-cache
# (the inputs are read once before the first repetition) and the table says so.
# The load average is printed at the start and end of each size.
#
# Environment: DSB_DIR (default target/ds-bench), BENCH_BIN (binary to time,
# default target/release/st-consolidate-mpi), DSB_SIZES (default "1x 4x"),
# DSB_Z2F_4X=0 skips zero_to_fp32 at 4x (it needs about 4x the RAM and time).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
work=${DSB_DIR:-$PWD/target/ds-bench}
bin=${BENCH_BIN:-$PWD/target/release/st-consolidate-mpi}
sizes=${DSB_SIZES:-"1x 4x"}
source scripts/env.sh
source scripts/bench-lib.sh
mkdir -p "$work"

if [ ! -x /usr/bin/time ]; then
    echo "bench-deepspeed: /usr/bin/time not found (peak RSS); install it: apt-get install -y time" >&2
    exit 1
fi
[ -x "$bin" ] || { echo "bench-deepspeed: $bin not found; cargo build --release" >&2; exit 1; }
[ -x target/torch-venv/bin/python ] || [ -L target/torch-venv ] ||
    { echo "bench-deepspeed: target/torch-venv missing (ln -s /work/main/target/torch-venv target/torch-venv)" >&2; exit 1; }
scripts/setup-deepspeed.sh >&2
py=$PWD/target/ds-venv/bin/python
export DS_ACCELERATOR=cpu PATH=$PWD/target/ds-venv/bin:$PATH

drop=0
if sync && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then drop=1; fi
uncache() { sync; [ "$drop" = 0 ] || echo 3 > /proc/sys/vm/drop_caches; }


results=$work/results.md
: > "$results"
for size in $sizes; do
    case $size in
        1x) layers=24 ;;
        4x) layers=96 ;;
        *) echo "bench-deepspeed: size $size is not 1x or 4x" >&2; exit 1 ;;
    esac
    ckpt=$work/ckpt-$size
    if [ ! -f "$ckpt/latest" ]; then
        rm -rf "$ckpt"
        "$py" scripts/make_deepspeed_bench.py "$ckpt" --layers "$layers" >&2
    fi
    tagdir=$ckpt/$(cat "$ckpt/latest")
    python3 scripts/ds_bench_masters.py "$tagdir" > "$work/masters-$size.txt"
    optim_bytes=$(cat "$tagdir"/*_optim_states.pt | wc -c)
    master_bytes=$(awk '{s += $3} END {print s}' "$work/masters-$size.txt")
    # the baseline: exactly the masters' byte ranges, one dd each
    {
        echo "set -e"
        while read -r path off len; do
            echo "dd if='$path' iflag=skip_bytes,count_bytes skip=$off count=$len bs=4M status=none"
        done < "$work/masters-$size.txt"
    } > "$work/base-$size.sh"

    contenders="base one two z2f"
    [ "$size" != 4x ] || [ "${DSB_Z2F_4X:-1}" = 1 ] || contenders="base one two"
    for c in $contenders; do : > "$work/t.$size.$c"; : > "$work/rss.$size.$c"; done
    load_start=$(cut -d' ' -f1-3 /proc/loadavg)
    echo "bench-deepspeed $size: load average at start $load_start" >&2
    [ "$drop" = 1 ] || cat "$tagdir"/* > /dev/null   # warm: every contender reads from the page cache

    out=$work/out
    run_one() {  # contender, repetition
        rm -rf "$out"; mkdir -p "$out"; uncache
        case $1 in
            base) timed "$work/t.$size.base" /usr/bin/time -f %M -a -o "$work/rss.$size.base" \
                      sh -c "sh '$work/base-$size.sh' > '$out/masters.bin' && sync '$out/masters.bin'" ;;
            one)  timed "$work/t.$size.one" /usr/bin/time -f %M -a -o "$work/rss.$size.one" \
                      "$bin" -q "$ckpt" "$out" ;;
            two)  timed "$work/t.$size.two" mpirun -n 2 /usr/bin/time -f %M -a -o "$work/rss.$size.two" \
                      "$bin" -q "$ckpt" "$out" ;;
            z2f)  timed "$work/t.$size.z2f" sh -c "/usr/bin/time -f %M -a -o '$work/rss.$size.z2f' \
                      '$py' '$ckpt/zero_to_fp32.py' '$ckpt' '$out' --safe_serialization > '$work/z2f.log' 2>&1 \
                      && sync '$out'/*" ;;
        esac
        if [ "$2" = 1 ] && [ "$1" = one ]; then rm -rf "$work/ours-$size"; mv "$out" "$work/ours-$size"; fi
        if [ "$2" = 1 ] && [ "$1" = z2f ]; then rm -rf "$work/z2f-$size"; mv "$out" "$work/z2f-$size"; fi
    }
    set -- $contenders
    n=$#
    for run in $(seq "$runs"); do
        for i in $(seq 0 $((n - 1))); do
            k=$(( (i + run - 1) % n + 1 ))
            run_one "${!k}" "$run"
        done
    done
    rm -rf "$out"

    # bit for bit against zero_to_fp32 (sha256 per tensor), once
    if [ -d "$work/z2f-$size" ]; then
        python3 - "$work/ours-$size" "$work/z2f-$size" <<'PY'
import glob, hashlib, json, os, struct, sys
def tensors(d):
    got = {}
    for path in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            base = 8 + n
            for name, t in header.items():
                if name == "__metadata__":
                    continue
                a, b = t["data_offsets"]
                f.seek(base + a)
                got[name] = (t["dtype"], t["shape"], hashlib.sha256(f.read(b - a)).hexdigest())
    return got
ours, ref = tensors(sys.argv[1]), tensors(sys.argv[2])
bad = sorted(n for n in set(ours) | set(ref) if ours.get(n) != ref.get(n))
for n in bad:
    print("MISMATCH", n, ours.get(n), ref.get(n))
print(f"bench-deepspeed: st-consolidate-mpi vs zero_to_fp32: {len(ref) - len(bad)} of {len(ref)} tensors "
      f"equal (dtype, shape, sha256), {len(bad)} differ", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
    fi
    load_end=$(cut -d' ' -f1-3 /proc/loadavg)
    echo "bench-deepspeed $size: load average at end $load_end" >&2

    python3 - "$size" "$work" "$master_bytes" "$optim_bytes" "$runs" "$drop" "$load_start" "$load_end" \
        "$contenders" "$(nproc)" >> "$results" <<'PY'
import os, statistics, sys
size, work, master, optim, runs, drop, l0, l1, contenders, cores = sys.argv[1:]
master, optim = int(master), int(optim)
have = contenders.split()
med = lambda c: statistics.median(float(x) for x in open(f"{work}/t.{size}.{c}"))
peak = lambda c: max(int(x) for x in open(f"{work}/rss.{size}.{c}")) / 1024
t = {c: med(c) for c in have}
r = {c: peak(c) for c in have}
base = t["base"]
print(f"#### {size}: {master / 4e6:.1f}M params, {master / 1e9:.2f} GB of fp32 masters in "
      f"{optim / 1e9:.2f} GB of optim files, ZeRO-3 from 2 ranks")
print()
print(f"{runs} repetitions, contenders alternated, medians; "
      f"{'page cache dropped before each command' if drop == '1' else 'warm page cache (drop_caches not writable here)'}; "
      f"{cores} cores; load average at start {l0}, at end {l1}.")
print()
print("| contender | median s | / baseline | zero_to_fp32 / it | peak RSS MB |")
print("|---|---|---|---|---|")
names = {"base": "baseline: dd of the masters' bytes + sync", "one": "st-consolidate-mpi, 1 rank",
         "two": "st-consolidate-mpi, mpirun -n 2", "z2f": "zero_to_fp32.py --safe_serialization + sync"}
for c in have:
    speed = f"{t['z2f'] / t[c]:.1f}x" if "z2f" in t else "-"
    rss = f"{r[c]:.0f}" + (" per rank" if c == "two" else "")
    print(f"| {names[c]} | {t[c]:.2f} | {t[c] / base:.2f} | {speed} | {rss} |")
print()
PY
done
cat "$results"
