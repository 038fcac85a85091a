"""The row-kernel contract of :mod:`fused_margin.paths.fused` in eager PyTorch, with hand-derived gradients.

This is the executable statement of what the Triton, C++ and CUDA row kernels compute (same inputs,
same outputs, same fp32 math), checked against the autograd reference in the tests. It materialises
B x C temporaries, so it is a specification and a test double, not a fast path.
"""

from __future__ import annotations

import torch

from fused_margin.core import options, rowmath
from fused_margin.core.reference import compute_dtype
from fused_margin.core.spec import MarginLossSpec, named_tables
from fused_margin.paths.fused import RowKernel, inverse_norms, scaled_scores


def _spec(floats, ints):
    """The loss options of the row ops' option vectors (their codes decoded)."""
    return MarginLossSpec(head="logits", input_is_cosine=True, **options.decode(floats, ints))


def row_forward(raw, target, tables, floats, ints):
    t, spec = named_tables(tables), _spec(floats, ints)
    class_margins, logit_offset, class_weight = t["class_margins"], t["logit_offset"], t["class_weight"]
    pair_perturbation = t["pair_perturbation"]
    scale, ignore_index, label_smoothing = spec.scale, spec.ignore_index, spec.label_smoothing
    z = scaled_scores(raw, t["row_scale"], t["col_scale"], t["col_shift"])
    rows, num_classes = z.shape
    kept = target != ignore_index
    bad = kept & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target[{i}] = {int(target[i])} is out of range: labels must be in [0, {num_classes}) "
            f"or equal ignore_index ({ignore_index})"
        )
    y = torch.where(kept, target, torch.zeros_like(target))
    onehot = torch.nn.functional.one_hot(y, num_classes).bool() & kept[:, None]

    pred = z.argmax(1)
    c = z.gather(1, y[:, None]).squeeze(1)
    hard = kept.clone() if spec.hard_mode == "all" else (pred != y) & kept
    wrong = None
    if class_margins is not None and spec.lambda_elm != 0.0:
        wrong = z.masked_fill(torch.nn.functional.one_hot(y, num_classes).bool(), float("-inf")).argmax(1)
    margin, dmargin_dc = rowmath.target_margin(class_margins, y, hard, c, spec, wrong)
    target_logit, target_grad = rowmath.target_logit(c, margin, dmargin_dc, spec)
    logits = scale * z
    if logit_offset is not None:
        logits = logits + logit_offset.to(z.dtype)[None, :]
        target_logit = target_logit + logit_offset.to(z.dtype)[y]
    if pair_perturbation is not None:
        logits = logits + pair_perturbation.to(z.dtype).masked_fill(onehot, 0.0)
    logits = torch.where(onehot, target_logit[:, None], logits)
    lse = torch.logsumexp(logits, 1)
    nll = nll_from_others(logits.masked_fill(onehot, float("-inf")), target_logit, lse)
    if class_weight is not None:
        w = class_weight.to(z.dtype)
        w_y = w[y]
        smooth = (w[None, :] * (lse[:, None] - logits)).masked_fill(onehot, 0.0).sum(1)
    else:
        w_y = torch.ones_like(lse)
        smooth = (lse[:, None] - logits).masked_fill(onehot, 0.0).sum(1)
    loss = (1.0 - label_smoothing) * w_y * nll + label_smoothing / num_classes * (smooth + w_y * nll)
    zero = torch.zeros_like(loss)
    loss = torch.where(kept, loss, zero)
    denom = torch.where(kept, w_y, zero).sum()
    if spec.reduction == "mean":
        loss = torch.where(denom != 0, loss.sum() / denom, torch.full_like(denom, float("nan")))
    elif spec.reduction == "sum":
        loss = loss.sum()
    return (loss, lse, pred, hard, torch.where(kept, nll, zero), torch.where(kept, target_grad, zero), denom)


def nll_from_others(others, target_logit, lse):
    """``nll = lse - t`` from the non-target logits ``others`` (the target's column at -inf):
    :func:`fused_margin.core.rowmath.nll_from_others` with their max and shifted sum."""
    m = others.max(1).values
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return rowmath.nll_from_others(target_logit, m, torch.exp(others - shift[:, None]).sum(1), lse - target_logit)


def row_backward(
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
    t, spec = named_tables(tables), _spec(floats, ints)
    row_scale, col_scale, logit_offset, class_weight = (
        t["row_scale"],
        t["col_scale"],
        t["logit_offset"],
        t["class_weight"],
    )
    pair_perturbation = t["pair_perturbation"]
    scale, ignore_index, label_smoothing = spec.scale, spec.ignore_index, spec.label_smoothing
    z = scaled_scores(raw, row_scale, col_scale, t["col_shift"])
    num_classes = z.shape[1]
    kept = target != ignore_index
    y = torch.where(kept, target, torch.zeros_like(target))
    onehot = torch.nn.functional.one_hot(y, num_classes).bool() & kept[:, None]
    logits = scale * z
    if logit_offset is not None:
        logits = logits + logit_offset.to(z.dtype)[None, :]
    if pair_perturbation is not None:
        logits = logits + pair_perturbation.to(z.dtype).masked_fill(onehot, 0.0)
    p = torch.exp(logits - lse[:, None])
    if class_weight is not None:
        w = class_weight.to(z.dtype)
        w_y, w_sum, w_j = w[y], w.sum(), w[None, :]
    else:
        w_y, w_sum, w_j = torch.ones_like(lse), float(num_classes), 1.0
    dl = (1.0 - label_smoothing) * w_y[:, None] * p + label_smoothing / num_classes * (w_sum * p - w_j)
    dl_y = rowmath.target_column_grad(nll, w_y, w_sum, label_smoothing, num_classes)
    g = grad_rows.to(z.dtype).expand(lse.shape)
    if denom is not None:
        g = torch.where(denom != 0, g / denom, torch.full_like(g, float("nan")))
    g = torch.where(kept, g, torch.zeros_like(g))
    dl = torch.where(onehot, dl_y[:, None], dl) * g[:, None]
    dl = torch.where(kept[:, None], dl, torch.zeros_like(dl))
    grad = torch.where(onehot, dl * target_grad[:, None], dl * scale)
    scaled = grad
    if row_scale is not None:
        scaled = scaled * row_scale[:, None]
    if col_scale is not None:
        scaled = scaled * col_scale[None, :]
    raw32 = raw.to(z.dtype)
    grad_raw = scaled * raw32  # dL/draw_ij raw_ij
    row_coef = -(row_proj * grad_raw.sum(1)) if row_proj is not None else z.new_empty(0)
    col_coef = -(col_proj * grad_raw.sum(0)) if col_proj is not None else z.new_empty(0)
    if col_stats:
        scaled_rows = grad * row_scale[:, None] if row_scale is not None else grad
        stats = torch.stack([grad.sum(0), (scaled_rows * raw32).sum(0), dl.sum(0)])
    else:
        stats = z.new_empty(0)
    return (scaled.to(raw.dtype) if scale_grad else grad), row_coef, col_coef, stats


def row_norms(x, eps):
    """``(||x_i||, 1 / max(||x_i||, eps), 1 / ||x_i||^2 where ||x_i|| >= eps else 0)`` in fp32 (fp64 for fp64
    ``x``; the contract's ``norms``)."""
    norm = torch.linalg.vector_norm(x, dim=1, dtype=compute_dtype(x.dtype))
    return (norm,) + inverse_norms(norm, eps)


ROW_KERNEL = RowKernel("torch", row_forward, row_backward, row_norms)
