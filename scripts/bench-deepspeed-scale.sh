#!/usr/bin/env bash
# DeepSpeed at scale (issue 26, "Bench at scale"): plans a generated ZeRO-3
# layout of Llama-70B saved from RANKS data-parallel ranks (faithful pickles,
# sparse partitions: scripts/make_deepspeed_scale.py) and reports time and
# peak RSS of:
#   dry1     st-consolidate-mpi --dry-run --ranks RANKS  (one process; every
#            pickle of the RANKS model-states and RANKS optim files parsed by it)
#   dry2     mpirun -n 2 st-consolidate-mpi --dry-run             (headers all)
#   dry2s    mpirun -n 2 st-consolidate-mpi --dry-run --headers shared
# each REPS times, alternated, medians; peak RSS per rank (/usr/bin/time,
# rank from OMPI_COMM_WORLD_RANK). The target: at most 256 MB per rank.
#
#   scripts/bench-deepspeed-scale.sh [REPS] [RANKS]   (defaults: 3, 256)
#
# The layout is made once under DSS_DIR (default target/ds-scale) and reused
# (results in DSS_DIR/run-wRANKS/results.md);
# it needs a filesystem with holes (about 80 MB on disk for 847 GB apparent
# at 256 ranks; the script checks du against the apparent size).
# Environment: BENCH_BIN (default target/release/st-consolidate-mpi).
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-3}
ranks=${2:-256}
work=${DSS_DIR:-$PWD/target/ds-scale}
bin=${BENCH_BIN:-$PWD/target/release/st-consolidate-mpi}
source scripts/env.sh
source scripts/bench-lib.sh
[ -x /usr/bin/time ] || { echo "bench-deepspeed-scale: /usr/bin/time not found: apt-get install -y time" >&2; exit 1; }
ckpt=$work/llama70b-w$ranks
run=$work/run-w$ranks
mkdir -p "$run"
if [ ! -f "$ckpt/latest" ]; then
    rm -rf "$ckpt"
    python3 scripts/make_deepspeed_scale.py "$ckpt" --ranks "$ranks" >&2
fi
disk_kb=$(du -sk "$ckpt" | cut -f1)
apparent_kb=$(du -sk --apparent-size "$ckpt" | cut -f1)
if [ "$disk_kb" -gt $(( apparent_kb / 10 )) ]; then
    echo "bench-deepspeed-scale: $ckpt takes $disk_kb KB on disk for $apparent_kb KB: no holes here?" >&2
    exit 1
fi
pkl_bytes=$(python3 - "$ckpt" <<'PY'
import glob, os, sys, zipfile
tot = 0
for p in glob.glob(os.path.join(sys.argv[1], "global_step1", "*.pt")):
    tot += next(i.file_size for i in zipfile.ZipFile(p).infolist() if i.filename.endswith("/data.pkl"))
print(tot)
PY
)

out=$run/out-unused
for c in dry1 dry2 dry2s; do : > "$run/t.$c"; rm -f "$run"/rss."$c".*; done
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
echo "bench-deepspeed-scale: load average at start $load_start" >&2
# peak RSS per rank: /usr/bin/time inside mpirun, one file per rank
for rep in $(seq "$reps"); do
    set -- dry1 dry2 dry2s
    for i in 0 1 2; do
        k=$(( (i + rep - 1) % 3 + 1 ))
        case ${!k} in
            dry1)  timed "$run/t.dry1" sh -c 'exec /usr/bin/time -f %M -a -o "$0" "$@"' "$run/rss.dry1.0" \
                       "$bin" --dry-run --ranks "$ranks" "$ckpt" "$out" > "$run/dry1.txt" ;;
            dry2)  timed "$run/t.dry2" mpirun -n 2 sh -c \
                       'exec /usr/bin/time -f %M -a -o "$0.$OMPI_COMM_WORLD_RANK" "$@"' "$run/rss.dry2" \
                       "$bin" --dry-run "$ckpt" "$out" > "$run/dry2.txt" ;;
            dry2s) timed "$run/t.dry2s" mpirun -n 2 sh -c \
                       'exec /usr/bin/time -f %M -a -o "$0.$OMPI_COMM_WORLD_RANK" "$@"' "$run/rss.dry2s" \
                       "$bin" --dry-run --headers shared "$ckpt" "$out" > "$run/dry2s.txt" ;;
        esac
    done
done
[ ! -e "$out" ] || { echo "bench-deepspeed-scale: --dry-run wrote $out" >&2; exit 1; }
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
echo "bench-deepspeed-scale: load average at end $load_end" >&2
python3 - "$run" "$ranks" "$reps" "$load_start" "$load_end" "$pkl_bytes" "$disk_kb" "$apparent_kb" "$(nproc)" \
    > "$run/results.md" <<'PY'
import glob, statistics, sys
work, ranks, reps, l0, l1, pkl, disk, apparent, cores = sys.argv[1:]
med = lambda c: statistics.median(float(x) for x in open(f"{work}/t.{c}"))
def peaks(c):
    return [max(int(x) for x in open(p)) / 1024 for p in sorted(glob.glob(f"{work}/rss.{c}.*"))]
plan = open(f"{work}/dry1.txt").read().splitlines()
head = next(l for l in plan if l.startswith("plan:"))
print(f"Llama-70B layout (80 layers, hidden 8192, intermediate 28672, 64/8 heads, vocab 128256, untied): "
      f"ZeRO-3 from {ranks} ranks, {2 * int(ranks)} pickles ({int(pkl) / 1e6:.1f} MB of data.pkl in all), "
      f"{int(apparent) * 1024 / 1e9:.0f} GB apparent, {int(disk) * 1024 / 1e6:.0f} MB on disk. `{head}`")
print()
print(f"{reps} repetitions alternated, medians; {cores} cores; load average at start {l0}, at end {l1}.")
print()
print("| command | median s | peak RSS MB per rank |")
print("|---|---|---|")
names = {"dry1": f"`--dry-run --ranks {ranks}` (1 process)", "dry2": "`mpirun -n 2 ... --dry-run` (headers all)",
         "dry2s": "`mpirun -n 2 ... --dry-run --headers shared`"}
for c in ("dry1", "dry2", "dry2s"):
    print(f"| {names[c]} | {med(c):.2f} | {' / '.join(f'{x:.0f}' for x in peaks(c))} |")
PY
cat "$run/results.md"
