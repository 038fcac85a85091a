#!/usr/bin/env bash
# The whole suite under another torch release (with the Triton it pins), on a clean clone of the committed
# tree, in a virtual environment of its own; the project's .venv is not touched.
#
#   bash scripts/test_other_torch.sh TORCH_VERSION [WORKDIR]      e.g. 2.11.0 (WORKDIR: /tmp/fused_margin-torch-V)
#
# The index may only have a CUDA build of that torch (several GB): on a machine without a GPU its CUDA
# kernels are then compiled and linked (the build a GPU machine with that torch makes) and the `cuda` tests
# skipped. Extra pytest arguments go in PYTEST_ARGS (e.g. PYTEST_ARGS='-m "not slow"'); PYTHON picks the
# interpreter of the new venv (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: bash scripts/test_other_torch.sh TORCH_VERSION [WORKDIR]}
WORK=${2:-/tmp/fused_margin-torch-$VERSION}
mkdir -p "$WORK"
[ -x "$WORK/venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q "torch==$VERSION"
rm -rf "$WORK/tree"
git clone -q . "$WORK/tree"
cd "$WORK/tree"
"$PY" scripts/ensure_deps.py requirements-dev.txt  # keeps that torch and its Triton, adds the rest
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import torch, triton; from fused_margin.backends import extension
print('[test_other_torch] torch', torch.__version__, 'triton', triton.__version__, '|', extension.describe())"
export TRITON_INTERPRET="${TRITON_INTERPRET:-$("$PY" -c 'import torch; print(0 if torch.cuda.is_available() else 1)')}"
eval "\"$PY\" -m pytest -q -ra -p no:cacheprovider tests ${PYTEST_ARGS:-}"
