"""The pure-PyTorch loss of docs/loss.md: the oracle every kernel is judged against, and the fallback.

Written for clarity, not speed: autograd derives every gradient (docs/loss.md section 5), so this file is
the contract in code. The row math runs in float32 (float64 for float64 inputs) whatever the input
dtype; the cosine and linear heads' GEMM runs in the input dtype as an eager user's model would.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fused_margin.core import rowmath
from fused_margin.core.spec import NORM_EPS, LossTables, MarginAux, MarginLossSpec


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def base_scores(
    input: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    spec: MarginLossSpec,
    tables: LossTables,
) -> torch.Tensor:
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


def _no_grad_rows(values: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``values`` with the rows where ``kept`` is False detached (same values, no gradient path)."""
    mask = kept if values.dim() == 1 else kept[:, None]
    return torch.where(mask, values, values.detach())


def precise_nll(logits: torch.Tensor, target_logit: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """``nll_i = lse_i - t_i`` (``t`` the target logit, also at ``logits[i, y_i]``) formed relative to the
    row's largest logit (:func:`fused_margin.core.rowmath.nll_from_others`), so that confident rows keep
    full precision (docs/loss.md section 8), and differentiable by autograd with the same precision. Where
    ``t`` or the other logits' max is not finite it is ``logsumexp(l) - t``, as ``F.cross_entropy``
    (``+inf`` target: NaN; ``-inf`` target: ``+inf``). Rows without a target (``onehot`` all False) get
    ``logsumexp(l) - t`` too; callers mask them."""
    others = logits.masked_fill(onehot, float("-inf"))
    m_other = others.max(dim=1).values
    finite = torch.isfinite(target_logit) & torch.isfinite(m_other) & onehot.any(dim=1)
    # the formula sees only finite rows (inputs replaced elsewhere) so that neither its values nor its
    # gradients (masked to 0 by the final where) turn into NaN; the max is a constant for autograd, as in
    # logsumexp
    safe_others = torch.where(finite[:, None], others, torch.full_like(others, float("-inf")))
    t = torch.where(finite, target_logit, torch.zeros_like(target_logit))
    m = torch.where(finite, m_other, torch.zeros_like(m_other)).detach()
    others_sum = torch.exp(safe_others - m[:, None]).sum(1)
    precise = rowmath.nll_from_others(t, m, others_sum, torch.zeros_like(t))
    return torch.where(finite, precise, torch.logsumexp(logits, dim=1) - target_logit)


def margin_cross_entropy_reference(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    spec: MarginLossSpec,
    tables: LossTables,
):
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

    strongest_wrong = None
    if tables.class_margins is not None and spec.lambda_elm != 0.0:
        strongest_wrong = z.detach().masked_fill(F.one_hot(y, num_classes).bool(), float("-inf")).argmax(1)
    margin, _ = rowmath.target_margin(tables.class_margins, y, hard, z_y, spec, strongest_wrong)

    logits = spec.scale * z
    target_logit, _ = rowmath.target_logit(z_y, margin, torch.zeros_like(margin), spec)  # autograd differentiates
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
