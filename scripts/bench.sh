#!/usr/bin/env bash
# The main job: set up (.venv, dependencies, the package and its C++ extension), then run the
# benchmark harness. Without a GPU: a small CPU run (B=256 D=512 C=8142 fp32, about a minute); with
# one: the inat preset (B=512 D=2048 C=8142) in bf16. Arguments pass through to the harness, e.g.
#   bash scripts/bench.sh --preset face --mode fwd,fwdbwd      (see: bash scripts/bench.sh --help)
# Results go to benchmarks/results/<timestamp>/ (table.txt, results.json, results.csv, results.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m fused_margin.bench "$@"
