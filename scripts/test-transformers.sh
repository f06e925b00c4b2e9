#!/usr/bin/env bash
# The real-loader round trip, run by scripts/test.sh:
#   1. a tiny Llama made with transformers, saved with save_pretrained and,
#      from 3 gloo ranks, with PyTorch's HuggingFaceStorageWriter
#      (save_distributed=True), rows and columns sharded;
#   2. consolidated with mpirun -n 2 st-consolidate-mpi --hf-index (the
#      model's own index) --hf-assets (the model's folder: config files);
#   3. OUTPUT_DIR loaded as it is with AutoModelForCausalLM.from_pretrained:
#      no missing or unexpected keys, logits equal to the original's, every
#      tensor equal to PyTorch's own consolidation, no weight file copied;
#   4. consolidated again with --dtype bf16 and --dtype f16: every tensor
#      bit-identical to torch's tensor.to(dtype), config.json naming that
#      dtype, the model loading in it with the original's cast logits.
# PyTorch comes from PyPI (CPU use only) into target/torch-venv: about 6 GB
# and two minutes the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --all
source scripts/env.sh
cargo build --release --quiet --workspace --bins
venv=target/torch-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import torch, transformers, safetensors" 2>/dev/null ||
    "$venv/bin/pip" install -q "torch==2.15.0" "transformers==5.24.0" "safetensors==0.8.0" numpy

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export RT_PORT=$((20000 + RANDOM % 20000))
"$venv/bin/python" scripts/transformers_roundtrip.py save "$work" 2>&1 | grep -v "Writing model shards"
bin=target/release/st-consolidate-mpi
index="$work/model/model.safetensors.index.json"
mpirun -n 2 "$bin" -q --hf-index "$index" --hf-assets "$work/model" "$work/shards" "$work/out"
"$venv/bin/python" scripts/transformers_roundtrip.py check "$work" "$work/out" 2>&1 | grep -v "Loading weights"
for dtype in bf16 f16; do
    mpirun -n 2 "$bin" -q --dtype "$dtype" --hf-index "$index" --hf-assets "$work/model" "$work/shards" "$work/out-$dtype"
    "$venv/bin/python" scripts/transformers_roundtrip.py cast "$work" "$work/out-$dtype" "$dtype"
done
# accelerate's FSDP folder (dcp.save({"model": state_dict}), written by
# PyTorch with scripts/make_layout_fixtures.py), consolidated with the
# README's example plus --hf-assets: transformers loads it, with the original
# model's names and weights.
orig=tests/fixtures/layout-orig
mpirun -n 2 "$bin" -q --hf-index "$orig/model.safetensors.index.json" --hf-assets "$orig" \
    tests/fixtures/layout-accelerate "$work/accelerate-out"
"$venv/bin/python" - "$orig" "$work/accelerate-out" <<'PY' 2>&1 | grep -v "Loading weights"
import sys
import torch
from transformers import AutoModelForCausalLM
orig = AutoModelForCausalLM.from_pretrained(sys.argv[1]).state_dict()
got = AutoModelForCausalLM.from_pretrained(sys.argv[2]).state_dict()
assert got.keys() == orig.keys(), sorted(set(got) ^ set(orig))
for name, tensor in orig.items():
    assert torch.equal(got[name], tensor), name
print(f"accelerate layout: {len(got)} tensors load with transformers, equal to the original")
PY
echo "transformers: 2 passed, 0 failed"
