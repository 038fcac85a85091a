#!/usr/bin/env bash
# Downloads the wheels of requirements-anchors.txt (no dependencies: they use the machine's torch and
# Triton) into a folder, .whl/ by default, on a machine that reaches a package index, so that they can be
# copied to a GPU machine that does not; scripts/gpu_check.sh installs .whl/*.whl when it finds them.
#
#   bash scripts/anchor_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
mkdir -p "$DIR"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DIR" -r requirements-anchors.txt
ls -l "$DIR"
