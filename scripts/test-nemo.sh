#!/usr/bin/env bash
# NeMo Automodel 0.7.0 as the reference (issue 18): folders laid out as NeMo
# saves them (model/ with the shards, model/.hf_metadata/ with both mappings,
# a config, tokenizer files and a subfolder) are consolidated by this tool
# with no option but --dtype, as `st-consolidate-mpi ckpt/model
# ckpt/model/consolidated`, under no launcher and mpirun -n 1, 2 and 3, and
# must equal what NeMo's consolidate_safetensors_files_on_every_rank writes
# with the two mappings and the cast, followed by its offline tool's copy
# rule (scripts/nemo_reference.py): every tensor's name, dtype, shape and
# bytes, the index's weight_map and total_size, the set of non-weight files
# and config.json's dtype. The tensors cover every branch of NeMo's dtype
# rules, with random bits (NaNs included) so each conversion is compared.
#
# nemo-automodel is installed with --no-deps into target/torch-venv: its
# consolidation backport imports with torch alone.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
venv=target/torch-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import torch, safetensors, numpy" 2>/dev/null ||
    "$venv/bin/pip" install -q "torch==2.15.0" "safetensors==0.8.0" numpy
"$venv/bin/python" -c "import nemo_automodel.components.checkpoint._backports.consolidate_hf_safetensors" 2>/dev/null ||
    "$venv/bin/pip" install -q --no-deps "nemo-automodel==0.7.0"
cargo build --release --quiet --bins
bin=$PWD/target/release/st-consolidate-mpi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

passed=0
failed=0
check() { # description, then the command
    local name=$1
    shift
    if "$@" >"$work/log" 2>&1; then
        passed=$((passed + 1))
    else
        echo "FAILED: $name"
        cat "$work/log"
        failed=$((failed + 1))
    fi
}
# ranks (0: no launcher), checkpoint, output, reference, then extra options
consolidate_and_compare() {
    local ranks=$1 ckpt=$2 out=$3 ref=$4
    shift 4
    rm -rf "$out"
    if [ "$ranks" = 0 ]; then
        "$bin" -q "$@" "$ckpt/model" "$out"
    else
        mpirun -n "$ranks" "$bin" -q "$@" "$ckpt/model" "$out"
    fi
    "$venv/bin/python" scripts/nemo_reference.py compare "$out" "$ref"
}
for names in shard model; do
    ckpt=$work/ckpt-$names
    "$venv/bin/python" scripts/nemo_reference.py make "$ckpt" --names "$names"
    for cast in none bf16 f16 f32; do
        ref=$work/ref-$names-$cast
        flag=()
        cast_arg=()
        if [ "$cast" != none ]; then
            flag=(--dtype "$cast")
            # NeMo's alias for the same dtype (resolve_dtype_cast).
            cast_arg=(--cast "$(echo "$cast" | sed "s/^f\([0-9]\)/fp\1/")")
        fi
        "$venv/bin/python" scripts/nemo_reference.py nemo "$ckpt" "$ref" "${cast_arg[@]}" 2>"$work/nemo.log" ||
            { cat "$work/nemo.log"; exit 1; }
        for ranks in 0 1 2 3; do
            check "$names names, --dtype $cast, $ranks ranks" \
                consolidate_and_compare "$ranks" "$ckpt" "$ckpt/model/consolidated" "$ref" "${flag[@]}"
        done
    done
done
echo "nemo: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
