"""The cosine head's row norms in Triton (the ``norms`` op of the row-kernel contract of
:mod:`fused_margin.fused`): per row of ``x``, ``||x_i||`` (squares and sum in fp32, as
``torch.linalg.vector_norm``), ``1 / max(||x_i||, eps)`` and ``1 / ||x_i||^2`` where ``||x_i|| >= eps``
(else 0), one program per block of rows, in one launch."""
from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, launch_device

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _row_norms_kernel(x_ptr, stride_row, stride_col, norm_ptr, inv_ptr, proj_ptr, rows, cols, eps,
                      ROWS: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = idx < rows
    idx64 = idx.to(tl.int64)
    total = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    start = 0
    while start < cols:  # a while loop: see row_forward.py (the interpreter and range())
        offs = start + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (offs < cols)[None, :]
        v = tl.load(x_ptr + idx64[:, None] * stride_row + offs.to(tl.int64)[None, :] * stride_col, mask=mask,
                    other=0.0).to(tl.float32)
        total += v * v
        start += BLOCK
    norm = tl.sqrt(tl.sum(total, axis=1))
    inv = 1.0 / tl.where(norm < eps, eps, norm)  # NaN stays NaN (NaN < eps is false)
    tl.store(norm_ptr + idx, norm, mask=row_mask)
    tl.store(inv_ptr + idx, inv, mask=row_mask)
    tl.store(proj_ptr + idx, tl.where(norm >= eps, inv * inv, 0.0), mask=row_mask)


def _empty(x: torch.Tensor):
    return tuple(torch.empty(x.shape[0], dtype=torch.float32, device=x.device) for _ in range(3))


@torch.library.custom_op("fused_margin::triton_row_norms", mutates_args=())
def row_norms(x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(||x_i||, 1 / max(||x_i||, eps), projection factor)`` per row, fp32 (see the module docstring)."""
    if x.dim() != 2 or x.dtype not in _FUSED_DTYPES:
        raise ValueError(f"x must be 2-D float16, bfloat16 or float32, got {x.dtype} of shape {tuple(x.shape)}")
    norm, inv, proj = out = _empty(x)
    rows, cols = x.shape
    if rows == 0:
        return out
    block = min(triton.next_power_of_2(max(cols, 1)), 256)
    row_block = 16
    with launch_device(x):
        _row_norms_kernel[(triton.cdiv(rows, row_block),)](
            x, x.stride(0), x.stride(1), norm, inv, proj, rows, cols, float(eps), ROWS=row_block, BLOCK=block,
            num_warps=4, **LAUNCH_OPTIONS)
    return out


@row_norms.register_fake
def _row_norms_fake(x, eps):
    return _empty(x)
