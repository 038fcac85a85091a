"""Thin wrapper over the C++/CUDA extension ``fused_margin._C`` (built by ``setup.py`` from ``csrc/``).

Importing the extension registers ``torch.ops.fused_margin.row_forward`` and ``row_backward``, the row
kernels of the fused margin loss (the contract in :mod:`fused_margin.fused`'s docstring, stated eagerly
in :mod:`fused_margin.row_torch`), with CPU kernels always and CUDA kernels when built with CUDA. This
module adds their fake (meta) kernels, so ``torch.compile`` traces through them, and
:func:`row_kernel`, which :mod:`fused_margin.backends` asks for a device's :class:`RowKernel`.

Without the extension (``FUSED_MARGIN_NO_EXT=1``, or torch missing at build time) everything still
imports and :func:`row_kernel` returns ``None``: the losses run on the reference or on Triton.
"""
from __future__ import annotations

from typing import Optional

import torch

from .fused import RowKernel, empty_backward_outputs, empty_forward_outputs, empty_projection_sums
from .spec import ROW_BACKWARD_ARGS, ROW_FORWARD_ARGS, ROW_FORWARD_BACKWARD_ARGS

try:
    from . import _C
except ImportError as error:  # not built: the pure-Python package
    _C = None
    BUILD_ERROR: Optional[str] = str(error)
else:
    BUILD_ERROR = None


def is_built() -> bool:
    """Whether the C++ extension (with at least its CPU kernels) is importable."""
    return _C is not None


def cuda_built() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return _C is not None and bool(_C.WITH_CUDA)


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
    (csrc/row_kernel.h), to compare with :data:`fused_margin.spec.MARGIN_TYPE_CODES`,
    :data:`~fused_margin.spec.FOLD_CODES` and :data:`~fused_margin.spec.REDUCTION_CODES`. The argument
    names are the op schema's (``torch.ops.fused_margin.row_forward.default._schema``)."""
    return None if _C is None else _C.contract()


def _row_forward_fake(*args, **kwargs):
    a = dict(zip(ROW_FORWARD_ARGS, args), **kwargs)
    return empty_forward_outputs(a["raw"], a["reduction"])


def _row_backward_fake(*args, **kwargs):
    a = dict(zip(ROW_BACKWARD_ARGS, args), **kwargs)
    return empty_backward_outputs(a["raw"], a["scale_grad"], a["row_proj"], a["col_proj"], a["col_stats"])


def _row_forward_backward_fake(*args, **kwargs):
    a = dict(zip(ROW_FORWARD_BACKWARD_ARGS, args), **kwargs)
    return (empty_forward_outputs(a["raw"], a["reduction"])
            + empty_projection_sums(a["raw"], a["row_proj"], a["col_proj"]))


def _row_norms_fake(x, eps):
    return tuple(x.new_empty((x.shape[0],), dtype=torch.float32) for _ in range(3))


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

    _CPU_KERNEL = RowKernel("cpu", _ops.row_forward, _ops.row_backward, _ops.row_norms,
                            forward_backward=_ops.row_forward_backward, project_out=_project_out_rows)
    if cuda_built():
        _CUDA_KERNEL = RowKernel("cuda", _ops.row_forward, _ops.row_backward, _ops.row_norms,
                                 project_out=_project_out_rows)


def row_kernel(device_type: str) -> Optional[RowKernel]:
    """The extension's :class:`RowKernel` for ``device_type`` (``"cpu"`` or ``"cuda"``), or ``None``
    when the extension or that device's kernels were not built."""
    if device_type == "cpu":
        return _CPU_KERNEL
    if device_type == "cuda":
        return _CUDA_KERNEL
    return None
