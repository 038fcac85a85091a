#!/usr/bin/env bash
# The Triton tests under the newest tested Triton (requirements-triton-newest.txt), installed into a folder of
# its own (.venv/triton-<version>, put first on PYTHONPATH) so the main virtual environment keeps the pinned
# Triton. Every Triton kernel and option runs in the interpreter (tests/backends/test_triton.py; the memory-lean and
# launch-count tests' Triton cases; the Triton fuzz), and every kernel is compiled for sm_90 with its
# registers and spills printed. Extra arguments go to pytest. CI runs it after scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
requirement=$(grep -E '^triton==' requirements-triton-newest.txt)
version=${requirement#triton==}
target=.venv/triton-$version
if [ ! -f "$target/.complete" ]; then
  echo "[newest-triton] installing $requirement into $target"
  rm -rf "$target"
  .venv/bin/python -m pip install -q --no-deps --target "$target" "$requirement"
  touch "$target/.complete"
fi
export PYTHONPATH="$PWD/$target${PYTHONPATH:+:$PYTHONPATH}"
found=$(.venv/bin/python -c 'import triton; print(triton.__version__)')
[ "$found" = "$version" ] || { echo "[newest-triton] expected Triton $version, found $found" >&2; exit 1; }
echo "[newest-triton] Triton $found"
env -u TRITON_INTERPRET .venv/bin/python tests/helpers/sm90_compile.py
export TRITON_INTERPRET="${TRITON_INTERPRET:-$(.venv/bin/python -c 'import torch; print(0 if torch.cuda.is_available() else 1)')}"
exec .venv/bin/python -m pytest -q -ra -p no:cacheprovider tests/backends/test_triton.py tests/integration/test_versions.py \
  tests/paths/test_lean.py tests/paths/test_op_budget.py tests/backends/test_fuzz.py -k "triton or Triton or test_versions" "$@"
