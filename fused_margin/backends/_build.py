"""How the C++/CUDA extension ``fused_margin._C`` is built: its sources, flags and CUDA decision, in one
place for ``setup.py`` (a build at install time) and :mod:`fused_margin.backends.extension` (a build on first use,
through ``torch.utils.cpp_extension.load``).

* The CPU kernels are always built (``-O3``, OpenMP as torch's ``at::parallel_for`` uses it); on x86-64
  Linux they are compiled three times, baseline, AVX2 and AVX-512 (``csrc/row_kernel_cpu_avx*.cpp``), and
  the widest one torch itself uses on the machine is picked at run time.
* The CUDA kernels are built when torch is a CUDA build and a CUDA toolkit (nvcc) is found. Without
  ``CUDA_HOME``/``CUDA_PATH`` the toolkit is the one nvcc on the PATH reports (``nvcc --dryrun`` names its
  own folder, also when the nvcc on the PATH is a wrapper script). The architectures follow
  ``TORCH_CUDA_ARCH_LIST``; without it and without a visible GPU (a build machine), :data:`DEFAULT_ARCHS`.
* One floating-point rule for every backend: no contraction of ``a * b + c`` into FMAs, so
  ``z' = raw * row_scale * col_scale + col_shift`` and the logits round as torch's eager ops do
  (``-ffp-contract=off`` here, ``--fmad=false`` for nvcc, ``enable_fp_fusion=False`` on the Triton launches).

Environment: ``FUSED_MARGIN_NO_EXT=1`` builds nothing (pure Python: the reference and Triton backends);
``FUSED_MARGIN_CUDA=0`` builds without the CUDA kernels, ``FUSED_MARGIN_CUDA=1`` requires them (an error
saying why when they cannot be built); ``MAX_JOBS`` bounds the parallel compile jobs.

This module imports nothing of fused_margin, and torch only inside its functions: ``setup.py`` loads it by
path, also where torch is missing.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import List, Optional

#: the fused_margin package's folder, and the C++/CUDA sources' one inside it
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(PACKAGE_DIR, "backends", "csrc")

#: architectures of a CUDA build on a machine without a visible GPU and without TORCH_CUDA_ARCH_LIST:
#: Turing (T4), Ampere (A100; its cubins run on the 8.6/8.9 consumer parts) and Hopper, plus Hopper's
#: PTX, which the driver compiles for newer GPUs (Blackwell)
DEFAULT_ARCHS = "7.5;8.0;9.0+PTX"


def flag(name: str) -> Optional[bool]:
    """``None`` when the variable is unset or empty, else whether it is truthy (1/true/yes/on)."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


def _nvcc_root(nvcc: str) -> Optional[str]:
    """The toolkit folder of ``nvcc`` as it reports it (``#$ TOP=...`` of ``--dryrun``), or None."""
    try:
        result = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", result.stdout + result.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit folder: ``CUDA_HOME`` or ``CUDA_PATH`` where set, else the folder the nvcc on the PATH
    reports, else None."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return os.environ[name]
    nvcc = shutil.which("nvcc")
    return _nvcc_root(nvcc) if nvcc else None


def locate_cuda_home() -> Optional[str]:
    """:func:`find_cuda_home`, also set as ``CUDA_HOME`` where neither ``CUDA_HOME`` nor ``CUDA_PATH`` is set.
    Call before importing ``torch.utils.cpp_extension``, which otherwise takes the folder above nvcc's (wrong
    for a wrapper script such as ``/usr/local/bin/nvcc``: ``cannot find -lcudart``)."""
    root = find_cuda_home()
    if root is not None and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        os.environ["CUDA_HOME"] = root
    return root


@dataclass
class Plan:
    """What to build. ``sources`` are relative to the project root for setup.py, absolute otherwise."""

    sources: List[str]
    cxx_flags: List[str]
    nvcc_flags: List[str]
    link_flags: List[str]
    include_dirs: List[str]
    with_cuda: bool
    #: one line: which kernels are built and why the CUDA kernels are or are not
    summary: str
    notes: List[str] = field(default_factory=list)


def cuda_problem(torch, cuda_home: Optional[str]) -> Optional[str]:
    """Why the CUDA kernels cannot be built with ``torch`` and the toolkit at ``cuda_home``, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if cuda_home is None:
        return "no CUDA toolkit found (nvcc is not on the PATH; set CUDA_HOME to the toolkit's folder)"
    if not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return f"nvcc not found under CUDA_HOME={cuda_home}"
    return None


def plan(relative_to: Optional[str] = None) -> Plan:
    """The build of ``fused_margin._C`` on this machine. ``relative_to``: make the source paths relative to
    that folder (setup.py's project root). Raises ``RuntimeError`` when ``FUSED_MARGIN_CUDA=1`` and the CUDA
    kernels cannot be built. Imports torch (its ``cpp_extension`` after :func:`locate_cuda_home`)."""
    cuda_home = locate_cuda_home()
    import torch

    want_cuda = flag("FUSED_MARGIN_CUDA")
    problem = cuda_problem(torch, cuda_home)
    if want_cuda and problem:
        raise RuntimeError(f"FUSED_MARGIN_CUDA=1 but the CUDA kernels cannot be built: {problem}")
    with_cuda = want_cuda is not False and problem is None
    notes = []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # torch would take the visible GPUs' architectures, and with none fails (IndexError)
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
            notes.append(f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: architectures {DEFAULT_ARCHS}")
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "those of the visible GPUs"
        summary = f"CPU and CUDA kernels (CUDA {torch.version.cuda} at {cuda_home}, architectures {archs})"
    elif want_cuda is False:
        summary = "CPU kernels only: FUSED_MARGIN_CUDA=0"
    else:
        summary = f"CPU kernels only: {problem}"

    x86_linux = platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux")
    # The AVX2/AVX-512 objects share no inline function of fused_margin's own (row_math.h and the kernels
    # live in namespaces named after the instruction set; csrc/row_kernel_cpu.h). Inline code of
    # third-party headers (c10, the standard library) is still emitted in every object: the baseline objects
    # come first so that GNU ld keeps their copies (see csrc/row_kernel_cpu_avx2.cpp); tests/backends/test_cpu_isa.py
    # checks the linked extension for AVX instructions outside those namespaces.
    names = ["fused_margin.cpp", "row_kernel_cpu.cpp", "class_block_cpu.cpp"]
    if with_cuda:
        names.append("fused_margin_cuda.cu")
    defines = []
    if x86_linux:
        names += ["row_kernel_cpu_avx2.cpp", "row_kernel_cpu_avx512.cpp"]
        defines.append("-DFUSED_MARGIN_HAVE_ISA_KERNELS")
    if with_cuda:
        defines.append("-DFUSED_MARGIN_WITH_CUDA")
    sources = [os.path.join(CSRC, n) for n in names]
    if relative_to is not None:
        sources = [os.path.relpath(s, relative_to) for s in sources]
    openmp = [] if sys.platform == "darwin" or os.name == "nt" else ["-fopenmp"]
    cxx_flags = ["-O3", "-ffp-contract=off", "-Wno-psabi", "-Wno-unknown-pragmas"] + openmp + defines
    nvcc_flags = ["-O3", "--fmad=false"] + defines if with_cuda else []
    return Plan(sources, cxx_flags, nvcc_flags, openmp, [CSRC], with_cuda, summary, notes)


def build_directory(torch, with_cuda: bool, version: str) -> str:
    """Where the build on first use keeps its objects: under torch's extensions folder
    (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), one folder per Python, torch and
    fused_margin ``version``, so an upgrade of either rebuilds instead of loading a stale library."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if with_cuda else "cpu"
    tag = f"fused_margin-{version}-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{flavour}"
    return os.path.join(root, re.sub(r"[^A-Za-z0-9_.+-]", "_", tag))
