#!/usr/bin/env bash
# The scale simulation: sparse checkpoints (headers plus holes, nothing
# written to disk) shaped like a 70B and a 405B Llama, planned with
# --dry-run for 64 and 512 ranks. Prints a markdown table of plan time, peak
# memory and max/mean bytes per rank for both schedules.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --workspace --bins
make=target/release/st-make-shards
bin=target/release/st-consolidate-mpi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

#             name           layers hidden intermediate vocab  files source-ranks
models=("70B-4files       80     8192   28672        128256 4     64"
        "70B              80     8192   28672        128256 30    64"
        "405B             126    16384  53248        128256 191   128")

echo "| model | output files | shard files | plan ranks | plan s | peak RSS MB | modulo max/mean | modulo idle ranks | balanced max/mean | balanced idle ranks |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for model in "${models[@]}"; do
    read -r name layers hidden inter vocab files ranks <<<"$model"
    ckpt=$work/$name
    "$make" "$ckpt" --sparse --layout mixed --ranks "$ranks" --files "$files" --layers "$layers" \
        --hidden "$hidden" --intermediate "$inter" --vocab "$vocab" 2>/dev/null
    shards=$(find "$ckpt" -name 'shard-*.safetensors' | wc -l)
    for plan_ranks in 64 512; do
        /usr/bin/time -f "%e %M" -o "$work/time" "$bin" --dry-run --ranks "$plan_ranks" \
            --mapping "$ckpt/mapping.json" "$ckpt" "$work/unused" > "$work/plan"
        read -r secs rss < "$work/time"
        read -r _ mod_ratio _ _ mod_idle _ < <(grep '^modulo' "$work/plan")
        read -r _ bal_ratio _ _ bal_idle _ < <(grep '^balanced' "$work/plan")
        echo "| $name | $files | $shards | $plan_ranks | $secs | $((rss / 1024)) | $mod_ratio | $mod_idle | $bal_ratio | $bal_idle |"
    done
    rm -rf "$ckpt"
done
