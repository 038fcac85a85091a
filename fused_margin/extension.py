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
from .spec import ROW_BACKWARD_ARGS, ROW_FORWARD_ARGS, ROW_FORWARD_OUTPUTS

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
    code}, "fold": {name: code}}`` from the enums the kernels read (csrc/row_kernel.h), to compare with
    :data:`fused_margin.spec.MARGIN_TYPE_CODES` / :data:`~fused_margin.spec.FOLD_CODES`. The argument
    names are the op schema's (``torch.ops.fused_margin.row_forward.default._schema``)."""
    return None if _C is None else _C.contract()


def _row_forward_fake(*args, **kwargs):
    """The outputs' shapes and dtypes (:data:`~fused_margin.spec.ROW_FORWARD_OUTPUTS`): one value a row,
    fp32 but ``pred`` (int64) and ``hard`` (bool)."""
    a = dict(zip(ROW_FORWARD_ARGS, args), **kwargs)
    raw = a["raw"]
    dtypes = dict(pred=torch.int64, hard=torch.bool)
    return tuple(raw.new_empty((raw.shape[0],), dtype=dtypes.get(name, torch.float32))
                 for name in ROW_FORWARD_OUTPUTS)


def _row_backward_fake(*args, **kwargs):
    """The gradient: ``raw``'s shape, in ``raw``'s dtype with ``scale_grad`` (dL/draw), else fp32."""
    a = dict(zip(ROW_BACKWARD_ARGS, args), **kwargs)
    raw = a["raw"]
    return raw.new_empty(raw.shape, dtype=raw.dtype if a["scale_grad"] else torch.float32)


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
