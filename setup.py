"""fused_margin: the Python package and its C++/CUDA extension ``fused_margin._C``.

The extension holds the row kernels of the fused margin loss (``csrc/``, registered as
``torch.ops.fused_margin.row_forward`` / ``row_backward``):

* the CPU kernels are always built (``-O3``, OpenMP as torch's ``at::parallel_for`` uses it); on
  x86-64 with GCC they are compiled three times, baseline, AVX2 and AVX-512, and the widest one torch
  itself uses on the machine is picked at run time;
* the CUDA kernels are built when torch is a CUDA build and a CUDA toolkit (nvcc) is found; the
  architectures follow ``TORCH_CUDA_ARCH_LIST`` (torch's default: the visible GPUs).

Environment: ``FUSED_MARGIN_NO_EXT=1`` skips the extension (pure Python: every loss then runs on
the reference or the Triton backend); ``FUSED_MARGIN_CUDA=0`` builds without the CUDA kernels,
``FUSED_MARGIN_CUDA=1`` requires them (the build fails, saying why, when they cannot be built).
``MAX_JOBS`` bounds the parallel compile jobs (torch's ninja build). Install with
``pip install --no-build-isolation --no-deps -e .`` so the build sees the installed torch.
"""
import os
import platform
import sys

from setuptools import find_packages, setup

CSRC = "csrc"


def _flag(name):
    """``None`` when unset, else whether the variable is truthy (1/true/yes/on)."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


def _warn(message):
    print(f"fused_margin setup: {message}", file=sys.stderr)


def _cuda_status(torch, cuda_home):
    """``None`` when the CUDA kernels can be built, else the reason they cannot."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME to the toolkit with nvcc)"
    if not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return f"nvcc not found under CUDA_HOME={cuda_home}"
    return None


def _extensions():
    """``(ext_modules, cmdclass)`` for fused_margin._C, or empty ones for a pure-Python install."""
    if _flag("FUSED_MARGIN_NO_EXT"):
        _warn("FUSED_MARGIN_NO_EXT=1: building without the C++/CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as error:
        if _flag("FUSED_MARGIN_CUDA"):
            raise RuntimeError(f"FUSED_MARGIN_CUDA=1 but torch cannot be imported ({error}); install torch "
                               "first and build with pip install --no-build-isolation") from error
        _warn(f"torch cannot be imported ({error}): building without the C++/CUDA extension "
              "(install torch first and use pip install --no-build-isolation to build it)")
        return [], {}

    want_cuda = _flag("FUSED_MARGIN_CUDA")
    cuda_problem = _cuda_status(torch, CUDA_HOME)
    if want_cuda and cuda_problem:
        raise RuntimeError(f"FUSED_MARGIN_CUDA=1 but the CUDA kernels cannot be built: {cuda_problem}")
    with_cuda = want_cuda is not False and cuda_problem is None
    if want_cuda is None and cuda_problem:
        _warn(f"building the CPU kernels only: {cuda_problem}")

    x86_linux = (platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux"))
    # The AVX2/AVX-512 objects share no inline function of fused_margin's own (row_math.h and the
    # kernels live in namespaces named after the instruction set; csrc/row_kernel_cpu.h). Inline code
    # of third-party headers (c10, the standard library) is still emitted in every object: the baseline
    # objects come first so that GNU ld keeps their copies (see csrc/row_kernel_cpu_avx2.cpp);
    # tests/test_cpu_isa.py checks the linked extension for AVX instructions outside those namespaces.
    sources = [os.path.join(CSRC, "fused_margin.cpp"), os.path.join(CSRC, "row_kernel_cpu.cpp"),
               os.path.join(CSRC, "class_block_cpu.cpp")]
    if with_cuda:
        sources.append(os.path.join(CSRC, "fused_margin_cuda.cu"))
    defines = []
    if x86_linux:
        sources += [os.path.join(CSRC, "row_kernel_cpu_avx2.cpp"), os.path.join(CSRC, "row_kernel_cpu_avx512.cpp")]
        defines.append("-DFUSED_MARGIN_HAVE_ISA_KERNELS")
    if with_cuda:
        defines.append("-DFUSED_MARGIN_WITH_CUDA")

    openmp = [] if sys.platform == "darwin" or os.name == "nt" else ["-fopenmp"]
    # One floating-point rule for every backend (fused_margin/fused.py): no contraction of a * b + c into
    # FMAs, so z' = raw * row_scale * col_scale + col_shift and the logits round as torch's eager ops do:
    # -ffp-contract=off here, --fmad=false for nvcc, enable_fp_fusion=False on the Triton launches.
    cxx_flags = ["-O3", "-ffp-contract=off", "-Wno-psabi", "-Wno-unknown-pragmas"] + openmp + defines
    extra_compile_args = {"cxx": cxx_flags}
    if with_cuda:
        extra_compile_args["nvcc"] = ["-O3", "--fmad=false"] + defines
    kind = CUDAExtension if with_cuda else CppExtension
    extension = kind(
        name="fused_margin._C",
        sources=sources,
        include_dirs=[os.path.abspath(CSRC)],
        extra_compile_args=extra_compile_args,
        extra_link_args=openmp,
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fused_margin",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for margin-based softmax cross-entropy losses",
    packages=find_packages(include=["fused_margin", "fused_margin.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
