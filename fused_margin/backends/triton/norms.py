"""The cosine head's row norms in Triton (the ``norms`` op of the row-kernel contract of
:mod:`fused_margin.paths.fused`): per row of ``x``, ``||x_i||`` (squares and sum in fp32, as
``torch.linalg.vector_norm``), ``1 / max(||x_i||, eps)`` and ``1 / ||x_i||^2`` where ``||x_i|| >= eps``
(else 0), one program per block of rows, in one launch."""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fused_margin.backends.triton._common import LAUNCH_OPTIONS, launch_device, round_to

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _row_norms_kernel(
    x_ptr, stride_row, stride_col, norm_ptr, inv_ptr, proj_ptr, rows, cols, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr
):
    idx = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = idx < rows
    idx64 = idx.to(tl.int64)
    total = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    start = 0
    while start < cols:  # a while loop: see row_forward.py (the interpreter and range())
        offs = start + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (offs < cols)[None, :]
        v = tl.load(
            x_ptr + idx64[:, None] * stride_row + offs.to(tl.int64)[None, :] * stride_col, mask=mask, other=0.0
        ).to(tl.float32)
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
            x,
            x.stride(0),
            x.stride(1),
            norm,
            inv,
            proj,
            rows,
            cols,
            float(eps),
            ROWS=row_block,
            BLOCK=block,
            num_warps=4,
            **LAUNCH_OPTIONS,
        )
    return out


@row_norms.register_fake
def _row_norms_fake(x, eps):
    return _empty(x)


@triton.jit
def _project_out_kernel(
    grad_ptr,
    grad_stride,
    v_ptr,
    v_stride,
    proj_ptr,
    scale_ptr,
    rows,
    cols,
    HAS_SCALE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = idx < rows
    idx64 = idx.to(tl.int64)
    dot = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    start = 0
    while start < cols:  # the dot of the row's own (rounded) values with v, in fp32
        offs = start + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (offs < cols)[None, :]
        g = tl.load(grad_ptr + idx64[:, None] * grad_stride + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + idx64[:, None] * v_stride + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += g * v
        start += BLOCK
    proj = tl.load(proj_ptr + idx, mask=row_mask, other=0.0)
    coef = tl.where(proj == 0.0, 0.0, -(proj * tl.sum(dot, axis=1)))  # proj 0 (a norm below eps): unchanged
    if HAS_SCALE:
        factor = tl.load(scale_ptr).to(tl.float32)
    start = 0
    while start < cols:
        offs = start + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (offs < cols)[None, :]
        ptrs = grad_ptr + idx64[:, None] * grad_stride + offs[None, :]
        g = tl.load(ptrs, mask=mask, other=0.0)
        v = tl.load(v_ptr + idx64[:, None] * v_stride + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        out = g.to(tl.float32) + coef[:, None] * v
        if HAS_SCALE:
            out = out * factor
        tl.store(ptrs, round_to(out, g.dtype), mask=mask)
        start += BLOCK


@torch.library.custom_op("fused_margin::triton_project_out_rows_", mutates_args=("grad",))
def project_out_rows_(
    grad: torch.Tensor, v: torch.Tensor, proj: torch.Tensor, scale: Optional[torch.Tensor] = None
) -> None:
    """``grad_i = scale (grad_i - proj_i (grad_i . v_i) v_i)`` in place: the cosine head's projection with
    its coefficient formed from the GEMM output itself (the fp32 dot of its rounded values; fp32 update,
    one rounding), so the radial part cancels to the final rounding. Rows with ``proj_i = 0`` are only
    scaled. ``scale`` (0-d, on grad's device; None for 1) is an upstream gradient applied in this pass,
    read by the kernel (no host sync)."""
    if grad.dim() != 2 or v.shape != grad.shape or grad.dtype not in _FUSED_DTYPES or v.dtype != grad.dtype:
        raise ValueError(
            f"grad and v must be 2-D float16, bfloat16 or float32 of one shape and dtype, got "
            f"{grad.dtype} {tuple(grad.shape)} and {v.dtype} {tuple(v.shape)}"
        )
    if grad.stride(1) != 1 or v.stride(1) != 1:
        raise ValueError("grad and v must have unit column stride")
    if proj.shape != (grad.shape[0],):
        raise ValueError(f"proj must have {grad.shape[0]} entries, got shape {tuple(proj.shape)}")
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"scale must hold one value, got shape {tuple(scale.shape)}")
    rows, cols = grad.shape
    if rows == 0 or cols == 0:
        return
    proj32 = proj.to(torch.float32).contiguous()
    block = min(triton.next_power_of_2(cols), 256)
    row_block = 16
    with launch_device(grad):
        _project_out_kernel[(triton.cdiv(rows, row_block),)](
            grad,
            grad.stride(0),
            v,
            v.stride(0),
            proj32,
            proj32 if scale is None else scale.reshape(()),
            rows,
            cols,
            HAS_SCALE=scale is not None,
            ROWS=row_block,
            BLOCK=block,
            num_warps=4,
            **LAUNCH_OPTIONS,
        )


@project_out_rows_.register_fake
def _project_out_rows_fake(grad, v, proj, scale=None):
    return None


def project_out(
    grad: torch.Tensor, v: torch.Tensor, proj: torch.Tensor, scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """:func:`project_out_rows_` returning ``grad`` (``RowKernel.project_out``); ``v`` made contiguous (a
    no-op for the usual contiguous operands; the GEMM outputs ``grad`` are)."""
    project_out_rows_(grad, v.contiguous(), proj, scale)
    return grad
