#!/usr/bin/env bash
# The test command: set up, then run the whole suite. Triton kernels run on the CPU through the
# interpreter; tests marked `cuda` run only where a GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TRITON_INTERPRET="${TRITON_INTERPRET:-$(.venv/bin/python -c 'import torch; print(0 if torch.cuda.is_available() else 1)')}"
exec .venv/bin/python -m pytest -q -ra tests "$@"
