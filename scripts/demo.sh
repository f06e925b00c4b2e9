#!/usr/bin/env bash
# The main job on the small checkpoint kept in the repo: a real PyTorch DCP
# checkpoint saved from 2 ranks, consolidated by 4 MPI ranks, then checked
# against the sha256 of every full tensor. Its 2 output files are spread
# over all 4 ranks (--schedule balanced): under the default schedule, one
# rank per file, 2 ranks would sit idle (and the tool would say so).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo build --release --quiet

input=tests/fixtures/torch-dcp-w2
output=${1:-target/demo-output}
rm -rf "$output"
echo "\$ mpirun -n 4 st-consolidate-mpi --schedule balanced --mapping $input/mapping.json $input $output"
mpirun -n 4 target/release/st-consolidate-mpi --schedule balanced --mapping "$input/mapping.json" "$input" "$output"
echo
ls -l "$output"
echo
head -c 400 "$output/model.safetensors.index.json"; echo " ..."
echo
echo "checking every tensor's sha256 against $input/manifest.json:"
python3 scripts/check_manifest.py "$output" "$input/manifest.json"
