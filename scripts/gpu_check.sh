#!/usr/bin/env bash
# The GPU check: one command that sets up, builds the extension with its CUDA kernels, runs the
# GPU tests and the benchmark harness, and writes everything under one folder.
#
#   bash scripts/gpu_check.sh OUTDIR [BUDGET_SECONDS]          (default budget: 480 s)
#   bash scripts/gpu_check.sh --dry-run OUTDIR                 (CPU rehearsal: every phase, tiny shapes)
#
# Made for a fresh GPU machine with no network and little time (a few minutes): it keeps the
# machine's CUDA torch and Triton (scripts/setup_env.sh reuses them, pip never reaches an index),
# runs its phases in order of importance, each under a time limit taken from what is left of the
# budget, and goes on after a phase fails, so a broken build or a crashing kernel still leaves the
# environment, the logs and every other phase's results. Phases (a log each, OUTDIR/<phase>.log):
#
#   env            nvidia-smi, nvcc, python/torch/triton versions, the GPU's name and capability
#   build          scripts/setup_env.sh with the CUDA kernels required (FUSED_MARGIN_CUDA=1); if
#                  that fails, again without them, so the Triton backend is still checked; then the
#                  plain-CE anchors' wheels carried in .whl/ (scripts/anchor_wheels.sh), if any
#   bench-inat-bf16  the harness on the inat preset (B=512 D=2048 C=8142) in bf16: reference,
#                  torch.compile of DBM-BS, triton, cuda, lean, plain-CE anchors, the GEMM floor
#   tests-cuda     the tests marked `cuda` (parity at large shapes, no host syncs, inductor)
#   profile        one DBM-BS step under torch.profiler per fused backend (and Triton with the separate
#                  row backward, triton/separate): kernel time vs wall
#                  time, ops per step, Triton registers/spills (scripts/profile_step.py)
#   bench-inat-fp32, bench-face-bf16, bench-vocab-bf16   the harness on the other shapes
#   tests-triton   the whole Triton test file on the GPU (every option, the compiled kernels)
#   sanitizer      compute-sanitizer memcheck over the extension's `cuda` tests (what the time allows)
#
# OUTDIR/summary.txt lists every phase with its exit status and seconds; OUTDIR/bench-*/ hold the
# harness's table.txt, results.json, results.csv and results.png; OUTDIR/tests-*.xml the JUnit
# reports. A harness run stopped by its time limit still writes the cases it measured (INTERRUPTED).
# On a machine that returns only a few files (e.g. a borrowed GPU with a 10-minute command limit):
#   bash scripts/gpu_check.sh /tmp/gc 480; tar czf "$OUT/gc.tgz" -C /tmp gc; cp /tmp/gc/summary.txt "$OUT/"
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/gpu_check.sh [--dry-run] OUTDIR [BUDGET_SECONDS]" >&2
  exit 2
fi
OUTDIR=$1
BUDGET=${2:-480}
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check: BUDGET_SECONDS must be a whole number of seconds, got '$BUDGET'" >&2; exit 2;; esac
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
SUMMARY="$OUTDIR/summary.txt"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
: > "$SUMMARY"

# never wait on a package index (the GPU machine has none); keep the machine's own packages
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
PY=.venv/bin/python

note() { echo "$*" | tee -a "$SUMMARY"; }

# phase NAME SECONDS COMMAND...: run COMMAND (a log in OUTDIR/NAME.log) for at most SECONDS, and no
# longer than what is left of the budget; skipped when under 15 s are left.
phase() {
  local name=$1 planned=$2; shift 2
  local now left limit rc t0
  now=$(date +%s); left=$((DEADLINE - now))
  limit=$(( planned < left ? planned : left ))
  if [ "$limit" -lt 15 ]; then
    note "$(printf '%-18s SKIPPED (budget spent: %ss left)' "$name" "$left")"
    return 0
  fi
  echo "[gpu_check] $name (at most ${limit}s) ..."
  t0=$(date +%s)
  # through bash -c: the commands may be this script's functions (exported below)
  timeout --signal=TERM --kill-after=15 "$limit" bash -c '"$@"' _ "$@" > "$OUTDIR/$name.log" 2>&1
  rc=$?
  local status="ok"
  [ $rc -ne 0 ] && status="FAILED (exit $rc)"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMED OUT after ${limit}s (exit $rc)"
  note "$(printf '%-18s %-34s %4ss   %s' "$name" "$status" "$(( $(date +%s) - t0 ))" "$name.log")"
  [ $rc -ne 0 ] && { tail -n 15 "$OUTDIR/$name.log"; echo; } | sed 's/^/    | /' | tee -a "$SUMMARY"
  return 0
}

env_report() {
  date -u
  uname -a
  nvidia-smi || echo "(no nvidia-smi)"
  nvidia-smi -q -d CLOCK,POWER,MEMORY 2>/dev/null | head -n 80
  nvcc --version || echo "(no nvcc on PATH)"
  python3 - <<'EOF'
import platform, sys
print("python", sys.version.replace("\n", " "), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
try:
    import triton
    print("triton", triton.__version__)
except Exception as error:
    print("triton: not importable:", error)
EOF
  python3 -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|pytest|hypothesis|ninja|setuptools|liger|cut)" || true
}

build() {
  if FUSED_MARGIN_CUDA=$BUILD_CUDA bash scripts/setup_env.sh; then
    install_anchors
    return 0
  fi
  echo "[gpu_check] the CUDA build failed (above); building the CPU kernels only so Triton is still checked"
  rm -f .venv/.fused_margin_installed
  FUSED_MARGIN_CUDA=0 bash scripts/setup_env.sh
  install_anchors
  return 3  # reported as a failure even when the fallback works
}

# the plain-CE anchors (Liger-Kernel, Cut Cross-Entropy) from wheels carried in .whl/
# (bash scripts/anchor_wheels.sh where an index is reachable); without them the harness skips both
install_anchors() {
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps .whl/*.whl || echo "[gpu_check] could not install .whl/*.whl"
  else
    echo "[gpu_check] no .whl/ wheels: the liger and cce anchors run only where already installed"
  fi
}

after_build() {
  "$PY" - <<'EOF'
import torch, fused_margin as fm
from fused_margin.backends import available_backends
print("fused_margin from", fm.__file__)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
for dtype in (torch.float32, torch.bfloat16):
    for name, status in available_backends(device, dtype).items():
        print(device, dtype, name, "->", status)
import importlib.metadata
for package in ("liger-kernel", "cut-cross-entropy"):
    try:
        print("anchor", package, importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        print("anchor", package, "not installed")
EOF
}

# the harness: bench NAME ARGS... -> OUTDIR/NAME/ (tables etc.) and OUTDIR/NAME.log
bench() {
  local name=$1; shift
  exec "$PY" -m fused_margin.bench --quiet --out "$OUTDIR/$name" "$@" $SHAPE
}

# compute-sanitizer's memcheck over the extension's CUDA tests (PyTorch's caching allocator off, so an
# access past a tensor is past its allocation); its errors make the phase fail
sanitize() {
  local tool
  tool=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null || true)
  if [ -z "$tool" ]; then
    echo "no compute-sanitizer on the PATH or in \$CUDA_HOME/bin: nothing checked"
    return 0
  fi
  # shellcheck disable=SC2086
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$tool" --tool memcheck --error-exitcode 9 --print-limit 20 \
    "$PY" -m pytest -v -p no:cacheprovider -x $SANITIZE_SELECT
}

pytest_args() {
  local extra=()
  "$PY" -c "import xdist" 2>/dev/null && extra+=(-n "${GPU_CHECK_WORKERS:-4}")
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 300)
  echo "${extra[@]}"
}

if [ $DRY -eq 1 ]; then
  # a rehearsal on this machine: the same phases at tiny shapes, Triton in its interpreter
  BUILD_CUDA=""  # whatever this machine can build
  SHAPE="--B 16 --D 32 --C 70 --min-reps 1 --max-reps 2 --target-time 0 --warmup 1 --input-sets 1"
  # face and vocab take the memory-lean path on a GPU (class_chunk="auto" past 64 MiB); at the tiny shape
  # chunks of 32 classes do, so the rehearsal runs the class-block kernels too (Triton's in its interpreter)
  LEAN_SHAPE="--class-chunk 32"
  export TRITON_INTERPRET=1
  TEST_SELECT=(tests/paths/test_op_budget.py)
  TRITON_SELECT=(tests/backends/test_triton.py -k "fp32 and block")
  PROFILE_SHAPE="--preset tiny --steps 2 --backends cpu,cpu/separate"
  SANITIZE_SELECT="tests/backends/test_extension.py -m cuda"
else
  BUILD_CUDA=1
  SHAPE=""
  LEAN_SHAPE=""
  export TRITON_INTERPRET=0
  TEST_SELECT=(-m cuda tests)
  TRITON_SELECT=(tests/backends/test_triton.py -m "not cuda")
  PROFILE_SHAPE="--preset inat --steps 20 --backends triton,triton/separate,cuda"
  SANITIZE_SELECT="tests/backends/test_extension.py -m cuda"
fi

export OUTDIR PY SHAPE LEAN_SHAPE BUILD_CUDA SANITIZE_SELECT
export -f env_report build install_anchors after_build bench sanitize
note "gpu_check $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+changes'), budget ${BUDGET}s, dry run $DRY, started $(date -u +%FT%TZ)"
phase env 60 env_report
phase build 240 build
phase import 60 after_build
if [ ! -x "$PY" ]; then
  note "no .venv: nothing more can run (see build.log)"
  exit 1
fi
phase bench-inat-bf16 150 bench bench-inat-bf16 --preset inat --dtype bf16 --losses dbm-bs,ldam,arcface \
  --backends reference,compile,triton,cuda,lean,torch-ce,liger,cce,floor --compile first
# shellcheck disable=SC2046
phase tests-cuda 150 "$PY" -m pytest -q -ra -p no:cacheprovider $(pytest_args) \
  --junitxml="$OUTDIR/tests-cuda.xml" "${TEST_SELECT[@]}"
# shellcheck disable=SC2086
phase profile 60 "$PY" scripts/profile_step.py --dtype bf16 --loss dbm-bs $PROFILE_SHAPE
phase bench-inat-fp32 60 bench bench-inat-fp32 --preset inat --dtype fp32 --losses dbm-bs \
  --backends reference,triton,cuda,lean,torch-ce,floor --compile none
# shellcheck disable=SC2086
phase bench-face-bf16 60 bench bench-face-bf16 --preset face --dtype bf16 --losses dbm-bs --heads cosine \
  --backends reference,triton,cuda,lean,torch-ce,liger,cce,floor --compile none $LEAN_SHAPE
# shellcheck disable=SC2086
phase bench-vocab-bf16 90 bench bench-vocab-bf16 --preset vocab --dtype bf16 --losses dbm-bs --heads cosine \
  --backends triton,cuda,lean,torch-ce,liger,cce,floor --compile none --check-rows 256 $LEAN_SHAPE
# shellcheck disable=SC2046
phase tests-triton 150 "$PY" -m pytest -q -ra -p no:cacheprovider $(pytest_args) \
  --junitxml="$OUTDIR/tests-triton.xml" "${TRITON_SELECT[@]}"
phase sanitizer 90 sanitize
grep -q "nothing checked" "$OUTDIR/sanitizer.log" 2>/dev/null && note "    | sanitizer: no compute-sanitizer found, nothing checked"

for table in "$OUTDIR"/bench-*/table.txt; do
  [ -f "$table" ] && { echo; echo "== ${table#$OUTDIR/}"; cat "$table"; } >> "$SUMMARY"
done
note ""
note "done in $(( $(date +%s) - START ))s; logs and results in $OUTDIR"
