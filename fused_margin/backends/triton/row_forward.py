"""The forward row kernel in Triton: one program per row, one pass over the row of ``raw``.

For row ``i`` with label ``y`` (docs/loss.md sections 2-4; the contract of ``fused_margin.paths.fused``, stated in
eager torch by ``row_forward`` of tests/helpers/row_torch.py), looping over the classes in blocks:

* ``z'_ij = raw_ij row_scale_i col_scale_j + col_shift_j`` in fp32;
* running max and first-index argmax of ``z'`` (``pred``; the first NaN wins, as ``torch.argmax``),
  and of ``z'`` over ``j != y`` (ELM's strongest wrong class ``c*``);
* an online logsumexp of the non-target logits ``l_ij = s z'_ij + a_j + P_ij``;
* for label smoothing, ``sum_{j != y} w_j (l_ij - r)`` and ``W' = sum_{j != y} w_j``, with ``r = s z'_iy``
  a shift that keeps ``sum_{j != y} w_j (lse - l_ij) = W' (lse - r) - sum_{j != y} w_j (l_ij - r)`` free
  of cancellation.

Then the margin ``M = m_y (1 + lambda_inst h (1 - z'_y) / 2) - lambda_elm m_{c*}`` (DBM, AAAI'25; ELM,
Kato & Hotta), the target logit ``t = s psi(z'_y, M) + a_y`` and ``dt/dz'_y``, ``lse`` (the target merged
into the online sum), ``nll = lse - t`` relative to the non-target maximum ``M`` (``log1p(S e^{M - t})``
where ``t >= M``, ``(M - t) + log(S + e^{t - M})`` otherwise; ``lse - t`` where ``t`` or ``M`` is not
finite) and the loss row ``(1 - eps) w_y nll + eps / C (sum_{j != y} w_j (lse - l_ij) + w_y nll)``
(``F.cross_entropy``'s smoothing). Ignored rows: loss, ``nll`` and gradient 0, ``hard`` False, ``lse`` of
the unmargined logits.
"""

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from fused_margin.backends.triton._common import (
    LAUNCH_OPTIONS,
    block_config,
    block_logits,
    check_labels,
    io_columns,
    launch_device,
    load_scaled_scores,
    log1p,
    logit_grad,
    online_max,
    or_dummy,
    round_to,
    scalar_mask,
    target_margin,
)
from fused_margin.core import options
from fused_margin.core.spec import REDUCTION_CODES, named_tables
from fused_margin.paths.fused import empty_forward_outputs, empty_projection_sums

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _row_forward_kernel(
    raw_ptr,
    stride_raw_row,
    stride_raw_col,
    target_ptr,
    row_scale_ptr,
    col_scale_ptr,
    col_shift_ptr,
    margins_ptr,
    offset_ptr,
    pair_ptr,
    stride_pair_row,
    stride_pair_col,
    weight_ptr,
    weight_sum_ptr,
    denom_ptr,
    loss_ptr,
    lse_ptr,
    pred_ptr,
    hard_ptr,
    nll_ptr,
    target_grad_ptr,
    num_classes,
    io_cols,
    scale,
    lambda_inst,
    lambda_elm,
    label_smoothing,
    ignore_index,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    HAS_COL_SHIFT: tl.constexpr,
    HAS_MARGINS: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    HAS_PAIR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    MARGIN_TYPE: tl.constexpr,
    HARD_ALL: tl.constexpr,
    ELM: tl.constexpr,
    FOLD: tl.constexpr,
    STRAIGHT_THROUGH: tl.constexpr,
    SMOOTHING: tl.constexpr,
    GRAD: tl.constexpr,
    HAS_DENOM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: the forward, and with ``GRAD`` then ``dL/draw`` for the upstream gradient 1 of the reduced
    loss (over ``denom`` with ``HAS_DENOM``: the mean), written over the row of ``raw`` in place."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(target_ptr + row)
    # a kept label out of range (the reduction kernel reports it) is read as an ignored row of class 0
    kept = scalar_mask((label != ignore_index) & (label >= 0) & (label < num_classes))
    y = tl.where(kept, label, 0)
    raw_row = raw_ptr + row * stride_raw_row
    pair_row = pair_ptr + row * stride_pair_row

    if HAS_ROW_SCALE:
        row_scale = tl.load(row_scale_ptr + row).to(tl.float32)
    else:
        row_scale = 1.0
    # the target's base score, read once (the same fp32 expression as in the loop)
    z_y = load_scaled_scores(
        raw_row,
        y * stride_raw_col,
        True,
        True,
        row_scale,
        col_scale_ptr,
        col_shift_ptr,
        y,
        HAS_COL_SCALE,
        HAS_COL_SHIFT,
    )
    smooth_shift = scale * z_y
    smooth_shift = tl.where(tl.abs(smooth_shift) < float("inf"), smooth_shift, 0.0)

    best = float("-inf")  # max z' (NaN-free), its first index, and the first NaN index
    best_col = 0
    first_nan = num_classes
    wrong_best = float("-inf")  # the same over j != y (ELM's c*)
    wrong_col = 0
    wrong_nan = num_classes
    run_max = float("-inf")  # online logsumexp of the non-target logits
    run_sum = 0.0
    smooth_sum = 0.0  # sum_{j != y} w_j (l_j - r) and sum_{j != y} w_j
    weight_sum = 0.0
    # a while loop, not range(0, num_classes, BLOCK): Triton 3.6's interpreter cannot take a runtime
    # bound in range() under NumPy >= 2.4 (it calls int() on a 1-element array); on the GPU the loop
    # has few trips (C / BLOCK) and other rows' programs hide its load latency
    start = 0
    while start < num_classes:
        cols = start + tl.arange(0, BLOCK)
        mask = cols < num_classes
        cols64 = cols.to(tl.int64)
        z = load_scaled_scores(
            raw_row,
            cols64 * stride_raw_col,
            mask,
            cols < io_cols,
            row_scale,
            col_scale_ptr,
            col_shift_ptr,
            cols,
            HAS_COL_SCALE,
            HAS_COL_SHIFT,
        )
        is_nan = z != z
        clean = tl.where(mask & ~is_nan, z, float("-inf"))
        block_best = tl.max(clean, 0)
        block_col = tl.min(tl.where(clean == block_best, cols, num_classes), 0)
        best_col = tl.where(block_best > best, block_col, best_col)
        best = tl.maximum(best, block_best)
        first_nan = tl.minimum(first_nan, tl.min(tl.where(is_nan & mask, cols, num_classes), 0))
        is_label = cols == y
        if ELM:
            wrong = tl.where(is_label, float("-inf"), clean)
            block_wrong = tl.max(wrong, 0)
            block_wrong_col = tl.min(tl.where(wrong == block_wrong, cols, num_classes), 0)
            wrong_col = tl.where(block_wrong > wrong_best, block_wrong_col, wrong_col)
            wrong_best = tl.maximum(wrong_best, block_wrong)
            wrong_nan = tl.minimum(wrong_nan, tl.min(tl.where(is_nan & mask & ~is_label, cols, num_classes), 0))

        logits = scale * z
        if HAS_OFFSET:
            logits += tl.load(offset_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_PAIR:
            logits += tl.load(pair_row + cols64 * stride_pair_col, mask=mask, other=0.0).to(tl.float32)
        other = mask & ~(is_label & kept)
        logits = tl.where(other, logits, float("-inf"))
        run_max_new, shift = online_max(run_max, tl.max(logits, 0))
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(logits - shift), 0)
        run_max = run_max_new
        if SMOOTHING:
            centred = tl.where(other, logits - smooth_shift, 0.0)
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=other, other=0.0).to(tl.float32)
                smooth_sum += tl.sum(w * centred, 0)
                weight_sum += tl.sum(w, 0)
            else:
                smooth_sum += tl.sum(centred, 0)
        start += BLOCK

    pred = tl.where(first_nan < num_classes, first_nan, best_col)
    if HARD_ALL:
        hard = kept
    else:
        hard = kept & (pred != y)

    if HAS_MARGINS:
        margin_y = tl.load(margins_ptr + y).to(tl.float32)
        h = hard.to(tl.float32)
        margin = margin_y * (1.0 + lambda_inst * h * (1.0 - z_y) / 2.0)
        dmargin_dc = -margin_y * lambda_inst * h / 2.0
        if ELM:
            c_star = tl.where(wrong_nan < num_classes, wrong_nan, wrong_col)
            margin = margin - lambda_elm * tl.load(margins_ptr + c_star).to(tl.float32)
    else:
        margin = 0.0
        dmargin_dc = 0.0
    target_logit, target_grad = target_margin(z_y, margin, dmargin_dc, scale, MARGIN_TYPE, FOLD, STRAIGHT_THROUGH)
    if HAS_OFFSET:
        target_logit += tl.load(offset_ptr + y).to(tl.float32)

    # merge the target into the online logsumexp (kept rows only)
    _, shift = online_max(run_max, target_logit)
    merged = shift + tl.log(run_sum * tl.exp(run_max - shift) + tl.exp(target_logit - shift))
    lse = tl.where(kept, merged, run_max + tl.log(run_sum))

    # nll = lse - t relative to M = run_max (the non-target logits' max; run_sum = sum_{j != y} e^{l_j - M}
    # where M is finite): log1p(S e^{M - t}) where t >= M, (M - t) + log(S + e^{t - M}) (>= log 2) where
    # t < M, lse - t where t or M is not finite (docs/loss.md section 8: confident rows)
    finite = (tl.abs(target_logit) < float("inf")) & (tl.abs(run_max) < float("inf"))
    gap = tl.where(finite, run_max - target_logit, 0.0)
    top = gap <= 0.0
    nll_top = log1p(run_sum * tl.exp(tl.where(top, gap, 0.0)))
    nll_low = gap + tl.log(run_sum + tl.exp(tl.where(top, 0.0, -gap)))
    nll = tl.where(finite, tl.where(top, nll_top, nll_low), lse - target_logit)

    if HAS_WEIGHT:
        weight_y = tl.load(weight_ptr + y).to(tl.float32)
    else:
        weight_y = 1.0
    loss = (1.0 - label_smoothing) * weight_y * nll
    if SMOOTHING:
        if HAS_WEIGHT:
            other_weight = weight_sum
        else:
            other_weight = num_classes - 1.0
        # sum_j w_j (lse - l_j) = sum_{j != y} w_j (lse - r - (l_j - r)) + w_y nll
        smooth = other_weight * (lse - smooth_shift) - smooth_sum + weight_y * nll
        loss += label_smoothing / num_classes * smooth

    nll = tl.where(kept, nll, 0.0)
    target_grad = tl.where(kept, target_grad, 0.0)
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    tl.store(lse_ptr + row, lse)
    tl.store(pred_ptr + row, pred.to(tl.int64))
    tl.store(hard_ptr + row, hard)
    tl.store(nll_ptr + row, nll)
    tl.store(target_grad_ptr + row, target_grad)

    if GRAD:
        # the row backward's expression (logit_grad) on the row just read (still in L1/L2), for g = 1 of the
        # sum or 1 / denom of the mean; dL/draw = G row_scale col_scale rounded to raw's dtype, in place
        # (each block is read before it is written, and the row is this program's alone)
        g = 1.0
        if HAS_DENOM:
            denom = tl.load(denom_ptr)
            g = tl.where(denom != 0.0, g / denom, float("nan"))
        if SMOOTHING:
            if HAS_WEIGHT:
                total_weight = tl.load(weight_sum_ptr)
            else:
                total_weight = num_classes * 1.0
        else:
            total_weight = 0.0
        start = 0
        while start < num_classes:
            cols = start + tl.arange(0, BLOCK)
            mask = cols < num_classes
            io_mask = cols < io_cols
            cols64 = cols.to(tl.int64)
            raw = tl.load(raw_row + cols64 * stride_raw_col, mask=io_mask, other=0.0).to(tl.float32)
            raw = tl.where(mask, raw, 0.0)
            if HAS_COL_SCALE:
                col_scale = tl.load(col_scale_ptr + cols, mask=mask, other=1.0).to(tl.float32)
            else:
                col_scale = 1.0
            logits = block_logits(
                raw,
                row_scale,
                col_scale,
                col_shift_ptr,
                offset_ptr,
                pair_row + cols64 * stride_pair_col,
                cols,
                mask,
                scale,
                HAS_COL_SCALE,
                HAS_COL_SHIFT,
                HAS_OFFSET,
                HAS_PAIR,
            )
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                w = 1.0
            grad, _, _ = logit_grad(
                logits,
                (cols == y) & kept,
                kept & mask,
                lse,
                nll,
                target_grad,
                w,
                weight_y,
                total_weight,
                g,
                scale,
                label_smoothing,
                num_classes,
                SMOOTHING,
            )
            grad = grad * row_scale
            if HAS_COL_SCALE:
                grad = grad * col_scale
            tl.store(raw_row + cols64 * stride_raw_col, round_to(grad, raw_ptr.dtype.element_ty), mask=io_mask)
            start += BLOCK


@triton.jit
def _reduce_rows_kernel(
    loss_ptr,
    target_ptr,
    weight_ptr,
    out_ptr,
    denom_ptr,
    first_bad_ptr,
    rows,
    num_classes,
    ignore_index,
    LOSS: tl.constexpr,
    MEAN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: the loss rows' sum (over ``denom`` for the mean; NaN where it is 0; with ``LOSS``),
    ``denom`` (the kept rows' ``w_y``, or their count) and the first row with a label out of range (``rows``
    when none). Without ``LOSS`` (before the forward that forms the gradient of the mean) only the last two,
    from the labels alone."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    weights = tl.zeros([BLOCK], dtype=tl.float32)
    first_bad = rows
    start = 0
    while start < rows:
        idx = start + tl.arange(0, BLOCK)
        mask = idx < rows
        if LOSS:
            total += tl.load(loss_ptr + idx, mask=mask, other=0.0)
        label = tl.load(target_ptr + idx, mask=mask, other=ignore_index)
        bad = (label != ignore_index) & ((label < 0) | (label >= num_classes))
        kept = (label != ignore_index) & ~bad
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + tl.where(kept, label, 0), mask=mask & kept, other=0.0).to(tl.float32)
        else:
            w = tl.where(kept, 1.0, 0.0)
        weights += w
        first_bad = tl.minimum(first_bad, tl.min(tl.where(bad, idx, rows), axis=0))
        start += BLOCK
    denom = tl.sum(weights, axis=0)
    if LOSS:
        loss_sum = tl.sum(total, axis=0)
        if MEAN:
            loss_sum = tl.where(denom != 0.0, loss_sum / denom, float("nan"))
        tl.store(out_ptr, loss_sum)
    tl.store(denom_ptr, denom)
    tl.store(first_bad_ptr, first_bad.to(tl.int64))


def _check(raw: torch.Tensor, target: torch.Tensor):
    if raw.dim() != 2 or raw.shape[1] < 2:
        raise ValueError(f"raw must be B x C with C >= 2, got shape {tuple(raw.shape)}")
    if raw.dtype not in _FUSED_DTYPES:
        raise TypeError(f"raw must be float16, bfloat16 or float32, got {raw.dtype}")
    if target.dtype != torch.int64 or tuple(target.shape) != (raw.shape[0],):
        raise ValueError(f"target must be int64 of shape ({raw.shape[0]},), got {target.dtype} {tuple(target.shape)}")


def _launch(raw, target, tables, floats, ints, grad: bool):
    """The forward row kernel between the reduction kernel's passes (the forward outputs of the contract);
    with ``grad`` the kernel also writes dL/draw over ``raw`` (for the mean, the denominator is formed from
    the labels first, by the reduction kernel without its loss)."""
    _check(raw, target)
    t, o = named_tables(tables), options.unpack(floats, ints)
    reduction, ignore_index = o.reduction, o.ignore_index
    if reduction not in REDUCTION_CODES.values():
        raise ValueError(f"reduction must be one of the codes {REDUCTION_CODES}, got {reduction!r}")
    class_margins, class_weight, pair_perturbation = t["class_margins"], t["class_weight"], t["pair_perturbation"]
    outputs = empty_forward_outputs(raw, reduction)
    rows, num_classes = raw.shape
    _, lse, pred, hard, nll, target_grad, denom = outputs
    loss = torch.empty(rows, dtype=torch.float32, device=raw.device)
    out = loss if reduction == REDUCTION_CODES["none"] else outputs[0]
    reduced = torch.empty((), dtype=torch.float32, device=raw.device) if out is loss else out
    first_bad = torch.empty((), dtype=torch.int64, device=raw.device)
    target = target.contiguous()
    weight = or_dummy(class_weight, raw)
    mean = reduction == REDUCTION_CODES["mean"]
    smoothing = o.label_smoothing != 0.0
    weight_sum = class_weight.sum(dtype=torch.float32) if grad and smoothing and class_weight is not None else raw
    pair = raw if pair_perturbation is None else pair_perturbation  # read through its strides
    block, num_warps = block_config(num_classes, 2048)
    reduce = functools.partial(
        _reduce_rows_kernel[(1,)],
        loss,
        target,
        weight,
        reduced,
        denom,
        first_bad,
        rows,
        num_classes,
        int(ignore_index),
        MEAN=mean,
        HAS_WEIGHT=class_weight is not None,
        BLOCK=1024,
        num_warps=4,
        **LAUNCH_OPTIONS,
    )
    with launch_device(raw):
        if grad and mean:
            reduce(LOSS=False)
        if rows > 0:
            _row_forward_kernel[(rows,)](
                raw,
                raw.stride(0),
                raw.stride(1),
                target,
                or_dummy(t["row_scale"], raw),
                or_dummy(t["col_scale"], raw),
                or_dummy(t["col_shift"], raw),
                or_dummy(class_margins, raw),
                or_dummy(t["logit_offset"], raw),
                pair,
                pair.stride(0),
                pair.stride(1),
                weight,
                weight_sum,
                denom,
                loss,
                lse,
                pred,
                hard,
                nll,
                target_grad,
                num_classes=num_classes,
                io_cols=io_columns(raw),
                **options.triton_arguments(o, "forward"),
                HAS_ROW_SCALE=t["row_scale"] is not None,
                HAS_COL_SCALE=t["col_scale"] is not None,
                HAS_COL_SHIFT=t["col_shift"] is not None,
                HAS_MARGINS=class_margins is not None,
                HAS_OFFSET=t["logit_offset"] is not None,
                HAS_PAIR=pair_perturbation is not None,
                HAS_WEIGHT=class_weight is not None,
                ELM=class_margins is not None and o.lambda_elm != 0.0,
                SMOOTHING=smoothing,
                GRAD=bool(grad),
                HAS_DENOM=bool(grad and mean),
                BLOCK=block,
                num_warps=num_warps,
                **LAUNCH_OPTIONS,
            )
        reduce(LOSS=True)
    check_labels(first_bad, target, rows, num_classes, int(ignore_index))
    return (out,) + outputs[1:]


@torch.library.custom_op("fused_margin::triton_row_forward", mutates_args=())
def row_forward(
    raw: torch.Tensor, target: torch.Tensor, tables: List[Optional[torch.Tensor]], floats: List[float], ints: List[int]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward row kernel and the reduction kernel; returns ``(loss, lse, pred, hard, nll,
    target_grad, denom)`` (the contract of :mod:`fused_margin.paths.fused`: ``tables`` in the order of
    ``ROW_TABLES``, the options as ``floats``/``ints``). A label out of range raises a ``ValueError`` naming its
    row on CPU tensors (the interpreter), a device-side assertion on CUDA."""
    return _launch(raw, target, tables, floats, ints, grad=False)


@row_forward.register_fake
def _row_forward_fake(raw, target, tables, floats, ints):
    _check(raw, target)
    return empty_forward_outputs(raw, options.unpack(floats, ints).reduction)


def _check_forward_backward(raw, floats, ints, row_proj, col_proj):
    reduction = options.unpack(floats, ints).reduction
    if reduction not in (REDUCTION_CODES["mean"], REDUCTION_CODES["sum"]):
        raise ValueError(
            f"reduction must be the code of 'mean' ({REDUCTION_CODES['mean']}) or 'sum' "
            f"({REDUCTION_CODES['sum']}): the gradient is that of the reduced loss; got {reduction!r}"
        )
    if row_proj is not None or col_proj is not None:
        raise ValueError(
            "row_proj and col_proj must be None: the Triton backend forms the projections' "
            "coefficients from the GEMM outputs (project_out_rows_), not from sums of dL/draw"
        )
    if raw.dim() == 2 and raw.stride(1) != 1:
        raise ValueError(
            f"raw must have unit column stride (dL/draw is written over it), got strides {tuple(raw.stride())}"
        )


@torch.library.custom_op("fused_margin::triton_row_forward_backward", mutates_args=("raw",))
def row_forward_backward(
    raw: torch.Tensor,
    target: torch.Tensor,
    tables: List[Optional[torch.Tensor]],
    floats: List[float],
    ints: List[int],
    row_proj: Optional[torch.Tensor],
    col_proj: Optional[torch.Tensor],
) -> Tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """The forward and, in the same program right after each row's forward (the row still in cache), the
    row backward's dL/draw for the upstream gradient 1 of the reduced loss, written over ``raw`` in its
    dtype (``RowKernel.forward_backward`` of :mod:`fused_margin.paths.fused`): one pass less over B x C and no
    second B x C buffer. The gradient is the backward kernel's own expression (``logit_grad``), so it is
    that kernel's output bit for bit where the compiler keeps the same instructions (the interpreter does).
    ``row_coef``/``col_coef`` come back empty: ``row_proj``/``col_proj`` must be None (the projections form
    their coefficients themselves, ``project_out_rows_``)."""
    _check_forward_backward(raw, floats, ints, row_proj, col_proj)
    outputs = _launch(raw, target, tables, floats, ints, grad=True)
    return outputs + empty_projection_sums(raw, None, None)


@row_forward_backward.register_fake
def _row_forward_backward_fake(raw, target, tables, floats, ints, row_proj, col_proj):
    _check(raw, target)
    _check_forward_backward(raw, floats, ints, row_proj, col_proj)
    return empty_forward_outputs(raw, options.unpack(floats, ints).reduction) + empty_projection_sums(raw, None, None)
