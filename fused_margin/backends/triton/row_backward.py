"""The backward row kernel in Triton: ``dL/dz'`` (or ``dL/draw``) from the saved row statistics.

Given the forward's ``lse_i``, ``nll_i = lse_i - t_i`` and ``dt_i/dz'_iy``, every entry is independent
(the contract of ``fused_margin.paths.fused``; ``row_backward`` of tests/helpers/row_torch.py in eager torch), so the
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

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from fused_margin.backends.triton._common import (
    LAUNCH_OPTIONS,
    block_config,
    block_logits,
    io_columns,
    launch_device,
    logit_grad,
    or_dummy,
    round_to,
    scalar_mask,
)
from fused_margin.core import options
from fused_margin.core.spec import named_tables
from fused_margin.paths.fused import empty_backward_outputs


@triton.jit
def _row_backward_kernel(
    raw_ptr,
    stride_raw_row,
    stride_raw_col,
    target_ptr,
    row_scale_ptr,
    col_scale_ptr,
    col_shift_ptr,
    offset_ptr,
    pair_ptr,
    stride_pair_row,
    stride_pair_col,
    weight_ptr,
    weight_sum_ptr,
    lse_ptr,
    nll_ptr,
    target_grad_ptr,
    grad_rows_ptr,
    denom_ptr,
    grad_ptr,
    stride_grad_row,
    row_dot_ptr,
    partial_ptr,
    rows,
    num_classes,
    io_cols,
    scale,
    label_smoothing,
    ignore_index,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    HAS_COL_SHIFT: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    HAS_PAIR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    SHARED_GRAD: tl.constexpr,
    HAS_DENOM: tl.constexpr,
    ROW_DOT: tl.constexpr,
    COL_SUMS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Rows ``[ROWS pid0, ROWS (pid0 + 1))`` x one column block: the gradient, and with ``ROW_DOT`` each
    row's ``sum_j G_ij col_scale_j raw_ij`` over the block (``row_dot[i, block]``), with ``COL_SUMS`` the
    block of rows' column sums (``partial[pid0, k, j]``: ``sum G``, ``sum G row_scale raw`` and, on the
    target column, ``dl_iy - G_iy / s``); :func:`_backward_sums_kernel` finishes both."""
    row_block = tl.program_id(0).to(tl.int64)
    col_block = tl.program_id(1)
    cols = col_block * BLOCK + tl.arange(0, BLOCK)
    cols64 = cols.to(tl.int64)
    mask = cols < num_classes
    io_mask = cols < io_cols  # raw and grad: with the padding of a padded class stride (see io_columns)
    if HAS_COL_SCALE:
        col_scale = tl.load(col_scale_ptr + cols, mask=mask, other=1.0).to(tl.float32)
    else:
        col_scale = 1.0
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        weight = 1.0
    if SMOOTHING:
        if HAS_WEIGHT:
            weight_sum = tl.load(weight_sum_ptr)
        else:
            weight_sum = num_classes * 1.0
    else:
        weight_sum = 0.0
    if SHARED_GRAD:
        upstream = tl.load(grad_rows_ptr).to(tl.float32)
    if HAS_DENOM:
        denom = tl.load(denom_ptr)
    sum_g = tl.zeros([BLOCK], dtype=tl.float32)
    sum_graw = tl.zeros([BLOCK], dtype=tl.float32)
    sum_dl = tl.zeros([BLOCK], dtype=tl.float32)
    for r in range(ROWS):
        row = row_block * ROWS + r
        in_rows = scalar_mask(row < rows)
        row_c = tl.where(in_rows, row, 0)
        label = tl.load(target_ptr + row_c)
        kept = in_rows & (label != ignore_index)
        y = tl.where(kept, label, 0)
        if HAS_ROW_SCALE:
            row_scale = tl.load(row_scale_ptr + row_c).to(tl.float32)
        else:
            row_scale = 1.0
        raw = tl.load(raw_ptr + row_c * stride_raw_row + cols64 * stride_raw_col, mask=io_mask, other=0.0).to(
            tl.float32
        )
        raw = tl.where(mask, raw, 0.0)  # the padding's garbage must not reach the sums (0 * NaN)
        logits = block_logits(
            raw,
            row_scale,
            col_scale,
            col_shift_ptr,
            offset_ptr,
            pair_ptr + row_c * stride_pair_row + cols64 * stride_pair_col,
            cols,
            mask,
            scale,
            HAS_COL_SCALE,
            HAS_COL_SHIFT,
            HAS_OFFSET,
            HAS_PAIR,
        )
        is_target = (cols == y) & kept
        if HAS_WEIGHT:
            weight_y = tl.load(weight_ptr + y).to(tl.float32)
        else:
            weight_y = 1.0
        if SHARED_GRAD:
            g = upstream
        else:
            g = tl.load(grad_rows_ptr + row_c).to(tl.float32)
        if HAS_DENOM:
            g = tl.where(denom != 0.0, g / denom, float("nan"))
        grad, dl_y, grad_y = logit_grad(
            logits,
            is_target,
            kept & mask,
            tl.load(lse_ptr + row_c),
            tl.load(nll_ptr + row_c),
            tl.load(target_grad_ptr + row_c),
            weight,
            weight_y,
            weight_sum,
            g,
            scale,
            label_smoothing,
            num_classes,
            SMOOTHING,
        )
        out = grad
        if SCALE_GRAD:
            out = out * row_scale
            if HAS_COL_SCALE:
                out = out * col_scale
        tl.store(
            grad_ptr + row_c * stride_grad_row + cols64,
            round_to(out, grad_ptr.dtype.element_ty),
            mask=io_mask & in_rows,
        )
        if ROW_DOT:
            tl.store(
                row_dot_ptr + row_c * tl.num_programs(1) + col_block,
                tl.sum(grad * col_scale * raw, axis=0),
                mask=in_rows,
            )
        if COL_SUMS:
            sum_g += grad
            sum_graw += grad * row_scale * raw
            sum_dl += tl.where(is_target, dl_y - grad_y / scale, 0.0)
    if COL_SUMS:
        base = partial_ptr + row_block * 3 * num_classes + cols64
        tl.store(base, sum_g, mask=mask)
        tl.store(base + num_classes, sum_graw, mask=mask)
        tl.store(base + 2 * num_classes, sum_dl, mask=mask)


@triton.jit
def _backward_sums_kernel(
    row_dot_ptr,
    partial_ptr,
    row_scale_ptr,
    col_scale_ptr,
    row_proj_ptr,
    col_proj_ptr,
    row_coef_ptr,
    col_coef_ptr,
    stats_ptr,
    rows,
    num_classes,
    col_blocks,
    row_blocks,
    row_programs,
    scale,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    ROW_COEF: tl.constexpr,
    COL_COEF: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The first ``row_programs`` programs: ``row_coef_i = -row_proj_i row_scale_i sum_b row_dot[i, b]``;
    the others: the column sums over the row blocks, in order (``col_coef``, ``stats``)."""
    pid = tl.program_id(0)
    if pid < row_programs:
        if ROW_COEF:
            idx = pid * BLOCK + tl.arange(0, BLOCK)
            mask = idx < rows
            idx64 = idx.to(tl.int64)
            total = tl.zeros([BLOCK], dtype=tl.float32)
            b = 0
            while b < col_blocks:  # a while loop: see row_forward.py (the interpreter and range())
                total += tl.load(row_dot_ptr + idx64 * col_blocks + b, mask=mask, other=0.0)
                b += 1
            if HAS_ROW_SCALE:
                total = total * tl.load(row_scale_ptr + idx, mask=mask, other=1.0)
            tl.store(row_coef_ptr + idx, -(tl.load(row_proj_ptr + idx, mask=mask, other=0.0) * total), mask=mask)
    else:
        idx = (pid - row_programs) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < num_classes
        sum_g = tl.zeros([BLOCK], dtype=tl.float32)
        sum_graw = tl.zeros([BLOCK], dtype=tl.float32)
        sum_dl = tl.zeros([BLOCK], dtype=tl.float32)
        rb = 0
        while rb < row_blocks:
            base = partial_ptr + rb.to(tl.int64) * 3 * num_classes + idx
            sum_g += tl.load(base, mask=mask, other=0.0)
            sum_graw += tl.load(base + num_classes, mask=mask, other=0.0)
            sum_dl += tl.load(base + 2 * num_classes, mask=mask, other=0.0)
            rb += 1
        if COL_COEF:
            if HAS_COL_SCALE:
                cs = tl.load(col_scale_ptr + idx, mask=mask, other=1.0)
            else:
                cs = 1.0
            tl.store(
                col_coef_ptr + idx, -(tl.load(col_proj_ptr + idx, mask=mask, other=0.0) * (cs * sum_graw)), mask=mask
            )
        if STATS:
            tl.store(stats_ptr + idx, sum_g, mask=mask)
            tl.store(stats_ptr + num_classes + idx, sum_graw, mask=mask)
            tl.store(stats_ptr + 2 * num_classes + idx, sum_g / scale + sum_dl, mask=mask)


#: rows a program of the backward when column sums are formed (their partials: 3 x C fp32 a row block)
ROWS_PER_PROGRAM = 16


@torch.library.custom_op("fused_margin::triton_row_backward", mutates_args=())
def row_backward(
    raw: torch.Tensor,
    target: torch.Tensor,
    tables: List[Optional[torch.Tensor]],
    lse: torch.Tensor,
    nll: torch.Tensor,
    target_grad: torch.Tensor,
    grad_rows: torch.Tensor,
    denom: Optional[torch.Tensor],
    floats: List[float],
    ints: List[int],
    scale_grad: bool,
    row_proj: Optional[torch.Tensor],
    col_proj: Optional[torch.Tensor],
    col_stats: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward row kernel (and, for the sums, :func:`_backward_sums_kernel`); returns
    ``(grad, row_coef, col_coef, stats)`` (the contract of :mod:`fused_margin.paths.fused`)."""
    t, o = named_tables(tables), options.unpack(floats, ints)
    row_scale, col_scale, class_weight = t["row_scale"], t["col_scale"], t["class_weight"]
    if raw.dim() != 2 or raw.shape[1] < 2:
        raise ValueError(f"raw must be B x C with C >= 2, got shape {tuple(raw.shape)}")
    grad, row_coef, col_coef, stats = outputs = empty_backward_outputs(raw, scale_grad, row_proj, col_proj, col_stats)
    rows, num_classes = raw.shape
    if rows == 0:
        col_coef.zero_()
        stats.zero_()
        return outputs
    smoothing = o.label_smoothing != 0.0
    weight_sum = class_weight.sum(dtype=torch.float32) if smoothing and class_weight is not None else raw
    pair = raw if t["pair_perturbation"] is None else t["pair_perturbation"]  # read through its strides
    block, num_warps = block_config(num_classes, 1024)
    col_blocks = triton.cdiv(num_classes, block)
    row_dot_on = row_proj is not None
    col_sums = col_proj is not None or col_stats
    rows_per = ROWS_PER_PROGRAM if col_sums else 1
    row_blocks = triton.cdiv(rows, rows_per)
    f32 = dict(dtype=torch.float32, device=raw.device)
    row_dot = torch.empty((rows, col_blocks), **f32) if row_dot_on else raw
    partial = torch.empty((row_blocks, 3, num_classes), **f32) if col_sums else raw
    with launch_device(raw):
        _row_backward_kernel[(row_blocks, col_blocks)](
            raw,
            raw.stride(0),
            raw.stride(1),
            target.contiguous(),
            or_dummy(row_scale, raw),
            or_dummy(col_scale, raw),
            or_dummy(t["col_shift"], raw),
            or_dummy(t["logit_offset"], raw),
            pair,
            pair.stride(0),
            pair.stride(1),
            or_dummy(class_weight, raw),
            weight_sum,
            lse.contiguous(),
            nll.contiguous(),
            target_grad.contiguous(),
            grad_rows.contiguous(),
            or_dummy(denom, raw),
            grad,
            grad.stride(0),
            row_dot,
            partial,
            rows=rows,
            num_classes=num_classes,
            io_cols=io_columns(raw),
            **options.triton_arguments(o, "backward"),
            HAS_ROW_SCALE=row_scale is not None,
            HAS_COL_SCALE=col_scale is not None,
            HAS_COL_SHIFT=t["col_shift"] is not None,
            HAS_OFFSET=t["logit_offset"] is not None,
            HAS_PAIR=t["pair_perturbation"] is not None,
            HAS_WEIGHT=class_weight is not None,
            SMOOTHING=smoothing,
            SCALE_GRAD=bool(scale_grad),
            SHARED_GRAD=grad_rows.dim() == 0,
            HAS_DENOM=denom is not None,
            ROW_DOT=row_dot_on,
            COL_SUMS=col_sums,
            ROWS=rows_per,
            BLOCK=block,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
        if row_dot_on or col_sums:
            sums_block = 1024
            row_programs = triton.cdiv(rows, sums_block) if row_dot_on else 0
            col_programs = triton.cdiv(num_classes, sums_block) if col_sums else 0
            _backward_sums_kernel[(row_programs + col_programs,)](
                row_dot,
                partial,
                or_dummy(row_scale, raw),
                or_dummy(col_scale, raw),
                or_dummy(row_proj, raw),
                or_dummy(col_proj, raw),
                row_coef if row_dot_on else raw,
                col_coef if col_proj is not None else raw,
                stats if col_stats else raw,
                rows,
                num_classes,
                col_blocks,
                row_blocks,
                row_programs,
                o.scale,
                HAS_ROW_SCALE=row_scale is not None,
                HAS_COL_SCALE=col_scale is not None,
                ROW_COEF=row_dot_on,
                COL_COEF=col_proj is not None,
                STATS=bool(col_stats),
                BLOCK=sums_block,
                num_warps=4,
                **LAUNCH_OPTIONS,
            )
    return outputs


@row_backward.register_fake
def _row_backward_fake(
    raw,
    target,
    tables,
    lse,
    nll,
    target_grad,
    grad_rows,
    denom,
    floats,
    ints,
    scale_grad,
    row_proj,
    col_proj,
    col_stats,
):
    return empty_backward_outputs(raw, scale_grad, row_proj, col_proj, col_stats)
