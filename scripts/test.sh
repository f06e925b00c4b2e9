#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit and property tests,
# and the end-to-end tests of the real binary under mpirun.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --all
source scripts/env.sh
setup_log=$(mktemp)

echo "== setup.sh detection (fake trees: libclang-cpp alone is not libclang)"
scripts/test-setup.sh | tee "$setup_log"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log" "$setup_log"' EXIT
cat "$setup_log" >>"$log"
cargo test --release --workspace 2>&1 | tee -a "$log"
echo "== the library without MPI (--no-default-features: what the Python extension builds)"
cargo clippy --release --lib --tests --no-default-features -- -D warnings
cargo test --release --no-default-features --lib --test run_api --test threads_comm 2>&1 | tee -a "$log"
echo "== demo"
scripts/demo.sh >"$log.demo" 2>&1 || { cat "$log.demo"; exit 1; }

echo "== outputs load with the Python safetensors library"
venv=target/pyenv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import safetensors, numpy" 2>/dev/null ||
    "$venv/bin/pip" install -q "safetensors==0.8.0" numpy
"$venv/bin/python" scripts/check_manifest.py target/demo-output tests/fixtures/torch-dcp-w2/manifest.json
cargo build --release --quiet --workspace --bins
zoo=$(mktemp -d)
trap 'rm -rf "$log" "$log.demo" "$zoo" "$setup_log"' EXIT
target/release/st-make-shards "$zoo/in" --layout zoo --ranks 8 --seed 8
mpirun -n 3 target/release/st-consolidate-mpi -q --mapping "$zoo/in/mapping.json" "$zoo/in" "$zoo/out"
"$venv/bin/python" scripts/check_manifest.py "$zoo/out" "$zoo/in/manifest.json"
echo "== launchers: Slurm (sbatch, srun pmix/pmi2), MPICH, 64 ranks"
scripts/test-launchers.sh | tee -a "$log"
echo "== emulated nodes (node-agent.sh: hostnames, node-local dirs, TCP, a node killed)"; scripts/test-nodes.sh | tee -a "$log"

echo "== transformers round trip (PyTorch writer, AutoModelForCausalLM, --dtype vs torch casts)"
scripts/test-transformers.sh | tee -a "$log"

echo "== NeMo Automodel 0.7.0 as the reference (.hf_metadata folders, dtype rules, 0-3 ranks)"
scripts/test-nemo.sh | tee -a "$log"

echo "== the Python package (drop-ins vs PyTorch's and NeMo's functions, patch(), torchrun with gloo)"
scripts/test-python.sh | tee -a "$log"

echo "== DeepSpeed ZeRO-3 round trip (tiny Llama trained by DeepSpeed 0.19.8 on CPU, from_pretrained, logits vs live fp32 masters) and the DeepSpeed drop-ins"
scripts/test-deepspeed.sh | tee -a "$log"

echo "== DCP outputs equal PyTorch's own reader (torch FileSystemReader, safetensors loads them)"
dcp_out=$(mktemp -d)
trap 'rm -rf "$log" "$log.demo" "$zoo" "$setup_log" "$dcp_out"' EXIT
dcp_passed=0
dcp_failed=0
for fixture in dcp-v215-w2 dcp-v215-w4-mesh dcp-v215-dtypes-t3 dcp-v25-w2; do
    ckpt=tests/fixtures/$fixture/checkpoint
    if mpirun -n 2 target/release/st-consolidate-mpi -q --exclude 'optim.*' "$ckpt" "$dcp_out/$fixture" &&
        target/torch-venv/bin/python scripts/check_dcp_reference.py "$ckpt" "$dcp_out/$fixture" --exclude-prefix optim. &&
        "$venv/bin/python" scripts/check_manifest.py "$dcp_out/$fixture" "tests/fixtures/$fixture/manifest.json"; then
        dcp_passed=$((dcp_passed + 1))
    else
        echo "FAILED: $fixture"
        dcp_failed=$((dcp_failed + 1))
    fi
done
echo "dcp-reference: $dcp_passed passed, $dcp_failed failed" | tee -a "$log"
[ "$dcp_failed" -eq 0 ]

echo "== benchmark smoke (20 MB, 1 run; real numbers come from scripts/bench.sh)"
BENCH_DIR=$(mktemp -d) scripts/bench.sh 0.02 1 | grep -E "^\| (mixed|tp|dcp) "

echo "== fuzz the header parser and the pickle interpreter (cargo fuzz, 20 s each)"
scripts/fuzz.sh 20

# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6 } /^(launchers|nodes|transformers|setup|dcp-reference|nemo|python|deepspeed):/ { p += $2; f += $4 }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
