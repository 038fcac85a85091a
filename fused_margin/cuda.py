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

from .fused import RowKernel

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


def _row_forward_fake(raw, target, row_scale, col_scale, col_shift, class_margins, logit_offset,
                      pair_perturbation, class_weight, scale, margin_type, lambda_inst, hard_all, lambda_elm,
                      fold, straight_through, label_smoothing, ignore_index):
    rows = raw.shape[0]
    per_row = raw.new_empty((rows,), dtype=torch.float32)
    return (per_row, raw.new_empty((rows,), dtype=torch.float32), raw.new_empty((rows,), dtype=torch.int64),
            raw.new_empty((rows,), dtype=torch.bool), raw.new_empty((rows,), dtype=torch.float32),
            raw.new_empty((rows,), dtype=torch.float32))


def _row_backward_fake(raw, target, row_scale, col_scale, col_shift, logit_offset, pair_perturbation,
                       class_weight, lse, nll, target_grad, grad_rows, scale, label_smoothing,
                       ignore_index, scale_grad):
    return raw.new_empty(raw.shape, dtype=raw.dtype if scale_grad else torch.float32)


_CPU_KERNEL: Optional[RowKernel] = None
_CUDA_KERNEL: Optional[RowKernel] = None

if _C is not None:
    torch.library.register_fake("fused_margin::row_forward")(_row_forward_fake)
    torch.library.register_fake("fused_margin::row_backward")(_row_backward_fake)
    _ops = torch.ops.fused_margin
    _CPU_KERNEL = RowKernel("cpu", _ops.row_forward, _ops.row_backward)
    if cuda_built():
        _CUDA_KERNEL = RowKernel("cuda", _ops.row_forward, _ops.row_backward)


def row_kernel(device_type: str) -> Optional[RowKernel]:
    """The extension's :class:`RowKernel` for ``device_type`` (``"cpu"`` or ``"cuda"``), or ``None``
    when the extension or that device's kernels were not built."""
    if device_type == "cpu":
        return _CPU_KERNEL
    if device_type == "cuda":
        return _CUDA_KERNEL
    return None
