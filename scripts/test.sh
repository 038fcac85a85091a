#!/usr/bin/env bash
# The test command: set up, then run the whole suite. Triton kernels run on the CPU through the
# interpreter; tests marked `cuda` run only where a GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# lint and format (pyproject.toml's [tool.ruff]): seconds, before the tests; required in CI
if [ -x .venv/bin/ruff ]; then
  .venv/bin/ruff check --quiet . && .venv/bin/ruff format --check --quiet . || {
    echo "[test] ruff: fix with .venv/bin/ruff check --fix . && .venv/bin/ruff format ." >&2; exit 1; }
elif [ "${CI:-}" = "true" ]; then
  echo "[test] ruff is not installed: CI runs the lint" >&2; exit 1
else
  echo "[test] ruff is not installed: skipping the lint"
fi
export TRITON_INTERPRET="${TRITON_INTERPRET:-$(.venv/bin/python -c 'import torch; print(0 if torch.cuda.is_available() else 1)')}"
exec .venv/bin/python -m pytest -q -ra tests "$@"
