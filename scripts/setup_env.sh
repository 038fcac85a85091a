#!/usr/bin/env bash
# Sets up .venv for fused_margin: reuses a CUDA torch already installed on the system (the GPU
# machine's), otherwise installs the pinned CPU torch; installs missing pinned dependencies; then
# installs the package (and builds its C++ extension) without build isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv; then
    # a system Python without ensurepip (Debian's without python3-venv): a venv without pip, which
    # then runs the pip of the base site-packages listed below
    echo "[setup] python -m venv failed; creating .venv without pip"
    rm -rf .venv
    "$PY" -m venv --without-pip .venv
  fi
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; then
    # The interpreter may itself be a venv (the GPU machine's is), which --system-site-packages would
    # skip: list its site-packages in a .pth instead, after the venv's own, so its CUDA torch is kept.
    echo "[setup] found a CUDA torch beside $PY: the venv will use it"
    site_dir=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$PY" -c "import site, sys; print('\n'.join(p for p in site.getsitepackages() + [site.getusersitepackages()] if p))" \
      > "$site_dir/_fused_margin_base_site.pth"
  fi
fi
VPY=.venv/bin/python
"$VPY" scripts/ensure_deps.py requirements-dev.txt
stamp=.venv/.fused_margin_installed
if [ ! -f "$stamp" ] || [ -n "$(find setup.py pyproject.toml fused_margin/backends/_build.py fused_margin/backends/csrc -newer "$stamp" 2>/dev/null | head -n 1)" ]; then
  echo "[setup] installing fused_margin (builds the C++ extension; about 2 minutes on 2 cores)"
  "$VPY" -m pip install -q --no-build-isolation --no-deps -e .
  touch "$stamp"
  "$VPY" -c "from fused_margin.backends import extension; print('[setup] C++ extension:', extension.describe())"
fi
