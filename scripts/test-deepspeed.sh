#!/usr/bin/env bash
# The DeepSpeed end-to-end round trip (issue 26), run by scripts/test.sh:
#   1. scripts/deepspeed_roundtrip.py train: 2 gloo ranks train a tiny
#      LlamaForCausalLM with tied embeddings under DeepSpeed 0.19.8 ZeRO-3 on
#      CPU (bf16, AdamW torch_adam, 2 steps) and save HF Trainer's folder
#      checkpoint-2/ (engine.save_checkpoint, config.json, a 16-bit
#      model.safetensors); rank 0 keeps the live fp32 masters
#      (safe_get_full_fp32_param);
#   2. consolidated by one command each, --hf-assets pointing at that same
#      checkpoint folder for config.json: under mpirun -n 2 from checkpoint-2,
#      on 1 rank from the tag folder global_step2, and with --dtype bf16;
#   3. deepspeed_roundtrip.py check: OUTPUT_DIR loads with
#      LlamaForCausalLM.from_pretrained, no missing/unexpected keys,
#      lm_head tied to embed_tokens, every parameter bit-identical to the
#      masters (cast to bf16 for --dtype bf16), logits torch.equal to those of
#      the same model given the masters;
#   4. a negative control: one master changed by one ulp in a consolidated
#      file must make the check fail, naming the tensor;
#   5. python/tests/test_deepspeed.py with pytest in target/ds-venv: the
#      Python package's drop-ins for DeepSpeed's convert functions, through
#      patch(), against the fixtures' DeepSpeed-written references (the
#      wheel built and installed into target/torch-venv, which ds-venv sees).
# Prints "deepspeed: N passed, M failed"; exits non-zero on any failure.
# Needs target/torch-venv (made here as scripts/test-transformers.sh makes
# it if absent) and makes target/ds-venv on top of it
# (scripts/setup-deepspeed.sh). The first DeepSpeed init JIT-builds its CPU
# shm_comm op (about a minute, cached in ~/.cache/torch_extensions).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --all
source scripts/env.sh
cargo build --release --quiet --bin st-consolidate-mpi
venv=target/torch-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import torch, transformers, safetensors" 2>/dev/null ||
    "$venv/bin/pip" install -q "torch==2.15.0" "transformers==5.24.0" "safetensors==0.8.0" numpy
scripts/setup-deepspeed.sh

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bin=target/release/st-consolidate-mpi
py="$venv/bin/python"
passed=0
failed=0

if ! DS_ACCELERATOR=cpu target/ds-venv/bin/python scripts/deepspeed_roundtrip.py train "$work" >"$work/train.log" 2>&1; then
    tail -n 40 "$work/train.log"
    echo "FAILED: DeepSpeed ZeRO-3 training and save"
    echo "deepspeed: 0 passed, 1 failed"
    exit 1
fi
grep "^deepspeed_roundtrip:" "$work/train.log"
ckpt="$work/checkpoint-2"

# Each case: one command, then OUT checked. Every OUT is checked by one
# Python process (importing transformers takes most of its time).
declare -A made
consolidate() { # OUT COMMAND...
    local out=$1
    shift
    if "$@"; then made[$out]=1; else made[$out]=0; echo "FAILED: $*"; fi
}
# HF Trainer's checkpoint-N folder, 2 ranks, config.json from the same folder
consolidate out mpirun -n 2 "$bin" -q --hf-assets "$ckpt" "$ckpt" "$work/out"
# the tag folder, 1 rank
consolidate out-tag "$bin" -q --hf-assets "$ckpt" "$ckpt/global_step2" "$work/out-tag"
# --dtype bf16: the masters rounded to nearest even, config.json saying bfloat16
consolidate out-bf16 mpirun -n 2 "$bin" -q --dtype bf16 --hf-assets "$ckpt" "$ckpt" "$work/out-bf16"
# negative control: OUT with one element of one tensor one ulp off (the
# float's bits plus one), which the check must refuse, naming the tensor
ulp_tensor=model.layers.1.mlp.down_proj.weight
if [ "${made[out]}" = 1 ]; then
    cp -r "$work/out" "$work/out-ulp"
    python3 - "$work/out-ulp" "$ulp_tensor" <<'PY' && made[out-ulp]=1 || made[out-ulp]=0
import json, os, struct, sys
out, name = sys.argv[1], sys.argv[2]
for fname in os.listdir(out):
    if not fname.endswith(".safetensors"):
        continue
    with open(os.path.join(out, fname), "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        if name in header:
            assert header[name]["dtype"] == "F32"
            at = 8 + n + header[name]["data_offsets"][0] + 4 * 5
            f.seek(at)
            (bits,) = struct.unpack("<I", f.read(4))
            f.seek(at)
            f.write(struct.pack("<I", bits + 1))
            sys.exit(0)
sys.exit(f"{name} not found in {out}")
PY
fi

checks=()
for spec in out out-tag out-bf16:bf16 out-ulp; do
    [ "${made[${spec%%:*}]:-0}" = 1 ] && checks+=("$work/$spec")
done
: >"$work/check.log"
if [ ${#checks[@]} -gt 0 ]; then
    "$py" scripts/deepspeed_roundtrip.py check "$work" "${checks[@]}" 2>&1 | grep -v "Loading weights" >"$work/check.log" || true
fi
grep -v "^FAIL $work/out-ulp:" "$work/check.log" || true
for out in out out-tag out-bf16; do
    if [ "${made[$out]}" = 1 ] && grep -qx "PASS $work/$out" "$work/check.log"; then
        passed=$((passed + 1))
    else
        echo "FAILED: $out"
        failed=$((failed + 1))
    fi
done
if grep -qx "FAIL $work/out-ulp: AssertionError: $ulp_tensor: the file differs from the masters" "$work/check.log"; then
    echo "negative control: $ulp_tensor one ulp off in the output is refused"
    passed=$((passed + 1))
else
    echo "FAILED: negative control (the check did not refuse $ulp_tensor one ulp off)"
    failed=$((failed + 1))
fi

# The drop-ins for DeepSpeed's functions (the wheel as scripts/test-python.sh
# builds it; a no-op build when nothing changed).
"$venv/bin/python" -c "import maturin, pytest" 2>/dev/null ||
    "$venv/bin/pip" install -q "maturin>=1.9,<2" pytest
wheels="$work/wheels"
"$venv/bin/maturin" build --quiet --release -m python/Cargo.toml -o "$wheels"
"$venv/bin/pip" install -q --force-reinstall --no-deps "$wheels"/st_consolidate-*.whl
(cd "$wheels" && DS_ACCELERATOR=cpu "$OLDPWD/target/ds-venv/bin/python" -m pytest -q -p no:cacheprovider \
    "$OLDPWD/python/tests/test_deepspeed.py") >"$work/pytest.log" 2>&1 || true
summary=$(tail -n 1 "$work/pytest.log")
py_passed=$({ grep -oE '[0-9]+ passed' <<<"$summary" || true; } | grep -oE '[0-9]+' || echo 0)
py_failed=$({ grep -oE '[0-9]+ (failed|errors?)' <<<"$summary" || true; } | awk '{ n += $1 } END { print n + 0 }')
if [ "${py_failed:-0}" -ne 0 ] || [ "${py_passed:-0}" -eq 0 ]; then
    cat "$work/pytest.log"
    failed=$((failed + ${py_failed:-0} + 1 - (${py_passed:-0} > 0 ? 1 : 0)))
fi
passed=$((passed + ${py_passed:-0}))
echo "test_deepspeed.py: $summary"

echo "deepspeed: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
