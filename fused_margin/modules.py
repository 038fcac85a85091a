"""``nn.Module`` losses (tables cached as buffers, so ``.to(device)`` moves them) and the cosine head."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from . import builders
from .functional import dbm_tables, margin_cross_entropy

__all__ = [
    "MarginLoss",
    "DBMLoss",
    "LDAMLoss",
    "ELMLoss",
    "ArcFaceLoss",
    "CosFaceLoss",
    "BalancedSoftmaxLoss",
    "LogitAdjustedLoss",
    "CosineClassifier",
]

_TABLES = ("class_margins", "logit_offset", "class_weight")


class MarginLoss(nn.Module):
    """The loss of SPEC.md with fixed options and per-class tables held as buffers.

    ``forward(input, target, weight=None)``: ``input`` is B x C scores when ``weight`` is None (cosines
    when ``cosine_input``), else B x D features with ``weight`` the C x D class weights of ``head``.
    Extra keyword arguments of :func:`fused_margin.margin_cross_entropy` (``pair_perturbation``,
    ``omega``, ...) pass through ``forward``.
    """

    def __init__(self, *, class_margins=None, logit_offset=None, class_weight=None, scale=1.0,
                 margin_type="additive_cosine", cosine_input=True, feature_head="cosine", reduction="mean",
                 ignore_index=-100, label_smoothing=0.0, backend="auto", **options):
        super().__init__()
        for name, value in zip(_TABLES, (class_margins, logit_offset, class_weight)):
            self.register_buffer(name, None if value is None else torch.as_tensor(value, dtype=torch.float32),
                                 persistent=False)
        self.cosine_input = cosine_input
        self.feature_head = feature_head
        self.options = dict(scale=scale, margin_type=margin_type, reduction=reduction,
                            ignore_index=ignore_index, label_smoothing=label_smoothing, backend=backend, **options)

    def forward(self, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        tables = {name: getattr(self, name) for name in _TABLES if getattr(self, name) is not None}
        if weight is None:
            head = {"head": "logits", "input_is_cosine": self.cosine_input}
        else:
            head = {"head": self.feature_head}
        return margin_cross_entropy(input, target, weight, **head, **tables, **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        shown = {k: v for k, v in self.options.items() if k not in ("backend",)}
        return ", ".join(f"{k}={v!r}" for k, v in shown.items()) + f", backend={self.options['backend']!r}"


class DBMLoss(MarginLoss):
    """Difficulty-aware balancing margin loss (DBM, AAAI'25) on a cosine classifier.

    Class margins ``m_y = K (n_ref / n_y)^tau`` (``margin_ref="min"``: the paper's ``n_ref = min n``;
    ``"last"``: the published code's last class) and an instance margin on hard positives,
    ``M_i = m_y (1 + lambda_inst h_i (1 - cos_iy) / 2)``, applied ArcFace-style
    ``s cos(theta_y + M_i)``. ``variant``: ``"ce"``, ``"bs"`` (balanced softmax offset), ``"cb"``
    (class-balanced weights), ``"drw"`` (deferred re-weighting; call :meth:`set_epoch`).
    """

    def __init__(self, class_counts, variant="ce", K=0.1, tau=1.0, scale=30.0, lambda_inst=1.0,
                 margin_ref="min", backend="auto", *, hard_mode="hard", drw_betas: Sequence[float] = (0.0, 0.9999),
                 drw_step=160, cb_beta=0.9999, **options):
        self.class_counts = builders.as_class_counts(class_counts)
        self.variant = variant
        self.drw_betas, self.drw_step = tuple(drw_betas), drw_step
        tables = dbm_tables(self.class_counts, variant, K, tau, margin_ref, 0, self.drw_betas, drw_step, cb_beta)
        super().__init__(**tables, scale=scale, margin_type="additive_angular", lambda_inst=lambda_inst,
                         hard_mode=hard_mode, backend=backend, **options)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """DRW: switch the class weights to ``betas[epoch // step]`` (no effect for other variants)."""
        self.epoch = epoch
        if self.variant == "drw":
            weights = builders.drw_weights(self.class_counts, epoch, self.drw_betas, self.drw_step)
            self.class_weight = weights.to(device=self.class_weight.device, dtype=self.class_weight.dtype)


class LDAMLoss(MarginLoss):
    """LDAM (Cao et al., NeurIPS 2019): ``s (cos_y - m_y)``, ``m_y`` proportional to ``n_y^-1/4`` with
    the largest ``max_m``; ``class_weight`` (e.g. from :class:`fused_margin.DRWSchedule`) for LDAM-DRW."""

    def __init__(self, class_counts, max_m=0.5, scale=30.0, class_weight=None, backend="auto", **options):
        super().__init__(class_margins=builders.ldam_margins(class_counts, max_m), class_weight=class_weight,
                         scale=scale, margin_type="additive_cosine", backend=backend, **options)


class ELMLoss(MarginLoss):
    """ELM (Kato & Hotta): LDAM margins with the strongest wrong class's margin ``lambda_elm m_{c*}``
    added back to the target: ``s (cos_y - m_y + lambda_elm m_{c*})``."""

    def __init__(self, class_counts, max_m=0.5, lambda_elm=1.0, scale=30.0, backend="auto", **options):
        super().__init__(class_margins=builders.ldam_margins(class_counts, max_m), scale=scale,
                         margin_type="additive_cosine", lambda_elm=lambda_elm, backend=backend, **options)


class _ConstantMarginLoss(MarginLoss):
    def __init__(self, margin, scale, margin_type, backend, **options):
        builders._finite("margin", margin)
        self.margin = float(margin)
        super().__init__(scale=scale, margin_type=margin_type, backend=backend, **options)

    def forward(self, input, target, weight=None, **kwargs):
        num_classes = input.shape[1] if weight is None else weight.shape[0]
        margins = torch.full((num_classes,), self.margin, device=input.device)
        return super().forward(input, target, weight, class_margins=margins, **kwargs)


class ArcFaceLoss(_ConstantMarginLoss):
    """ArcFace (Deng et al., CVPR 2019): ``s cos(theta_y + m)``. ``angular_fold="threshold"`` gives
    insightface's th/mm guard, ``"easy"`` its easy margin."""

    def __init__(self, margin=0.5, scale=64.0, backend="auto", **options):
        super().__init__(margin, scale, "additive_angular", backend, **options)


class CosFaceLoss(_ConstantMarginLoss):
    """CosFace (Wang et al., CVPR 2018): ``s (cos_y - m)``."""

    def __init__(self, margin=0.35, scale=64.0, backend="auto", **options):
        super().__init__(margin, scale, "additive_cosine", backend, **options)


class BalancedSoftmaxLoss(MarginLoss):
    """Balanced softmax (Ren et al., NeurIPS 2020): cross-entropy of ``logits + log p_j``. ``forward``
    takes logits, or features with ``weight`` (linear head; ``feature_head="cosine"`` and ``scale`` for
    a cosine classifier)."""

    def __init__(self, class_counts, backend="auto", feature_head="linear", **options):
        super().__init__(logit_offset=builders.log_prior(class_counts), cosine_input=False,
                         feature_head=feature_head, backend=backend, **options)


class LogitAdjustedLoss(MarginLoss):
    """Logit-adjusted loss (Menon et al., ICLR 2021): cross-entropy of ``logits + tau log pi_j``."""

    def __init__(self, class_counts, tau=1.0, backend="auto", feature_head="linear", **options):
        builders._finite("tau", tau)
        super().__init__(logit_offset=builders.log_prior(class_counts) * float(tau), cosine_input=False,
                         feature_head=feature_head, backend=backend, **options)


class CosineClassifier(nn.Module):
    """A bias-free classifier that returns cosines ``x_hat . w_hat_j`` (the "NormedLinear" of LDAM/DBM).

    ``weight`` is C x D, the ``nn.Linear`` layout, so it feeds the fused loss directly:
    ``loss_fn(features, target, weight=head.weight)`` never materialises the cosines. The published
    LDAM/DBM code stores a D x C weight: load it with :meth:`load_published_weight` or
    :meth:`from_published`.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        if in_features < 1 or out_features < 2:
            raise ValueError(f"need in_features >= 1 and out_features >= 2, got {in_features}, {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the published NormedLinear: uniform(-1, 1), then each class row renormalised to norm 1
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(self.weight, dim=1).t()

    def load_published_weight(self, weight_in_out: torch.Tensor) -> None:
        """Copy a published (in_features, out_features)-layout weight into this C x D head."""
        expected = (self.in_features, self.out_features)
        if tuple(weight_in_out.shape) != expected:
            raise ValueError(f"published weight must have shape (in_features, out_features) = {expected}, "
                             f"got {tuple(weight_in_out.shape)}")
        with torch.no_grad():
            self.weight.copy_(weight_in_out.t())

    @classmethod
    def from_published(cls, weight_in_out: torch.Tensor) -> "CosineClassifier":
        """A head holding a published (in_features, out_features)-layout weight."""
        head = cls(weight_in_out.shape[0], weight_in_out.shape[1], device=weight_in_out.device,
                   dtype=weight_in_out.dtype)
        head.load_published_weight(weight_in_out)
        return head

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
