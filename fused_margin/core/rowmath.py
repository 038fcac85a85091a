"""The per-row math of the loss in eager PyTorch, written once (docs/loss.md sections 2-4): the target margin
``M_i``, the margined target logit ``t_i = s psi(z'_iy, M_i)`` with its derivative, ``nll = lse - t`` formed
without cancellation, and ``dL/dt``.

Every eager path takes these from here: the reference (:mod:`fused_margin.core.reference`, which lets
autograd differentiate them), the finish of the class-split statistics (:mod:`fused_margin.core.class_split`,
the memory-lean path and the class shards) and the memory-lean path's eager backward. The Triton kernels
(``backends/triton/_common.py``) and the C++/CUDA kernels (``backends/csrc/row_math.h``) hold the same
formulas in their languages; the tests hold all of them to the reference.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from fused_margin.core.spec import ACOS_CLAMP, MarginLossSpec

Tensor = torch.Tensor


def target_margin(
    class_margins: Optional[Tensor],
    y: Tensor,
    hard: Tensor,
    c: Tensor,
    spec: MarginLossSpec,
    strongest_wrong: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """``(M, dM/dc)`` per row: ``M_i = m_y (1 + lambda_inst h_i (1 - c_i) / 2) - lambda_elm m_{c*}`` (DBM's
    instance margin on hard positives, AAAI'25; ELM's strongest wrong class ``c*``, Kato & Hotta) with
    ``c = z'_iy``; ``M`` is differentiable in ``c`` (the difficulty is not detached, as in DBM's code) and
    ``dM/dc = -m_y lambda_inst h_i / 2`` is given for the paths that form gradients by hand. Zeros without
    a margin table; a 0-d table is one margin for every class; ``strongest_wrong`` (``c*``) is needed where
    ``lambda_elm != 0``."""
    if class_margins is None:
        zero = torch.zeros_like(c)
        return zero, zero
    m = class_margins.to(c.dtype)
    m_y = m[y] if m.dim() else m.expand_as(c)  # a 0-d table: one margin for every class
    h = hard.to(c.dtype)
    margin = m_y * (1.0 + spec.lambda_inst * h * (1.0 - c) / 2.0)
    dmargin_dc = -m_y * spec.lambda_inst * h / 2.0
    if spec.lambda_elm != 0.0:
        margin = margin - spec.lambda_elm * (m[strongest_wrong] if m.dim() else m)
    return margin, dmargin_dc


def target_logit(c: Tensor, margin: Tensor, dmargin_dc: Tensor, spec: MarginLossSpec) -> Tuple[Tensor, Tensor]:
    """``(s psi(c, M), s dpsi/dc)`` (docs/loss.md section 3). The value is differentiable by autograd the way
    the loss defines it (through the clamp, and through ``M``; a constant shift with
    ``margin_grad="straight_through"``); the derivative, with ``dM/dc = dmargin_dc``, is the same number
    formed by hand:

    * additive_cosine (CosFace, LDAM, ELM): ``psi = c - M``, ``dpsi/dc = 1 - dM/dc``;
    * additive_angular (ArcFace, DBM): ``psi = cos(theta + M)``, ``theta = acos(clamp(c))``,
      ``dpsi/dc = sin(theta + M) / sin(theta) [c inside the clamp] - sin(theta + M) dM/dc``; fold
      ``"threshold"`` (``c <= cos(pi - M)``): ``psi = c - M sin M``, ``dpsi/dc = 1 - (sin M + M cos M) dM/dc``;
      fold ``"easy"`` (``c <= 0``): ``psi = c``, ``dpsi/dc = 1``;
    * ``margin_grad="straight_through"`` (insightface's arcface_torch): ``dpsi/dc = 1``.
    """
    if spec.margin_type == "additive_cosine":
        value = c - margin
        grad = 1.0 - dmargin_dc
    else:
        lo, hi = -1.0 + ACOS_CLAMP, 1.0 - ACOS_CLAMP
        inside = ((c >= lo) & (c <= hi)).to(c.dtype)
        theta = torch.acos(torch.clamp(c, lo, hi))
        sin_shift = torch.sin(theta + margin)
        value = torch.cos(theta + margin)
        grad = sin_shift / torch.sin(theta) * inside - sin_shift * dmargin_dc
        if spec.angular_fold == "threshold":
            folded = c <= torch.cos(math.pi - margin)
            value = torch.where(folded, c - margin * torch.sin(margin), value)
            grad = torch.where(folded, 1.0 - (torch.sin(margin) + margin * torch.cos(margin)) * dmargin_dc, grad)
        elif spec.angular_fold == "easy":
            folded = c <= 0
            value = torch.where(folded, c, value)
            grad = torch.where(folded, torch.ones_like(grad), grad)
    if spec.margin_grad == "straight_through":
        if c.requires_grad or margin.requires_grad:  # autograd's path (the reference): a constant shift of c
            value = c + (value - c).detach()
        grad = torch.ones_like(grad)
    return spec.scale * value, spec.scale * grad


def nll_from_others(t: Tensor, others_max: Tensor, others_sum: Tensor, fallback: Tensor) -> Tensor:
    """``nll = lse - t`` with ``lse = log(e^t + sum_{j != y} e^{l_j})`` from the other logits' max ``M`` and
    ``S = sum_{j != y} e^{l_j - M}``, free of cancellation on confident rows (docs/loss.md section 8):
    ``log1p(S e^{M - t})`` where ``t >= M`` and ``(M - t) + log(S + e^{t - M})`` otherwise (then
    ``nll >= log 2``); ``fallback`` (``lse - t`` as ``F.cross_entropy`` forms it) where ``t`` or ``M`` is not
    finite."""
    finite = torch.isfinite(t) & torch.isfinite(others_max)
    zero = torch.zeros_like(t)
    gap = torch.where(finite, others_max - t, zero)
    top = gap <= 0
    nll_top = torch.log1p(others_sum * torch.exp(torch.where(top, gap, zero)))
    nll_low = gap + torch.log(others_sum + torch.exp(torch.where(top, zero, -gap)))
    return torch.where(finite, torch.where(top, nll_top, nll_low), fallback)


def target_column_grad(nll: Tensor, w_y: Tensor, w_sum, label_smoothing: float, num_classes: int) -> Tensor:
    """``dL/dt`` of a loss row per unit upstream gradient: ``(1 - eps) w_y (p_y - 1) + eps / C (W p_y - w_y)``
    with ``p_y = e^{-nll}``, ``W = sum_j w_j``, written ``(1 - eps) w_y expm1(-nll) + eps / C ((W - w_y) +
    W expm1(-nll))`` so that it keeps full precision where the row is confident (``p_y`` near 1)."""
    pm1 = torch.expm1(-nll)
    return (1.0 - label_smoothing) * w_y * pm1 + label_smoothing / num_classes * ((w_sum - w_y) + w_sum * pm1)
