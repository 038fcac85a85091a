"""The pure-PyTorch loss of SPEC.md: the oracle every kernel is judged against, and the fallback.

Written for clarity, not speed: autograd derives every gradient (SPEC.md section 5), so this file is
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
    """``z'`` of SPEC.md section 1: the head's scores, then MARC's ``omega_j z + beta_j ||W_j||``."""
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


def psi(c: torch.Tensor, margin: torch.Tensor, spec: MarginLossSpec) -> torch.Tensor:
    """The margined target score ``psi(c, M)`` with the fold and gradient options of SPEC.md section 3."""
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


def margin_cross_entropy_reference(input: torch.Tensor, target: torch.Tensor,
                                   weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                                   spec: MarginLossSpec, tables: LossTables):
    """SPEC.md sections 1-4 in eager PyTorch. Returns ``(loss, MarginAux(lse, pred, hard))``.

    Ignored rows have loss 0 and gradient 0; their ``lse`` is that of the unmargined logits
    ``s z' + a + P``, ``pred`` the argmax of ``z'`` and ``hard`` False.
    """
    z = base_scores(input, weight, bias, spec, tables)
    cd = z.dtype
    num_classes = z.shape[1]
    kept = target != spec.ignore_index
    y = torch.where(kept, target, torch.zeros_like(target))
    onehot = F.one_hot(y, num_classes).bool() & kept[:, None]

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
    target_logit = spec.scale * psi(z_y, margin, spec)
    if tables.logit_offset is not None:
        offset = tables.logit_offset.to(cd)
        logits = logits + offset
        target_logit = target_logit + offset[y]
    if tables.pair_perturbation is not None:
        logits = logits + tables.pair_perturbation.to(cd).masked_fill(onehot, 0.0)
    logits = torch.where(onehot, target_logit[:, None], logits)

    lse = torch.logsumexp(logits, dim=1)
    nll = lse - logits.gather(1, y[:, None]).squeeze(1)
    if tables.class_weight is not None:
        w = tables.class_weight.to(cd)
        w_y = w[y]
        smooth = (w * (lse[:, None] - logits)).sum(1)
    else:
        w_y = torch.ones_like(nll)
        smooth = (lse[:, None] - logits).sum(1)
    eps_ls = spec.label_smoothing
    loss = (1.0 - eps_ls) * w_y * nll
    if eps_ls != 0.0:
        loss = loss + (eps_ls / num_classes) * smooth
    loss = torch.where(kept, loss, torch.zeros_like(loss))

    if spec.reduction == "mean":
        loss = loss.sum() / torch.where(kept, w_y, torch.zeros_like(w_y)).sum()
    elif spec.reduction == "sum":
        loss = loss.sum()
    return loss, MarginAux(lse.detach(), pred, hard)
