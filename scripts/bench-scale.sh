#!/usr/bin/env bash
# The DCP `.metadata` scale benchmark (issue 20): checkpoints with the
# metadata of a model saved by FSDP on 512 ranks, tiny chunks
# (scripts/make_dcp_scale.py), at 20k, 80k and 582k chunks (1137 tensors x
# 512 ranks, a 405B Llama's count). For each size, in one run:
#   - `--dry-run --ranks 512`: wall time and peak RSS;
#   - Python's `pickle.load` of the same .metadata: wall time and peak RSS
#     (it imports torch to unpickle, as every Python converter must; the
#     import alone is timed too);
#   - `mpirun -n 2 --headers shared` and `--headers all`, full runs into
#     files of at most 100 KB: each rank's peak RSS, and each rank's chunks
#     located and archive bytes read, and the bytes of the inputs' ends it
#     read for their identity signatures (from --report); the output
#     checked against the manifest (every tensor's shape and bytes).
# Prints a markdown table for BENCHMARKS.md.
#
#   scripts/bench-scale.sh [SIZES...]     (default: 20k 80k 582k)
#
# The checkpoints are made once under target/dcp-scale/ and reused (the
# 582k one takes about 1 GB and a few minutes to make); remove them with
#   rm -rf target/dcp-scale
# TORCH_VENV names another PyTorch venv (default target/torch-venv). Run on
# a quiet machine: the figures are wall times.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh >/dev/null
venv=${TORCH_VENV:-target/torch-venv}
[ -x "$venv/bin/python" ] || { echo "run scripts/setup.sh first (PyTorch venv)" >&2; exit 1; }
cargo build --release --quiet --bin st-consolidate-mpi
bin=target/release/st-consolidate-mpi
root=target/dcp-scale
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(20k 80k 582k)

tensors_for() {
    case $1 in
        20k) echo 40 ;;    # 20,480 chunks
        80k) echo 157 ;;   # 80,384 chunks
        582k) echo 1137 ;; # 582,144 chunks
        *) echo "unknown size $1 (20k, 80k or 582k)" >&2; exit 1 ;;
    esac
}

# peak RSS in MB from a /usr/bin/time -f "%e %M" file: "secs MB"
secs_mb() { awk '{printf "%.2f %.0f", $1, $2 / 1024}' "$1"; }

echo "| chunks | .metadata MB | dry-run --ranks 512 s | dry-run peak RSS MB | pickle.load s | pickle.load peak RSS MB | of which import torch s / MB | dry-run / pickle.load | shared 2 ranks: rank 0 MB | rank 1 MB | chunks located (archive bytes read), rank 0 / rank 1 | identity MiB read, rank 0 / rank 1 | all 2 ranks: rank 0 MB | rank 1 MB | chunks located (archive bytes read), rank 0 / rank 1 | identity MiB read, rank 0 / rank 1 | output |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for size in "${sizes[@]}"; do
    tensors=$(tensors_for "$size")
    dir=$root/$size
    if [ ! -f "$dir/manifest.json" ]; then
        rm -rf "$dir"
        "$venv/bin/python" scripts/make_dcp_scale.py "$dir" --tensors "$tensors" --ranks 512 >&2
    fi
    ckpt=$dir/checkpoint
    meta_mb=$(awk -v b="$(stat -c %s "$ckpt/.metadata")" 'BEGIN{printf "%.1f", b / 1e6}')
    /usr/bin/time -f "%e %M" -o "$work/dry" "$bin" -q --dry-run --ranks 512 "$ckpt" "$work/unused" > /dev/null
    /usr/bin/time -f "%e %M" -o "$work/py" "$venv/bin/python" -c \
        'import pickle, sys; pickle.load(open(sys.argv[1], "rb"))' "$ckpt/.metadata"
    /usr/bin/time -f "%e %M" -o "$work/import" "$venv/bin/python" -c \
        'import torch.distributed.checkpoint.metadata, torch.distributed.checkpoint.filesystem'
    read -r imp_s imp_mb <<<"$(secs_mb "$work/import")"
    read -r dry_s dry_mb <<<"$(secs_mb "$work/dry")"
    read -r py_s py_mb <<<"$(secs_mb "$work/py")"
    # Full 2-rank runs under both header modes, into files of at most
    # 100 KB (4 to 93 of them), so that each rank writes about half the
    # files and locates about half the chunks: each rank's peak RSS, and
    # from --report each rank's chunks located and archive bytes read.
    mem="" checks=""
    for headers in shared all; do
        rm -rf "$work/out" "$work/report.json"
        mpirun -n 2 sh -c '/usr/bin/time -f "%e %M" -o "$0.$OMPI_COMM_WORLD_RANK" "$@"' "$work/rank" \
            "$bin" -q --headers "$headers" --max-shard-size 100KB --report "$work/report.json" "$ckpt" "$work/out"
        read -r _ rank0_mb <<<"$(secs_mb "$work/rank.0")"
        read -r _ rank1_mb <<<"$(secs_mb "$work/rank.1")"
        located=$("$venv/bin/python" -c '
import json, sys
ranks = json.load(open(sys.argv[1]))["ranks"]
shown = ["{:,} ({:.0f} MB)".format(r["chunks_located"], r["archive_bytes_read"] / 1e6) for r in ranks]
identity = ["{:.1f}".format(r.get("identity_bytes_read", 0) / 2**20) for r in ranks]
print(" / ".join(shown) + " | " + " / ".join(identity))
' "$work/report.json")
        mem="$mem | $rank0_mb | $rank1_mb | $located"
        checks="${checks:+$checks; }$headers: $("$venv/bin/python" scripts/check_manifest.py "$work/out" "$dir/manifest.json" | tail -n 1)"
    done
    ratio=$(awk -v a="$dry_s" -v b="$py_s" 'BEGIN{printf "%.2f", a / b}')
    echo "| $((tensors * 512)) | $meta_mb | $dry_s | $dry_mb | $py_s | $py_mb | $imp_s / $imp_mb | $ratio$mem | $checks |"
done
echo
echo "checkpoints kept in $root for the next run; remove them with: rm -rf $root"
