"""Thin wrapper over the C++/CUDA extension ``fused_margin._C`` (sources in ``fused_margin/backends/csrc/``; how it is
built: :mod:`fused_margin.backends._build`).

Importing the extension registers ``torch.ops.fused_margin.row_forward`` and ``row_backward``, the row
kernels of the fused margin loss (the contract in :mod:`fused_margin.paths.fused`'s docstring, stated eagerly
in tests/helpers/row_torch.py), with CPU kernels always and CUDA kernels when built with CUDA. This
module adds their fake (meta) kernels, so ``torch.compile`` traces through them, and
:func:`row_kernel`, which :mod:`fused_margin.backends` asks for a device's :class:`RowKernel`.

Where the install built no extension (pip's default isolated build has no torch), the first import of this
module builds it with ``torch.utils.cpp_extension.load`` (ninja; the sources and flags of setup.py; cached
under torch's extensions folder, so once per Python, torch and fused_margin version), saying so in one line.
Where it cannot (no C++ compiler, no ninja) or ``FUSED_MARGIN_NO_EXT=1`` is set, everything still imports,
:func:`row_kernel` returns ``None`` and :data:`BUILD_ERROR` says why: the losses run on the reference or on
Triton, and ``backend="cpu"`` names the fix.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from typing import Optional, Tuple

import torch

from fused_margin.backends import _build
from fused_margin.core import options
from fused_margin.core.spec import ROW_BACKWARD_ARGS, ROW_FORWARD_ARGS, ROW_FORWARD_BACKWARD_ARGS
from fused_margin.paths.fused import RowKernel, empty_backward_outputs, empty_forward_outputs, empty_projection_sums


def _missing_tool() -> Optional[str]:
    """Why the build on first use cannot run here, or None."""
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        return (
            f"no C++ compiler ({compiler!r} is not on the PATH): install one (Debian/Ubuntu: apt-get install "
            "g++; conda: conda install gxx_linux-64), or set FUSED_MARGIN_NO_EXT=1 to run without the C++ "
            "kernels"
        )
    if shutil.which("ninja") is None:
        try:  # the ninja wheel's binary, in a virtual environment that is not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            return (
                "ninja is not installed (pip install ninja), or set FUSED_MARGIN_NO_EXT=1 to run without the C++ "
                "kernels"
            )
    return None


def _build_now():
    """Build and load ``fused_margin._C`` with ``torch.utils.cpp_extension.load``: ``(module, None)`` or
    ``(None, why not)``."""
    problem = _missing_tool()
    if problem is not None:
        return None, problem
    from fused_margin import __version__

    try:
        plan = _build.plan()
        from torch.utils.cpp_extension import load

        directory = _build.build_directory(torch, plan.with_cuda, __version__)
        os.makedirs(directory, exist_ok=True)
        first = not os.path.exists(os.path.join(directory, "_C.so"))
        if first:
            for note in plan.notes:
                print(f"fused_margin: {note}", file=sys.stderr, flush=True)
            print(
                f"fused_margin: building the C++ kernels, once ({plan.summary}), in {directory} ...",
                file=sys.stderr,
                flush=True,
            )
        start = time.perf_counter()
        module = load(
            name="_C",
            sources=plan.sources,
            extra_cflags=plan.cxx_flags,
            extra_cuda_cflags=plan.nvcc_flags,
            extra_ldflags=plan.link_flags,
            extra_include_paths=plan.include_dirs,
            build_directory=directory,
            with_cuda=plan.with_cuda,
            verbose=False,
        )
    except Exception as error:  # a compiler error, a failed link: the package still runs, without it
        return None, f"the build of the C++ kernels failed: {type(error).__name__}: {error}"
    if first:
        print(f"fused_margin: C++ kernels built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    sys.modules["fused_margin._C"] = module
    return module, None


def _import_or_build() -> Tuple[Optional[object], Optional[str]]:
    """``(fused_margin._C, None)``, or ``(None, why it is missing)``."""
    if _build.flag("FUSED_MARGIN_NO_EXT"):
        return None, "FUSED_MARGIN_NO_EXT=1"
    try:
        from fused_margin import _C

        return _C, None
    except ImportError as error:
        installed = error
    module, problem = _build_now()
    if module is None:
        problem = f"{problem} (the installed package has no usable extension: {installed})"
        warnings.warn(
            f"fused_margin: no C++ kernels: {problem}; losses on CPU tensors run on the reference implementation",
            RuntimeWarning,
            stacklevel=2,
        )
    return module, problem


_C, BUILD_ERROR = _import_or_build()


def is_built() -> bool:
    """Whether the C++ extension (with at least its CPU kernels) is importable."""
    return _C is not None


def cuda_built() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return _C is not None and bool(_C.WITH_CUDA)


def describe() -> str:
    """One line: which kernels the extension holds, and why the CUDA kernels or the whole extension are
    missing."""
    if _C is None:
        return f"not available: {BUILD_ERROR}"
    kernels = f"CPU kernels ({cpu_kernel_isa()})"
    if cuda_built():
        return f"{kernels} and CUDA kernels"
    problem = _build.cuda_problem(torch, _build.find_cuda_home())
    return f"{kernels}; no CUDA kernels: {problem or 'not built (FUSED_MARGIN_CUDA=0, or the build could not)'}"


def cpu_kernel_isa() -> Optional[str]:
    """The instruction set of the CPU kernels in use (``"AVX512"``, ``"AVX2"``, ``"DEFAULT"``), or None."""
    return None if _C is None else _C.cpu_kernel_isa()


def class_block_isa() -> Optional[str]:
    """The instruction set of the CPU class-block loops of the memory-lean path in use (``AVX512``,
    ``AVX2`` or ``DEFAULT``; chosen as :func:`cpu_kernel_isa`), or None without the extension."""
    return None if _C is None else _C.class_block_isa()


def contract() -> Optional[dict]:
    """The C++ side of the row-op contract, or None without the extension: ``{"margin_type": {name:
    code}, "fold": {name: code}, "reduction": {name: code}}`` from the enums the kernels read
    (csrc/row_kernel.h), to compare with :data:`fused_margin.core.spec.MARGIN_TYPE_CODES`,
    :data:`~fused_margin.core.spec.FOLD_CODES` and :data:`~fused_margin.core.spec.REDUCTION_CODES`. The argument
    names are the op schema's (``torch.ops.fused_margin.row_forward.default._schema``)."""
    return None if _C is None else _C.contract()


def _reduction(a) -> int:
    return options.unpack(a["floats"], a["ints"]).reduction


def _row_forward_fake(*args, **kwargs):
    a = dict(zip(ROW_FORWARD_ARGS, args), **kwargs)
    return empty_forward_outputs(a["raw"], _reduction(a))


def _row_backward_fake(*args, **kwargs):
    a = dict(zip(ROW_BACKWARD_ARGS, args), **kwargs)
    return empty_backward_outputs(a["raw"], a["scale_grad"], a["row_proj"], a["col_proj"], a["col_stats"])


def _row_forward_backward_fake(*args, **kwargs):
    a = dict(zip(ROW_FORWARD_BACKWARD_ARGS, args), **kwargs)
    return empty_forward_outputs(a["raw"], _reduction(a)) + empty_projection_sums(
        a["raw"], a["row_proj"], a["col_proj"]
    )


def _row_norms_fake(x, eps):
    return tuple(x.new_empty((x.shape[0],), dtype=torch.float32) for _ in range(3))


class CppBlockOps:
    """The C++ class-block ops of the extension (``torch.ops.fused_margin.block_partials_`` and
    ``block_grad``; csrc/class_block.h states their contract, csrc/class_block_cpu.cpp the CPU kernels)
    behind the interface of :mod:`fused_margin.backends.triton.class_block`: CPU tensors (class_block_cpu.cpp), or
    CUDA tensors when the extension was built with CUDA (fused_margin_cuda.cu); raw in fp32, bf16, fp16
    (fp32 math) or fp64 (fp64 math)."""

    #: the dtype of the ``has_y`` buffer the ops write (``class_split.empty_partials``)
    FLAG_DTYPE = torch.bool
    #: the ops read the tables, the pair perturbation included, in the compute dtype
    PAIR_IN_COMPUTE_DTYPE = True

    @staticmethod
    def block_partials(
        buffers,
        raw,
        c0,
        target,
        *,
        first,
        scale,
        ignore_index,
        col0=0,
        row_scale=None,
        col_scale=None,
        col_shift=None,
        offset=None,
        pair=None,
        class_weight=None,
        track_wrong=False,
        smoothing=False,
    ):
        b = buffers
        torch.ops.fused_margin.block_partials_(
            raw,
            int(c0),
            target,
            b.z_max,
            b.z_arg,
            b.wrong_max,
            b.wrong_arg,
            b.z_y,
            b.has_y,
            b.l_max,
            b.l_sum,
            b.dev,
            b.weight,
            bool(first),
            float(scale),
            int(ignore_index),
            int(col0),
            row_scale,
            col_scale,
            col_shift,
            offset,
            pair,
            class_weight,
            bool(track_wrong),
            bool(smoothing),
        )

    @staticmethod
    def block_grad(
        raw,
        c0,
        target,
        lse,
        coef,
        smooth,
        target_value,
        out,
        *,
        scale,
        ignore_index,
        col0=0,
        row_scale=None,
        col_scale=None,
        col_shift=None,
        offset=None,
        pair=None,
        class_weight=None,
    ):
        torch.ops.fused_margin.block_grad(
            raw,
            int(c0),
            target,
            lse,
            coef,
            smooth,
            target_value,
            out,
            float(scale),
            int(ignore_index),
            int(col0),
            row_scale,
            col_scale,
            col_shift,
            offset,
            pair,
            class_weight,
        )
        return out


_CPU_KERNEL: Optional[RowKernel] = None
_CUDA_KERNEL: Optional[RowKernel] = None

if _C is not None:
    torch.library.register_fake("fused_margin::row_forward")(_row_forward_fake)
    torch.library.register_fake("fused_margin::row_backward")(_row_backward_fake)
    torch.library.register_fake("fused_margin::row_forward_backward")(_row_forward_backward_fake)
    torch.library.register_fake("fused_margin::row_norms")(_row_norms_fake)
    torch.library.register_fake("fused_margin::project_out_rows_")(lambda grad, v, proj, scale=None: None)
    _ops = torch.ops.fused_margin

    def _project_out_rows(grad, v, proj, scale=None):
        """``grad_i = scale (grad_i - proj_i (grad_i . v_i) v_i)`` in place by the C++/CUDA op (the dot from
        grad in fp32, one rounding; ``scale`` a 0-d tensor on grad's device, or None for 1)."""
        _ops.project_out_rows_(grad, v, proj, scale)
        return grad

    _CPU_KERNEL = RowKernel(
        "cpu",
        _ops.row_forward,
        _ops.row_backward,
        _ops.row_norms,
        forward_backward=_ops.row_forward_backward,
        project_out=_project_out_rows,
    )
    if cuda_built():
        _CUDA_KERNEL = RowKernel(
            "cuda", _ops.row_forward, _ops.row_backward, _ops.row_norms, project_out=_project_out_rows
        )


def row_kernel(device_type: str) -> Optional[RowKernel]:
    """The extension's :class:`RowKernel` for ``device_type`` (``"cpu"`` or ``"cuda"``), or ``None``
    when the extension or that device's kernels were not built."""
    if device_type == "cpu":
        return _CPU_KERNEL
    if device_type == "cuda":
        return _CUDA_KERNEL
    return None
