"""The pure-PyTorch loss of docs/loss.md: the oracle every kernel is judged against, and the fallback.

Written for clarity, not speed: autograd derives every gradient (docs/loss.md section 5), so this file is
the contract in code. The row math runs in float32 (float64 for float64 inputs) whatever the input
dtype; the cosine and linear heads' GEMM runs in the input dtype as an eager user's model would.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .spec import ACOS_CLAMP, NORM_EPS, LossTables, MarginAux, MarginLossSpec


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def base_scores(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                spec: MarginLossSpec, tables: LossTables) -> torch.Tensor:
    """``z'`` of docs/loss.md section 1: the head's scores, then MARC's ``omega_j z + beta_j ||W_j||``."""
    cd = compute_dtype(input.dtype)
    if spec.head == "cosine":
        x_hat = F.normalize(input.to(cd), dim=1, eps=NORM_EPS).to(input.dtype)
        w_hat = F.normalize(weight.to(cd), dim=1, eps=NORM_EPS).to(weight.dtype)
        z = (x_hat @ w_hat.t()).to(cd)
    elif spec.head == "linear":
        z = (input @ weight.t()).to(cd)
        if bias is not None:
            z = z + bias.to(cd)
    else:
        z = input.to(cd)
    if tables.omega is not None:
        z = z * tables.omega.to(cd)
    if tables.beta is not None:
        norms = tables.class_norms.to(cd) if weight is None else weight.to(cd).norm(dim=1)
        z = z + tables.beta.to(cd) * norms
    return z


def target_margin(c: torch.Tensor, margin: torch.Tensor, spec: MarginLossSpec) -> torch.Tensor:
    """The margined target score ``psi(c, M)`` with the fold and gradient options of docs/loss.md section 3
    (autograd gives ``dpsi/dc``). One function under one name: ``row_torch.target_margin`` and the Triton
    kernels' ``target_margin`` compute it too, returning ``(s psi, s dpsi/dc)``."""
    if spec.margin_type == "additive_cosine":
        value = c - margin
    else:
        theta = torch.acos(torch.clamp(c, -1.0 + ACOS_CLAMP, 1.0 - ACOS_CLAMP))
        value = torch.cos(theta + margin)
        if spec.angular_fold == "threshold":
            value = torch.where(c <= torch.cos(torch.pi - margin), c - margin * torch.sin(margin), value)
        elif spec.angular_fold == "easy":
            value = torch.where(c <= 0, c, value)
    if spec.margin_grad == "straight_through":
        value = c + (value - c).detach()
    return value


def _no_grad_rows(values: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``values`` with the rows where ``kept`` is False detached (same values, no gradient path)."""
    mask = kept if values.dim() == 1 else kept[:, None]
    return torch.where(mask, values, values.detach())


def precise_nll(logits: torch.Tensor, target_logit: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """``nll_i = lse_i - t_i`` (``t`` the target logit, also at ``logits[i, y_i]``) formed relative to the
    row's largest logit, so that confident rows keep full precision (docs/loss.md section 8), and
    differentiable by autograd with the same precision.

    With ``M = max_{j != y} l_j``: ``nll = log1p(sum_{j != y} e^{l_j - t})`` where ``t >= M`` (the
    target is the maximum: no ``1 - p_y`` cancellation, in the value or in its gradient
    ``-sum_j p_j``) and ``(M - t) + log(sum_j e^{l_j - M})`` otherwise (then ``p_y <= 1/2`` and
    ``nll >= log 2``). Where ``t`` or ``M`` is not finite it is ``logsumexp(l) - t``, as
    ``F.cross_entropy`` (``+inf`` target: NaN; ``-inf`` target: ``+inf``). Rows without a target
    (``onehot`` all False) get ``logsumexp(l) - t`` too; callers mask them."""
    others = logits.masked_fill(onehot, float("-inf"))
    m_other = others.max(dim=1).values
    finite = torch.isfinite(target_logit) & torch.isfinite(m_other) & onehot.any(dim=1)
    # the branches see only finite rows (inputs replaced by 0 elsewhere) so that neither their values
    # nor their gradients (masked to 0 by the final where) turn into NaN
    safe_logits = torch.where(finite[:, None], logits, torch.zeros_like(logits))
    safe_others = torch.where(finite[:, None], others, torch.full_like(others, float("-inf")))
    t = torch.where(finite, target_logit, torch.zeros_like(target_logit))
    m = torch.where(finite, m_other, torch.zeros_like(m_other))
    top = t >= m
    gap_top = torch.where(top[:, None], safe_others - t[:, None], torch.full_like(others, float("-inf")))
    nll_top = torch.log1p(torch.exp(gap_top).sum(1))
    # t < M: M is the row's maximum; the shift is a constant for autograd, as in logsumexp
    shift = torch.where(top, t, m).detach()
    nll_low = (shift - t) + torch.log(torch.exp(safe_logits - shift[:, None]).sum(1))
    precise = torch.where(top, nll_top, nll_low)
    return torch.where(finite, precise, torch.logsumexp(logits, dim=1) - target_logit)


def margin_cross_entropy_reference(input: torch.Tensor, target: torch.Tensor,
                                   weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                                   spec: MarginLossSpec, tables: LossTables):
    """docs/loss.md sections 1-4 in eager PyTorch. Returns ``(loss, MarginAux(lse, pred, hard))``.

    Ignored rows have loss 0 and gradient 0; their ``lse`` is that of the unmargined logits
    ``s z' + a + P``, ``pred`` the argmax of ``z'`` and ``hard`` False.
    """
    z = base_scores(input, weight, bias, spec, tables)
    cd = z.dtype
    num_classes = z.shape[1]
    kept = target != spec.ignore_index
    y = torch.where(kept, target, torch.zeros_like(target))
    onehot = F.one_hot(y, num_classes).bool() & kept[:, None]
    # ignored rows keep their values (for lse, pred) but no gradient path: their gradient is exactly 0, not
    # 0 times a NaN or inf derivative where their scores are not finite (as the kernels give)
    z = _no_grad_rows(z, kept)

    pred = z.detach().argmax(dim=1)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    hard = (pred != y) & kept if spec.hard_mode == "hard" else kept.clone()

    if tables.class_margins is not None:
        m = tables.class_margins.to(cd)
        margin = m[y] * (1.0 + spec.lambda_inst * hard.to(cd) * (1.0 - z_y) / 2.0)
        if spec.lambda_elm != 0.0:
            strongest_wrong = z.detach().masked_fill(F.one_hot(y, num_classes).bool(), float("-inf")).argmax(1)
            margin = margin - spec.lambda_elm * m[strongest_wrong]
    else:
        margin = torch.zeros_like(z_y)

    logits = spec.scale * z
    target_logit = spec.scale * target_margin(z_y, margin, spec)
    if tables.logit_offset is not None:
        offset = tables.logit_offset.to(cd)
        logits = logits + offset
        target_logit = target_logit + offset[y]
    if tables.pair_perturbation is not None:
        logits = logits + tables.pair_perturbation.to(cd).masked_fill(onehot, 0.0)
    logits = _no_grad_rows(torch.where(onehot, target_logit[:, None], logits), kept)
    target_logit = _no_grad_rows(target_logit, kept)

    lse = torch.logsumexp(logits, dim=1)
    nll = precise_nll(logits, target_logit, onehot)
    if tables.class_weight is not None:
        w = tables.class_weight.to(cd)
        w_y = w[y]
        w_j = w
    else:
        w_y = torch.ones_like(nll)
        w_j = torch.ones_like(logits)
    eps_ls = spec.label_smoothing
    # sum_j w_j (lse - l_j) with the target's term written w_y nll (cancellation-free on confident rows)
    smooth = (w_j * (lse[:, None] - logits)).masked_fill(onehot, 0.0).sum(1) + w_y * nll
    zero = torch.zeros_like(nll)
    nll_part = torch.where(kept, w_y * nll, zero)
    smooth_part = torch.where(kept, smooth, zero)

    if spec.reduction == "mean":
        # F.cross_entropy divides its two parts by sum w_y separately: with every kept w_y = 0 the first is
        # 0 / 0 = NaN, so the loss (and its gradient) is NaN whatever the smoothing part
        denom = torch.where(kept, w_y, zero).sum()
        loss = (1.0 - eps_ls) * (nll_part.sum() / denom)
        if eps_ls != 0.0:
            loss = loss + (eps_ls / num_classes) * (smooth_part.sum() / denom)
    else:
        loss = (1.0 - eps_ls) * nll_part
        if eps_ls != 0.0:
            loss = loss + (eps_ls / num_classes) * smooth_part
        if spec.reduction == "sum":
            loss = loss.sum()
    return loss, MarginAux(lse.detach(), pred, hard)
