"""The backward row kernel in Triton: ``dL/dz'`` (or ``dL/draw``) from the saved row statistics.

Given the forward's ``lse_i``, ``nll_i = lse_i - t_i`` and ``dt_i/dz'_iy``, every entry is independent
(the contract of ``fused_margin.fused``; ``fused_margin.row_torch.row_backward`` in eager torch), so the
grid is rows x column blocks. With ``p_ij = exp(l_ij - lse_i)``, ``l_ij = s z'_ij + a_j + P_ij``, and
``g_i`` the upstream gradient of the loss row, off the target

    dl_ij = g_i ((1 - eps) w_y p_ij + eps / C (W p_ij - w_j)),    W = sum_j w_j,

and on it, with ``p_iy - 1 = expm1(-nll_i)`` (precise on confident rows, where ``exp(t - lse) - 1``
would cancel),

    dl_iy = g_i ((1 - eps) w_y expm1(-nll_i) + eps / C ((W - w_y) + W expm1(-nll_i))),

the softmax cross-entropy derivative with ``F.cross_entropy``'s class weights and label smoothing;
``G_ij = s dl_ij`` off the target, ``G_iy = (dt_i/dz'_iy) dl_iy``, 0 on ignored rows. With ``scale_grad``
the kernel writes ``G_ij row_scale_i col_scale_j`` (``dL/draw``) in ``raw``'s dtype, else ``G`` in fp32.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, load_scaled_scores, block_config, expm1, launch_device, or_dummy, round_to


@triton.jit
def _row_backward_kernel(
        raw_ptr, stride_raw_row, stride_raw_col, target_ptr, row_scale_ptr, col_scale_ptr, col_shift_ptr,
        offset_ptr, pair_ptr, stride_pair_row, stride_pair_col, weight_ptr, weight_sum_ptr,
        lse_ptr, nll_ptr, target_grad_ptr, grad_rows_ptr, grad_ptr,
        num_classes, scale, label_smoothing, ignore_index,
        HAS_ROW_SCALE: tl.constexpr, HAS_COL_SCALE: tl.constexpr, HAS_COL_SHIFT: tl.constexpr,
        HAS_OFFSET: tl.constexpr, HAS_PAIR: tl.constexpr, HAS_WEIGHT: tl.constexpr,
        SMOOTHING: tl.constexpr, SCALE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cols64 = cols.to(tl.int64)
    mask = cols < num_classes
    label = tl.load(target_ptr + row)
    kept = label != ignore_index
    y = tl.where(kept, label, 0)

    if HAS_ROW_SCALE:
        row_scale = tl.load(row_scale_ptr + row).to(tl.float32)
    else:
        row_scale = 1.0
    z = load_scaled_scores(raw_ptr + row * stride_raw_row, cols64 * stride_raw_col, mask, row_scale, col_scale_ptr,
                    col_shift_ptr, cols, HAS_COL_SCALE, HAS_COL_SHIFT)
    logits = scale * z
    if HAS_OFFSET:
        logits += tl.load(offset_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_PAIR:
        logits += tl.load(pair_ptr + row * stride_pair_row + cols64 * stride_pair_col, mask=mask,
                          other=0.0).to(tl.float32)
    is_target = (cols == y) & kept
    prob = tl.exp(logits - tl.load(lse_ptr + row))
    # the target column from the precise nll: p_y - 1 = expm1(-nll)
    p_y_minus_1 = expm1(-tl.load(nll_ptr + row))

    if HAS_WEIGHT:
        weight_y = tl.load(weight_ptr + y).to(tl.float32)
    else:
        weight_y = 1.0
    dlogit = (1.0 - label_smoothing) * weight_y * prob
    dlogit_y = (1.0 - label_smoothing) * weight_y * p_y_minus_1
    if SMOOTHING:
        if HAS_WEIGHT:
            weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            weight_sum = tl.load(weight_sum_ptr)
        else:
            weight = 1.0
            weight_sum = num_classes * 1.0
        dlogit += label_smoothing / num_classes * (weight_sum * prob - weight)
        dlogit_y += label_smoothing / num_classes * ((weight_sum - weight_y) + weight_sum * p_y_minus_1)
    grad_row = tl.load(grad_rows_ptr + row).to(tl.float32)
    grad = tl.where(is_target, dlogit_y * grad_row * tl.load(target_grad_ptr + row), dlogit * grad_row * scale)
    grad = tl.where(kept, grad, 0.0)
    if SCALE_GRAD:
        grad = grad * row_scale
        if HAS_COL_SCALE:
            grad = grad * tl.load(col_scale_ptr + cols, mask=mask, other=1.0).to(tl.float32)
    tl.store(grad_ptr + row * num_classes + cols, round_to(grad, grad_ptr.dtype.element_ty), mask=mask)


def _empty_grad(raw: torch.Tensor, scale_grad: bool) -> torch.Tensor:
    return torch.empty(raw.shape, dtype=raw.dtype if scale_grad else torch.float32, device=raw.device)


@torch.library.custom_op("fused_margin::triton_row_backward", mutates_args=())
def row_backward(raw: torch.Tensor, target: torch.Tensor, row_scale: Optional[torch.Tensor],
                 col_scale: Optional[torch.Tensor], col_shift: Optional[torch.Tensor],
                 logit_offset: Optional[torch.Tensor], pair_perturbation: Optional[torch.Tensor],
                 class_weight: Optional[torch.Tensor], lse: torch.Tensor, nll: torch.Tensor,
                 target_grad: torch.Tensor, grad_rows: torch.Tensor, scale: float, label_smoothing: float,
                 ignore_index: int, scale_grad: bool) -> torch.Tensor:
    """Launch the backward row kernel; returns ``dL/dz'`` (fp32) or, with ``scale_grad``, ``dL/draw`` in
    ``raw``'s dtype (the contract of :mod:`fused_margin.fused`)."""
    if raw.dim() != 2 or raw.shape[1] < 2:
        raise ValueError(f"raw must be B x C with C >= 2, got shape {tuple(raw.shape)}")
    grad = _empty_grad(raw, scale_grad)
    rows, num_classes = raw.shape
    if grad.numel() == 0:
        return grad
    smoothing = label_smoothing != 0.0
    weight_sum = class_weight.sum(dtype=torch.float32) if smoothing and class_weight is not None else raw
    pair = raw if pair_perturbation is None else pair_perturbation  # read through its strides
    block, num_warps = block_config(num_classes, 1024)
    with launch_device(raw):
        _row_backward_kernel[(rows, triton.cdiv(num_classes, block))](
            raw, raw.stride(0), raw.stride(1), target.contiguous(), or_dummy(row_scale, raw),
            or_dummy(col_scale, raw), or_dummy(col_shift, raw), or_dummy(logit_offset, raw),
            pair, pair.stride(0), pair.stride(1), or_dummy(class_weight, raw), weight_sum,
            lse.contiguous(), nll.contiguous(), target_grad.contiguous(), grad_rows.contiguous(), grad,
            num_classes, float(scale), float(label_smoothing), int(ignore_index),
            HAS_ROW_SCALE=row_scale is not None, HAS_COL_SCALE=col_scale is not None,
            HAS_COL_SHIFT=col_shift is not None, HAS_OFFSET=logit_offset is not None,
            HAS_PAIR=pair_perturbation is not None, HAS_WEIGHT=class_weight is not None,
            SMOOTHING=smoothing, SCALE_GRAD=bool(scale_grad), BLOCK=block, num_warps=num_warps,
            **LAUNCH_OPTIONS)
    return grad


@row_backward.register_fake
def _row_backward_fake(raw, target, row_scale, col_scale, col_shift, logit_offset, pair_perturbation,
                       class_weight, lse, nll, target_grad, grad_rows, scale, label_smoothing,
                       ignore_index, scale_grad):
    return _empty_grad(raw, scale_grad)
