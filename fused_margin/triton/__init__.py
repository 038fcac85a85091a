"""Triton row kernels of the fused margin loss (``backend="triton"``).

Two kernels, one per file, implementing the row-kernel contract of :mod:`fused_margin.fused` (stated in
eager torch by :mod:`fused_margin.row_torch`): :func:`row_forward` (one pass per row: argmax, online
logsumexp, target margin, loss row) and :func:`row_backward` (``dL/dz'`` from the saved row statistics).
Both are ``torch.library`` custom ops (``fused_margin::triton_row_forward``,
``fused_margin::triton_row_backward``) with fake kernels, so ``torch.compile`` traces through them.
They run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""
import os

from ..fused import RowKernel
from ._common import max_block
from .row_backward import row_backward
from .row_forward import row_forward

ROW_KERNEL = RowKernel("triton", row_forward, row_backward)

#: Triton picks compiled or interpreted kernels when they are decorated, i.e. at this import.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["ROW_KERNEL", "INTERPRETED", "row_forward", "row_backward", "max_block"]
