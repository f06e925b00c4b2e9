#!/usr/bin/env bash
# The Python package, run by scripts/test.sh: builds the st_consolidate wheel
# (maturin, abi3, no MPI), installs it into target/torch-venv beside
# PyTorch 2.15 and NeMo Automodel 0.7.0 (--no-deps: only its checkpoint
# code is used), and runs python/tests with pytest: the drop-ins against
# PyTorch's and NeMo's own functions, bad inputs, patch(), a background
# thread, and torchrun with gloo at 1, 2 and 4 ranks.
# Closing line: "python: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/torch-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import torch, transformers, safetensors, yaml" 2>/dev/null ||
    "$venv/bin/pip" install -q "torch==2.15.0" "transformers==5.24.0" "safetensors==0.8.0" numpy pyyaml
"$venv/bin/python" -c "import nemo_automodel" 2>/dev/null ||
    "$venv/bin/pip" install -q --no-deps "nemo-automodel==0.7.0"
"$venv/bin/python" -c "import maturin, pytest" 2>/dev/null ||
    "$venv/bin/pip" install -q "maturin>=1.9,<2" pytest
wheels=$(mktemp -d)
log=$(mktemp)
trap 'rm -rf "$wheels" "$log"' EXIT
"$venv/bin/maturin" build --quiet --release -m python/Cargo.toml -o "$wheels"
"$venv/bin/pip" install -q --force-reinstall --no-deps "$wheels"/st_consolidate-*.whl
# Run from outside the checkout so that the installed wheel is imported.
# test_deepspeed.py needs DeepSpeed: scripts/test-deepspeed.sh runs it in target/ds-venv.
(cd "$wheels" && "$OLDPWD/$venv/bin/python" -m pytest -q -p no:cacheprovider \
    --ignore "$OLDPWD/python/tests/test_deepspeed.py" "$OLDPWD/python/tests") 2>&1 | tee "$log" || true
summary=$(tail -n 1 "$log")
passed=$(grep -oE '[0-9]+ passed' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
# (grep finds nothing when nothing failed: under pipefail that must not end the script)
failed=$({ grep -oE '[0-9]+ (failed|errors?)' <<<"$summary" || true; } | awk '{ n += $1 } END { print n + 0 }')
echo "python: ${passed:-0} passed, ${failed:-0} failed"
[ "${failed:-0}" -eq 0 ] && [ "${passed:-0}" -gt 0 ]
