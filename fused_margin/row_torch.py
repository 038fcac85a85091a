"""The row-kernel contract of :mod:`fused_margin.fused` in eager PyTorch, with hand-derived gradients.

This is the executable statement of what the Triton, C++ and CUDA row kernels compute (same inputs,
same outputs, same fp32 math), checked against the autograd reference in the tests. It materialises
B x C temporaries, so it is a specification and a test double, not a fast path.
"""
from __future__ import annotations

import math

import torch

from .fused import RowKernel, inverse_norms, scaled_scores
from .reference import compute_dtype
from .spec import ACOS_CLAMP, REDUCTION_CODES


def target_margin(c, margin, dmargin_dc, scale, margin_type, fold, straight_through):
    """``(s psi(c, M), s dpsi/dc)`` with ``dM/dc = dmargin_dc`` (the DBM instance-margin path).

    additive_cosine: ``psi = c - M``, ``dpsi/dc = 1 - dM/dc``.
    additive_angular: ``psi = cos(theta + M)``, ``theta = acos(clamp(c))``,
    ``dpsi/dc = sin(theta + M) / sin(theta) [c inside the clamp] - sin(theta + M) dM/dc``;
    fold "threshold" (``c <= cos(pi - M)``): ``psi = c - M sin M``,
    ``dpsi/dc = 1 - (sin M + M cos M) dM/dc``; fold "easy" (``c <= 0``): ``psi = c``, ``dpsi/dc = 1``.
    straight_through: ``dpsi/dc = 1``.
    """
    if margin_type == 0:
        value = c - margin
        grad = 1.0 - dmargin_dc
    else:
        lo, hi = -1.0 + ACOS_CLAMP, 1.0 - ACOS_CLAMP
        cc = c.clamp(lo, hi)
        inside = ((c >= lo) & (c <= hi)).to(c.dtype)
        theta = torch.acos(cc)
        sin_shift = torch.sin(theta + margin)
        value = torch.cos(theta + margin)
        grad = sin_shift / torch.sin(theta) * inside - sin_shift * dmargin_dc
        if fold == 1:
            folded = c <= torch.cos(math.pi - margin)
            value = torch.where(folded, c - margin * torch.sin(margin), value)
            grad = torch.where(folded, 1.0 - (torch.sin(margin) + margin * torch.cos(margin)) * dmargin_dc, grad)
        elif fold == 2:
            folded = c <= 0
            value = torch.where(folded, c, value)
            grad = torch.where(folded, torch.ones_like(grad), grad)
    if straight_through:
        grad = torch.ones_like(grad)
    return scale * value, scale * grad


def row_forward(raw, target, row_scale, col_scale, col_shift, class_margins, logit_offset,
                pair_perturbation, class_weight, scale, margin_type, lambda_inst, hard_all, lambda_elm,
                fold, straight_through, label_smoothing, ignore_index, reduction):
    z = scaled_scores(raw, row_scale, col_scale, col_shift)
    rows, num_classes = z.shape
    kept = target != ignore_index
    bad = kept & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target[{i}] = {int(target[i])} is out of range: labels must be in [0, {num_classes}) "
                         f"or equal ignore_index ({ignore_index})")
    y = torch.where(kept, target, torch.zeros_like(target))
    onehot = torch.nn.functional.one_hot(y, num_classes).bool() & kept[:, None]

    pred = z.argmax(1)
    c = z.gather(1, y[:, None]).squeeze(1)
    hard = kept.clone() if hard_all else (pred != y) & kept
    if class_margins is not None:
        m = class_margins.to(z.dtype)
        m_y = m[y]
        h = hard.to(z.dtype)
        margin = m_y * (1.0 + lambda_inst * h * (1.0 - c) / 2.0)
        dmargin_dc = -m_y * lambda_inst * h / 2.0
        if lambda_elm != 0.0:
            wrong = z.masked_fill(torch.nn.functional.one_hot(y, num_classes).bool(), float("-inf")).argmax(1)
            margin = margin - lambda_elm * m[wrong]
    else:
        margin = torch.zeros_like(c)
        dmargin_dc = torch.zeros_like(c)
    target_logit, target_grad = target_margin(c, margin, dmargin_dc, scale, margin_type, fold,
                                                       straight_through)
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
    if reduction == REDUCTION_CODES["mean"]:
        loss = torch.where(denom != 0, loss.sum() / denom, torch.full_like(denom, float("nan")))
    elif reduction == REDUCTION_CODES["sum"]:
        loss = loss.sum()
    return (loss, lse, pred, hard, torch.where(kept, nll, zero), torch.where(kept, target_grad, zero), denom)


def nll_from_others(others, target_logit, lse):
    """``nll = lse - t`` from the non-target logits ``others`` (the target's column at -inf), relative to
    their maximum ``M`` with ``S = sum_{j != y} exp(l_j - M)`` (docs/loss.md section 8, confident rows):
    ``log1p(S exp(M - t))`` where ``t >= M``, ``(M - t) + log(S + exp(t - M))`` where ``t < M`` (then
    ``nll >= log 2``); ``lse - t`` where ``t`` or ``M`` is not finite (as ``F.cross_entropy``)."""
    m = others.max(1).values
    finite = torch.isfinite(target_logit) & torch.isfinite(m)
    zero = torch.zeros_like(m)
    gap = torch.where(finite, m - target_logit, zero)
    shift = torch.where(finite, m, zero)
    total = torch.exp(others - shift[:, None]).sum(1)
    top = gap <= 0
    nll_top = torch.log1p(total * torch.exp(torch.where(top, gap, zero)))
    nll_low = gap + torch.log(total + torch.exp(torch.where(top, zero, -gap)))
    return torch.where(finite, torch.where(top, nll_top, nll_low), lse - target_logit)


def target_column_grad(nll, w_y, w_sum, label_smoothing, num_classes):
    """``dL/dt`` per unit upstream gradient: ``(1 - eps) w_y (p_y - 1) + eps / C (W p_y - w_y)`` with
    ``p_y = exp(-nll)`` and ``p_y - 1 = expm1(-nll)`` (precise where the row is confident), the smoothing
    term as ``eps / C ((W - w_y) + W expm1(-nll))``."""
    pm1 = torch.expm1(-nll)
    return (1.0 - label_smoothing) * w_y * pm1 + label_smoothing / num_classes * ((w_sum - w_y) + w_sum * pm1)


def row_backward(raw, target, row_scale, col_scale, col_shift, logit_offset, pair_perturbation,
                 class_weight, lse, nll, target_grad, grad_rows, denom, scale, label_smoothing,
                 ignore_index, scale_grad, row_proj, col_proj, col_stats):
    z = scaled_scores(raw, row_scale, col_scale, col_shift)
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
    dl_y = target_column_grad(nll, w_y, w_sum, label_smoothing, num_classes)
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
    row_coef = (-(row_proj * grad_raw.sum(1)) if row_proj is not None else z.new_empty(0))
    col_coef = (-(col_proj * grad_raw.sum(0)) if col_proj is not None else z.new_empty(0))
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
