"""Builds fused_margin's C++/CUDA extension ``fused_margin._C`` at install time, where torch can be imported
(``pip install --no-build-isolation .``). Name, version, dependencies and packages: pyproject.toml.

What is built, and how, is fused_margin/backends/_build.py, shared with the build on first use
(fused_margin/backends/extension.py): where torch cannot be imported here (pip's default isolated build), the wheel
is pure Python and the extension is built the first time a loss needs it. ``FUSED_MARGIN_NO_EXT=1``: no
extension at all; ``FUSED_MARGIN_CUDA=0/1``: without / requiring the CUDA kernels.
"""

import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    """fused_margin/backends/_build.py by path: importing the package would import torch and every module."""
    spec = importlib.util.spec_from_file_location(
        "_fused_margin_build", os.path.join(ROOT, "fused_margin", "backends", "_build.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for its dataclass
    spec.loader.exec_module(module)
    return module


def _say(message):
    print(f"fused_margin setup: {message}", file=sys.stderr, flush=True)


def _extensions():
    """``(ext_modules, cmdclass)`` for fused_margin._C, or empty ones for a pure-Python wheel."""
    build = _load_build_module()
    if build.flag("FUSED_MARGIN_NO_EXT"):
        _say("FUSED_MARGIN_NO_EXT=1: no C++/CUDA extension")
        return [], {}
    try:
        import torch  # noqa: F401
    except ImportError as error:
        if build.flag("FUSED_MARGIN_CUDA"):
            raise RuntimeError(
                f"FUSED_MARGIN_CUDA=1 but torch cannot be imported ({error}); install torch first "
                "and build with pip install --no-build-isolation"
            ) from error
        _say(
            f"torch cannot be imported here ({error}): a pure-Python wheel; the C++ kernels are built the first "
            "time a loss needs them (or now: pip install --no-build-isolation)"
        )
        return [], {}
    plan = build.plan(relative_to=ROOT)
    for note in plan.notes:
        _say(note)
    _say(f"building {plan.summary}")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    kind = CUDAExtension if plan.with_cuda else CppExtension
    extra_compile_args = {"cxx": plan.cxx_flags}
    if plan.with_cuda:
        extra_compile_args["nvcc"] = plan.nvcc_flags
    extension = kind(
        name="fused_margin._C",
        sources=plan.sources,
        include_dirs=plan.include_dirs,
        extra_compile_args=extra_compile_args,
        extra_link_args=plan.link_flags,
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
