"""Triton row kernels of the fused margin loss (``backend="triton"``).

The row-kernel contract of :mod:`fused_margin.paths.fused` (stated in eager torch by
tests/helpers/row_torch.py), one op a file: :func:`row_forward` (one pass per row: argmax, online
logsumexp, target margin, loss row; then one program for the reduction and the label check),
:func:`row_backward` (``dL/dz'`` from the saved row statistics, with the row and column sums finished by
a second small kernel), :func:`row_norms` (the cosine head's norms) and the projection
:func:`~fused_margin.backends.triton.norms.project_out_rows_` (its coefficient from the GEMM output). All are
``torch.library`` custom ops (``fused_margin::triton_row_forward``, ``triton_row_backward``,
``triton_row_norms``, ``triton_project_out_rows_``) with fake kernels, so ``torch.compile`` traces
through them.
They run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``. Importing this package with an
untested Triton raises :class:`fused_margin.versions.UntestedTritonError` (:mod:`fused_margin.versions`).
"""

import os

from fused_margin.versions import check_triton

check_triton()  # an untested Triton: UntestedTritonError, before any kernel is defined

from fused_margin.backends.triton._common import max_block  # noqa: E402
from fused_margin.backends.triton.norms import project_out, row_norms  # noqa: E402
from fused_margin.backends.triton.row_backward import row_backward  # noqa: E402
from fused_margin.backends.triton.row_forward import row_forward, row_forward_backward  # noqa: E402
from fused_margin.paths.fused import RowKernel  # noqa: E402

ROW_KERNEL = RowKernel(
    "triton", row_forward, row_backward, row_norms, forward_backward=row_forward_backward, project_out=project_out
)

#: Triton picks compiled or interpreted kernels when they are decorated, i.e. at this import.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["ROW_KERNEL", "INTERPRETED", "row_forward", "row_backward", "row_norms", "max_block"]
