"""Deferred re-weighting (DRW) as a schedule object.

LDAM-DRW (Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", NeurIPS
2019) and DBM-DRW train with unweighted classes until a milestone epoch, then switch on the
class-balanced weights of Cui et al. (CVPR 2019):

    w_y = (1 - beta) / (1 - beta^n_y),  normalised so that sum_y w_y = C,
    beta = betas[min(epoch // step, len(betas) - 1)]   (default betas (0, 0.9999), step 160).

``beta = 0`` gives all ones, so before the milestone the loss is the plain (margin) loss.
:class:`DRWSchedule` feeds ``class_weight=`` of :func:`fused_margin.margin_cross_entropy`, of any preset,
or the ``class_weight`` buffer of any :class:`fused_margin.MarginLoss` module (:meth:`DRWSchedule.apply`).
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

from fused_margin.core import builders

__all__ = ["DRWSchedule"]


class DRWSchedule:
    """Class weights that switch on at milestone epochs (LDAM-DRW, DBM-DRW).

    Args:
        class_counts: training examples per class (C positive numbers).
        betas: the class-balanced ``beta`` of each stage; stage ``k`` covers epochs
            ``[k * step, (k + 1) * step)`` and the last beta holds past the table.
        step: epochs per stage (LDAM-DRW: 160 of 200 epochs).

    ``weights(epoch)`` is :func:`fused_margin.drw_weights` (float32, cached per stage).

    Example::

        drw = DRWSchedule(counts, step=160)
        criterion = LDAMLoss(counts)
        for epoch in range(200):
            drw.apply(criterion, epoch)            # or class_weight=drw.weights(epoch, device=x.device)
            ...
    """

    def __init__(self, class_counts, betas: Sequence[float] = (0.0, 0.9999), step: int = 160):
        self.class_counts = builders.as_class_counts(class_counts)
        self.betas = builders.check_betas(betas)
        self.step = builders._positive_int("step", step, 1, "> 0")
        self._cache: Dict[int, torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.size)

    def stage(self, epoch: int) -> int:
        """Index into ``betas`` used at ``epoch``: ``min(epoch // step, len(betas) - 1)``. ``epoch`` may be a
        Python, NumPy (``for epoch in np.arange(E)``) or 0-d tensor integer."""
        epoch = builders._positive_int("epoch", epoch, 0)
        return min(epoch // self.step, len(self.betas) - 1)

    def beta(self, epoch: int) -> float:
        """The class-balanced ``beta`` in force at ``epoch``."""
        return self.betas[self.stage(epoch)]

    def is_reweighting(self, epoch: int) -> bool:
        """True once the weights at ``epoch`` differ from all ones (``beta > 0``)."""
        return self.beta(epoch) > 0.0

    def weights(self, epoch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """Class weights (C) at ``epoch``: class-balanced with ``beta(epoch)``, summing to C, computed in
        float64 and cast to ``dtype`` (float32 by default; float64 for a float64 run)."""
        stage = self.stage(epoch)
        if stage not in self._cache:
            self._cache[stage] = builders.drw_weights(
                self.class_counts, stage * self.step, self.betas, self.step, dtype=torch.float64
            )
        return self._cache[stage].to(device=device, dtype=dtype)

    __call__ = weights

    def apply(self, loss_module: torch.nn.Module, epoch: int) -> torch.Tensor:
        """Set ``loss_module.class_weight`` (the buffer of :class:`fused_margin.MarginLoss` and its presets)
        to ``weights(epoch)`` on the module's device, in its table dtype (the float64 values are kept, so a
        later ``.double()`` gives the exact weights); returns the weights."""
        if not isinstance(loss_module, torch.nn.Module) or "class_weight" not in loss_module._buffers:
            raise TypeError(
                "loss_module must be a fused_margin.MarginLoss (a module with a class_weight "
                f"buffer), got {type(loss_module).__name__}"
            )
        exact = self.weights(epoch, dtype=torch.float64)
        if hasattr(loss_module, "set_table"):
            return loss_module.set_table("class_weight", exact)
        device = next((b.device for b in loss_module.buffers() if b is not None), None)
        weights = exact.to(device=device, dtype=torch.float32)
        loss_module.class_weight = weights
        return weights

    def __repr__(self) -> str:
        return f"DRWSchedule(num_classes={self.num_classes}, betas={self.betas}, step={self.step})"
