"""Triton kernels of the memory-lean path (:mod:`fused_margin.paths.lean`): one launch per chunk of classes.

``block_partials`` reads a chunk's GEMM output ``raw`` (B x k) once per row and merges that chunk's
partial statistics (:class:`fused_margin.core.class_split.Partials`) into running per-row buffers, in
place: the first index and value of the max of ``z'`` (``torch.argmax`` order: the first NaN wins,
ties to the lower index), the same off the label column (ELM's ``c*``), ``z'_y`` where the label is in
the chunk, and the online logsumexp of the non-target logits with the label-smoothing sums, merged by
the rule of :func:`fused_margin.core.class_split.combine` (``torch.logsumexp``'s shift: the max where finite,
else 0). Chunks are merged in class order, so a later chunk wins an argmax only when strictly better.

``block_grad`` writes ``dL/dz'`` of a chunk (or ``dL/dz``, times MARC's ``omega``) from the finished rows'
statistics, elementwise: ``p_j = exp(l_j - lse)``, ``dl_j = p_j c_i - e_i w_j`` off the target (with
``c_i = g_i ((1 - eps) w_y + eps W / C)``, ``e_i = g_i eps / C``), ``s dl_j`` into ``dL/dz'``, and on the
target column the precomputed ``dL/dt (dt/dz'_y)``.

Both kernels take ``z'_j = raw_j r_i col_scale_j + col_shift_j`` as the row kernels do. They run on
CUDA tensors and, for tests, on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from fused_margin.backends.triton._common import LAUNCH_OPTIONS, block_config, launch_device, or_dummy, round_to


@triton.jit
def _lse_shift(m):
    return tl.where(tl.abs(m) < float("inf"), m, 0.0)


@triton.jit
def _merge_lse(a_max, a_sum, a_dev, a_w, a_nan, b_max, b_sum, b_dev, b_w, b_nan):
    """The logsumexp part of ``class_split.combine`` on NaN-free maxima plus NaN flags."""
    m = tl.maximum(a_max, b_max)
    shift, shift_a, shift_b = _lse_shift(m), _lse_shift(a_max), _lse_shift(b_max)
    s = tl.where(a_sum == 0.0, 0.0, a_sum * tl.exp(shift_a - shift)) + tl.where(
        b_sum == 0.0, 0.0, b_sum * tl.exp(shift_b - shift)
    )
    dev = (
        a_dev
        + tl.where(a_w == 0.0, 0.0, a_w * (shift - shift_a))
        + b_dev
        + tl.where(b_w == 0.0, 0.0, b_w * (shift - shift_b))
    )
    return m, s, dev, a_w + b_w, a_nan | b_nan


@triton.jit
def _block_partials_kernel(
    raw_ptr,
    stride_raw,
    target_ptr,
    row_scale_ptr,
    col_scale_ptr,
    col_shift_ptr,
    offset_ptr,
    pair_ptr,
    stride_pair_row,
    stride_pair_col,
    weight_ptr,
    zmax_ptr,
    zarg_ptr,
    wmax_ptr,
    warg_ptr,
    zy_ptr,
    hasy_ptr,
    lmax_ptr,
    lsum_ptr,
    dev_ptr,
    wsum_ptr,
    c0,
    col0,
    width,
    scale,
    ignore_index,
    FIRST: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    HAS_COL_SHIFT: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    HAS_PAIR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    TRACK_WRONG: tl.constexpr,
    SMOOTHING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(target_ptr + row)
    kept = label != ignore_index
    local_y = tl.where(kept, label, 0) - c0  # ignored rows use label 0, as the reference
    if HAS_ROW_SCALE:
        row_scale = tl.load(row_scale_ptr + row).to(tl.float32)
    else:
        row_scale = 1.0

    best = float("-inf")
    best_col = tl.zeros((), dtype=tl.int64)
    # int64 from the start: a loop-carried value keeps its type, and a GPU launch passes width as int32
    first_nan = tl.zeros((), dtype=tl.int64) + width
    wrong = float("-inf")
    wrong_col = tl.zeros((), dtype=tl.int64)
    wrong_nan = tl.zeros((), dtype=tl.int64) + width
    z_y = 0.0
    run_max = float("-inf")
    run_sum = 0.0
    run_dev = 0.0
    run_w = 0.0
    run_nan = False
    start = tl.zeros((), dtype=tl.int64)
    while start < width:
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = cols < width
        z = tl.load(raw_ptr + row * stride_raw + cols, mask=mask, other=0.0).to(tl.float32) * row_scale
        if HAS_COL_SCALE:
            z = z * tl.load(col_scale_ptr + col0 + cols, mask=mask, other=1.0).to(tl.float32)
        if HAS_COL_SHIFT:
            z = z + tl.load(col_shift_ptr + col0 + cols, mask=mask, other=0.0).to(tl.float32)
        is_nan = (z != z) & mask
        is_label = cols == local_y
        clean = tl.where(mask & (is_nan == 0), z, float("-inf"))
        block_best = tl.max(clean, 0)
        block_col = tl.min(tl.where(mask & (clean == block_best), cols, width), 0)
        best_col = tl.where(block_best > best, block_col, best_col)
        best = tl.maximum(best, block_best)
        first_nan = tl.minimum(first_nan, tl.min(tl.where(is_nan, cols, width), 0))
        if TRACK_WRONG:
            off = tl.where(is_label, float("-inf"), clean)
            block_wrong = tl.max(off, 0)
            block_wcol = tl.min(tl.where(mask & (off == block_wrong), cols, width), 0)
            wrong_col = tl.where(block_wrong > wrong, block_wcol, wrong_col)
            wrong = tl.maximum(wrong, block_wrong)
            wrong_nan = tl.minimum(wrong_nan, tl.min(tl.where(is_nan & (is_label == 0), cols, width), 0))
        z_y += tl.sum(tl.where(is_label & mask, z, 0.0), 0)

        logits = scale * z
        if HAS_OFFSET:
            logits += tl.load(offset_ptr + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_PAIR:
            logits += tl.load(
                pair_ptr + row * stride_pair_row + (c0 + cols) * stride_pair_col, mask=mask, other=0.0
            ).to(tl.float32)
        other = mask & ((is_label & kept) == 0)
        l_nan = (logits != logits) & other
        logits = tl.where(other & (l_nan == 0), logits, float("-inf"))
        block_max = tl.max(logits, 0)
        shift = _lse_shift(block_max)
        block_sum = tl.sum(tl.where(other & (l_nan == 0), tl.exp(logits - shift), 0.0), 0)
        block_dev = 0.0
        block_w = 0.0
        if SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                w = tl.where(mask, 1.0, 0.0)
            w = tl.where(other, w, 0.0)
            block_dev = tl.sum(tl.where(other & (l_nan == 0), w * (shift - logits), 0.0), 0)
            block_w = tl.sum(w, 0)
        run_max, run_sum, run_dev, run_w, run_nan = _merge_lse(
            run_max,
            run_sum,
            run_dev,
            run_w,
            run_nan,
            block_max,
            block_sum,
            block_dev,
            block_w,
            tl.max(l_nan.to(tl.int32), 0) > 0,
        )
        start += BLOCK

    # this chunk's partials (NaN where torch's reductions give NaN)
    has_y = (local_y >= 0) & (local_y < width)
    chunk_arg = tl.where(first_nan < width, first_nan, best_col) + c0
    chunk_max = tl.where(first_nan < width, float("nan"), best)
    if TRACK_WRONG:
        chunk_warg = tl.where(wrong_nan < width, wrong_nan, wrong_col) + c0
        chunk_wmax = tl.where(wrong_nan < width, float("nan"), wrong)
    if FIRST:
        out_max, out_arg = chunk_max, chunk_arg
        if TRACK_WRONG:
            out_wmax, out_warg = chunk_wmax, chunk_warg
        out_zy = tl.where(has_y, z_y, 0.0)
        out_has = has_y
        l_max, l_sum, l_dev, l_w = run_max, run_sum, run_dev, run_w
        l_nan = run_nan
    else:
        # merge with the earlier chunks (lower indices): a later chunk wins only when strictly better
        prev_max = tl.load(zmax_ptr + row)
        prev_arg = tl.load(zarg_ptr + row)
        take = (chunk_max != chunk_max) & (prev_max == prev_max) | (chunk_max > prev_max)
        out_max = tl.where(take, chunk_max, prev_max)
        out_arg = tl.where(take, chunk_arg, prev_arg)
        if TRACK_WRONG:
            prev_wmax = tl.load(wmax_ptr + row)
            prev_warg = tl.load(warg_ptr + row)
            take_w = (chunk_wmax != chunk_wmax) & (prev_wmax == prev_wmax) | (chunk_wmax > prev_wmax)
            out_wmax = tl.where(take_w, chunk_wmax, prev_wmax)
            out_warg = tl.where(take_w, chunk_warg, prev_warg)
        prev_has = tl.load(hasy_ptr + row) != 0
        out_zy = tl.where(has_y, z_y, tl.load(zy_ptr + row))
        out_has = prev_has | has_y
        prev_lmax = tl.load(lmax_ptr + row)
        prev_nan = prev_lmax != prev_lmax
        l_max, l_sum, l_dev, l_w, l_nan = _merge_lse(
            tl.where(prev_nan, float("-inf"), prev_lmax),
            tl.where(prev_nan, 0.0, tl.load(lsum_ptr + row)),
            tl.load(dev_ptr + row),
            tl.load(wsum_ptr + row),
            prev_nan,
            run_max,
            run_sum,
            run_dev,
            run_w,
            run_nan,
        )
    tl.store(zmax_ptr + row, out_max)
    tl.store(zarg_ptr + row, out_arg)
    if TRACK_WRONG:
        tl.store(wmax_ptr + row, out_wmax)
        tl.store(warg_ptr + row, out_warg)
    tl.store(zy_ptr + row, out_zy)
    tl.store(hasy_ptr + row, out_has.to(tl.int8))
    tl.store(lmax_ptr + row, tl.where(l_nan, float("nan"), l_max))
    tl.store(lsum_ptr + row, tl.where(l_nan, float("nan"), l_sum))
    tl.store(dev_ptr + row, l_dev)
    tl.store(wsum_ptr + row, l_w)


#: the dtype of the ``has_y`` buffer this module's kernels store (``class_split.empty_partials``)
FLAG_DTYPE = torch.int8
#: the kernels load the pair perturbation in any float dtype (fused_margin.backends.BlockOps)
PAIR_IN_COMPUTE_DTYPE = False


def block_partials(
    buffers,
    raw: torch.Tensor,
    c0: int,
    target: torch.Tensor,
    *,
    first: bool,
    scale: float,
    ignore_index: int,
    col0: int = 0,
    row_scale: Optional[torch.Tensor] = None,
    col_scale: Optional[torch.Tensor] = None,
    col_shift: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
    pair: Optional[torch.Tensor] = None,
    class_weight: Optional[torch.Tensor] = None,
    track_wrong: bool = False,
    smoothing: bool = False,
) -> None:
    """Merge the partials of classes ``[c0, c0 + raw.shape[1])`` into ``buffers`` (``first``: start
    them). ``col_scale``/``col_shift`` are indexed from ``col0``; ``offset``, ``class_weight`` and ``pair``
    (B x C) are the global tables, indexed from ``c0``; ``raw`` is this chunk's B x k GEMM output (unit
    column stride)."""
    rows, width = raw.shape
    if rows == 0:
        return
    raw = raw if raw.stride(1) == 1 else raw.contiguous()
    block, num_warps = block_config(width, 2048)
    b = buffers
    pair_t = raw if pair is None else pair
    with launch_device(raw):
        _block_partials_kernel[(rows,)](
            raw,
            raw.stride(0),
            target,
            or_dummy(row_scale, raw),
            or_dummy(col_scale, raw),
            or_dummy(col_shift, raw),
            or_dummy(offset, raw),
            pair_t,
            pair_t.stride(0),
            pair_t.stride(1),
            or_dummy(class_weight, raw),
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
            c0,
            col0,
            width,
            float(scale),
            int(ignore_index),
            FIRST=bool(first),
            HAS_ROW_SCALE=row_scale is not None,
            HAS_COL_SCALE=col_scale is not None,
            HAS_COL_SHIFT=col_shift is not None,
            HAS_OFFSET=offset is not None,
            HAS_PAIR=pair is not None,
            HAS_WEIGHT=class_weight is not None,
            TRACK_WRONG=bool(track_wrong),
            SMOOTHING=bool(smoothing),
            BLOCK=block,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )


@triton.jit
def _block_grad_kernel(
    raw_ptr,
    stride_raw,
    target_ptr,
    row_scale_ptr,
    col_scale_ptr,
    col_shift_ptr,
    offset_ptr,
    pair_ptr,
    stride_pair_row,
    stride_pair_col,
    weight_ptr,
    lse_ptr,
    coef_ptr,
    smooth_ptr,
    target_value_ptr,
    out_ptr,
    stride_out,
    c0,
    col0,
    width,
    scale,
    ignore_index,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    HAS_COL_SHIFT: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    HAS_PAIR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = cols < width
    label = tl.load(target_ptr + row)
    kept = label != ignore_index
    local_y = tl.where(kept, label, 0) - c0
    if HAS_ROW_SCALE:
        row_scale = tl.load(row_scale_ptr + row).to(tl.float32)
    else:
        row_scale = 1.0
    z = tl.load(raw_ptr + row * stride_raw + cols, mask=mask, other=0.0).to(tl.float32) * row_scale
    if HAS_COL_SCALE:
        z = z * tl.load(col_scale_ptr + col0 + cols, mask=mask, other=1.0).to(tl.float32)
    if HAS_COL_SHIFT:
        z = z + tl.load(col_shift_ptr + col0 + cols, mask=mask, other=0.0).to(tl.float32)
    logits = scale * z
    if HAS_OFFSET:
        logits += tl.load(offset_ptr + c0 + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_PAIR:
        logits += tl.load(pair_ptr + row * stride_pair_row + (c0 + cols) * stride_pair_col, mask=mask, other=0.0).to(
            tl.float32
        )
    p = tl.exp(logits - tl.load(lse_ptr + row))
    dl = p * tl.load(coef_ptr + row)
    if SMOOTHING:
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            w = 1.0
        dl -= w * tl.load(smooth_ptr + row)
    grad = dl * scale
    grad = tl.where((cols == local_y) & kept, tl.load(target_value_ptr + row), grad)  # dL/dz'
    grad = grad * row_scale  # dL/draw
    if HAS_COL_SCALE:
        grad = grad * tl.load(col_scale_ptr + col0 + cols, mask=mask, other=1.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, round_to(grad, out_ptr.dtype.element_ty), mask=mask)


def block_grad(
    raw: torch.Tensor,
    c0: int,
    target: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    smooth: Optional[torch.Tensor],
    target_value: torch.Tensor,
    out: torch.Tensor,
    *,
    scale: float,
    ignore_index: int,
    col0: int = 0,
    row_scale=None,
    col_scale=None,
    col_shift=None,
    offset=None,
    pair=None,
    class_weight=None,
) -> torch.Tensor:
    """``out[i, j] = dL/draw_ij = G_ij row_scale_i col_scale_j`` of the chunk, in ``out``'s dtype, with
    ``G_ij = dL/dz'_ij = s (exp(l_ij - lse_i) coef_i - w_j smooth_i)`` off the target and
    ``target_value_i`` on it. ``col_scale``/``col_shift`` are indexed from ``col0``, the other column
    tables (global) from ``c0``."""
    rows, width = raw.shape
    if rows == 0 or width == 0:
        return out
    raw = raw if raw.stride(1) == 1 else raw.contiguous()
    block, num_warps = block_config(width, 1024)
    pair_t = raw if pair is None else pair
    with launch_device(raw):
        _block_grad_kernel[(rows, triton.cdiv(width, block))](
            raw,
            raw.stride(0),
            target,
            or_dummy(row_scale, raw),
            or_dummy(col_scale, raw),
            or_dummy(col_shift, raw),
            or_dummy(offset, raw),
            pair_t,
            pair_t.stride(0),
            pair_t.stride(1),
            or_dummy(class_weight, raw),
            lse,
            coef,
            or_dummy(smooth, raw),
            target_value,
            out,
            out.stride(0),
            c0,
            col0,
            width,
            float(scale),
            int(ignore_index),
            HAS_ROW_SCALE=row_scale is not None,
            HAS_COL_SCALE=col_scale is not None,
            HAS_COL_SHIFT=col_shift is not None,
            HAS_OFFSET=offset is not None,
            HAS_PAIR=pair is not None,
            HAS_WEIGHT=class_weight is not None,
            SMOOTHING=smooth is not None,
            BLOCK=block,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
    return out
