#!/usr/bin/env bash
# Makes target/ds-venv: DeepSpeed 0.19.8 (PyPI) on top of the torch that
# target/torch-venv already holds. The new venv sees torch-venv's
# site-packages through a .pth file, so torch (about 6 GB) is not installed a
# second time; a constraints file pins torch to the version found there, so
# pip can never replace it. Idempotent: a second run checks and returns.
#
# Then run the fixture generator with:
#   DS_ACCELERATOR=cpu PATH=$PWD/target/ds-venv/bin:$PATH \
#     target/ds-venv/bin/python scripts/make_deepspeed_fixtures.py
# (ninja from the venv must be on PATH and g++ installed: DeepSpeed's CPU
# backend JIT-builds its shm_comm op on the first init_distributed, about a
# minute once, then cached in ~/.cache/torch_extensions).
#
# Environment: TORCH_VENV (default target/torch-venv), DS_VENV (default
# target/ds-venv), DEEPSPEED_VERSION (default 0.19.8).
set -euo pipefail
cd "$(dirname "$0")/.."

torch_venv=${TORCH_VENV:-target/torch-venv}
venv=${DS_VENV:-target/ds-venv}
version=${DEEPSPEED_VERSION:-0.19.8}
export DS_ACCELERATOR=cpu

if [ ! -x "$torch_venv/bin/python" ]; then
    echo "setup-deepspeed: $torch_venv/bin/python not found; make target/torch-venv first" \
         "(scripts/test-transformers.sh) or point TORCH_VENV at a venv with torch" >&2
    exit 1
fi
torch_site=$(cd "$torch_venv" && "$PWD/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
torch_version=$("$torch_venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')

check() {
    "$venv/bin/python" - "$version" "$torch_site" <<'EOF'
import os, sys, importlib.metadata as m
import torch, deepspeed
want, site = sys.argv[1], sys.argv[2]
assert deepspeed.__version__ == want, f"deepspeed {deepspeed.__version__}, want {want}"
where = os.path.realpath(os.path.dirname(os.path.dirname(torch.__file__)))
assert where == os.path.realpath(site), f"torch comes from {where}, not {site}"
print(f"setup-deepspeed: deepspeed {deepspeed.__version__}, torch {torch.__version__} from {where}")
EOF
}

if [ -x "$venv/bin/python" ] && check 2>/dev/null; then
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    # the same interpreter as torch-venv (a venv made from a venv's python
    # uses its base interpreter)
    "$torch_venv/bin/python" -m venv "$venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$torch_site" > "$site/torch-venv.pth"

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"
"$venv/bin/pip" install --quiet -c "$constraints" "deepspeed==$version"
if [ -e "$site/torch" ]; then
    echo "setup-deepspeed: pip installed a torch into $site; remove $venv and check $torch_venv" >&2
    exit 1
fi
check
