"""MARC: margin calibration of a trained classifier (Wang et al., "Margin Calibration for Long-Tailed
Visual Recognition", ACML 2023).

Stage one trains a model as usual (plain cross-entropy on the long-tailed data). Stage two freezes it and
learns two numbers per class that move its decision boundaries:

    z'_j = omega_j z_j + beta_j ||W_j||          (omega initialised to 1, beta to 0)

with ``z`` the frozen model's scores and ``||W_j||`` the L2 norm of row ``j`` of its classifier weight ``W``
(C x D) as stored, never of a normalised row. The second stage minimises the re-weighted cross-entropy of
the paper's Algorithm 2, a plain mean over the batch:

    L = (1 / B) sum_i U_{y_i} CE(s z'_i, y_i),    U_y = C n_y^-gamma / sum_j n_j^-gamma  (gamma = 1.2)

(not the weighted mean ``sum U_y CE / sum U_y`` of ``F.cross_entropy(weight=U)``). ``s`` is the scale of
the frozen model's logits: 1 for a linear classifier, the cosine classifier's scale when ``z`` are its
cosines.

Which norm ``||W_j||`` is, by classifier (this module takes scores, so the caller passes the norms as
``class_norms``: those of the classifier that produced the scores, ``W.detach().norm(dim=1)``):

* ``nn.Linear`` (the setting of the published MARC code): ``z_j = x . W_j + b_j`` and ``||W_j||`` the raw
  row norm, so ``omega_j`` scales the bias too;
* a cosine classifier: ``z_j = x_hat . W_j / ||W_j||`` and ``||W_j||`` still the raw row norm of ``W``, not
  the norm of the normalised row (which is 1). This is the ``z'`` of
  :func:`fused_margin.margin_cross_entropy` with ``head="cosine"``, ``omega=`` and ``beta=``, which takes the
  norms of the ``weight`` it is given.

Passing ones as ``class_norms`` makes ``beta_j`` a per-class bias that does not depend on the rows: a
different calibration, equal to the one above only where every row has norm 1. The gradient of ``beta_j``
carries the factor ``s ||W_j||`` (that of ``omega_j`` the factor ``s z_ij``), so the learning rate that suits
``beta`` depends on the size of the norms.

The loss runs through :func:`fused_margin.margin_cross_entropy` (``omega=``, ``beta=``, ``class_norms=``,
``class_weight=U``, ``reduction="sum"`` divided by the number of kept rows), so the fused kernels are used
where they exist.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, List, Optional

import torch
from torch import nn

from fused_margin.core import builders
from fused_margin.core.reference import compute_dtype
from fused_margin.functional import margin_cross_entropy
from fused_margin.modules import ExactTables

__all__ = ["MARC"]

#: MARC's per-class tables held as buffers (float64 values kept for ``.double()``)
_TABLES = ("class_weight",)


class _PlainProgress:
    """Stands in for tqdm where it is not installed: prints each postfix on its own line when enabled."""

    def __init__(self, iterable, desc: str, enabled: bool):
        self.iterable, self.desc, self.enabled, self.step = iterable, desc, enabled, 0

    def __iter__(self):
        for step, item in enumerate(self.iterable, 1):
            self.step = step
            yield item

    def set_postfix(self, **values):
        if self.enabled:
            print(f"{self.desc} {self.step}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)


def progress_bar(iterable, desc: str, enabled: bool):
    """A tqdm bar over ``iterable`` (cleared when done), or plain lines where tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(iterable, desc, enabled)
    return tqdm(iterable, desc=desc, disable=not enabled, leave=False)


class MARC(ExactTables):
    """Per-class margin calibration (``omega``, ``beta``) over a frozen model's scores.

    Args:
        class_counts: training examples per class (C), used for ``U_y`` (:func:`fused_margin.marc_weights`).
        gamma: the exponent of ``U_y = C n_y^-gamma / sum_j n_j^-gamma`` (paper default 1.2).
        scale: ``s``, the factor of the frozen logits (1 for ``nn.Linear``; e.g. 30 over cosines).
        backend: passed to :func:`fused_margin.margin_cross_entropy`.

    ``forward(logits, class_norms)`` (= :meth:`calibrated_logits`) returns ``s (omega_j z_j + beta_j ||W_j||)``
    with ``class_norms`` the ``||W_j||``: the raw row norms of the classifier weight that produced ``logits``
    (for a cosine classifier too, see the module docstring). :meth:`loss` is the training objective above;
    :meth:`fit` runs the second stage.

    ``U`` is the buffer ``class_weight``, computed in float64 and stored as float32; ``.double()`` (or
    ``.to(torch.float64)``) gives the float64 values themselves, not float32-rounded ones. :meth:`loss` uses
    ``U`` in the compute dtype of ``logits`` (float64 for float64 logits, float32 otherwise). ``state_dict``
    holds ``omega``, ``beta`` and ``class_weight``; loading a ``class_weight`` equal to this module's ``U``
    at the precision it was saved in keeps the float64 values, other values replace them.
    """

    _EXACT_TABLES = _TABLES

    def __init__(self, class_counts, gamma: float = 1.2, scale: float = 1.0, backend: str = "auto"):
        super().__init__()
        counts = builders.as_class_counts(class_counts)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.num_classes = int(counts.size)
        self.gamma, self.scale, self.backend = float(gamma), float(scale), backend
        self.omega = nn.Parameter(torch.ones(self.num_classes))
        self.beta = nn.Parameter(torch.zeros(self.num_classes))
        # U is computed in float64 and kept: the buffer is float32 until the module is moved, and
        # .double() (or .to(torch.float64)) gives these values, not float32-rounded ones
        exact = builders.marc_weights(counts, gamma, dtype=torch.float64)
        self._exact = {"class_weight": exact}
        self.register_buffer("class_weight", exact.to(torch.float32))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        saved = {name: state_dict.get(prefix + name) for name in _TABLES}
        kept = dict(self._exact)  # load_state_dict(assign=True) sets the buffer by attribute, which drops it
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for name, value in saved.items():
            exact, buf = kept.get(name), self._buffers.get(name)
            if exact is None or buf is None or not isinstance(value, torch.Tensor) or value.shape != exact.shape:
                continue
            if torch.equal(value.detach().cpu(), exact.to(value.dtype)):
                # the same table, saved at the precision it was held in: keep the float64 values
                self._exact[name] = exact
                if buf.dtype == torch.float64 and not torch.equal(buf.detach().cpu(), exact):
                    with torch.no_grad():
                        buf.copy_(exact)
            else:
                self._exact.pop(name, None)  # other values were loaded: they replace the ones kept for .double()

    def _check(self, logits: torch.Tensor, class_norms: torch.Tensor) -> None:
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] != self.num_classes:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"logits must be B x C with C = {self.num_classes}, got {shape}")
        if not isinstance(class_norms, torch.Tensor) or tuple(class_norms.shape) != (self.num_classes,):
            shape = tuple(class_norms.shape) if isinstance(class_norms, torch.Tensor) else type(class_norms).__name__
            raise ValueError(f"class_norms must hold the C = {self.num_classes} classifier row norms, got {shape}")

    def calibrated_logits(self, logits: torch.Tensor, class_norms: torch.Tensor) -> torch.Tensor:
        """Inference: ``s (omega_j z_ij + beta_j ||W_j||)``; its argmax is the calibrated prediction."""
        self._check(logits, class_norms)
        z = logits.float() if logits.dtype != torch.float64 else logits
        return self.scale * (self.omega.to(z.dtype) * z + self.beta.to(z.dtype) * class_norms.to(z.dtype))

    forward = calibrated_logits

    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, class_norms: torch.Tensor, ignore_index: int = -100
    ) -> torch.Tensor:
        """``(1 / B) sum_i U_{y_i} CE(s (omega z_i + beta ||W||), y_i)`` over the kept rows (Algorithm 2)."""
        self._check(logits, class_norms)
        class_norms = class_norms.to(device=logits.device, dtype=logits.dtype)
        total = margin_cross_entropy(
            logits.detach(),
            target,
            head="logits",
            scale=self.scale,
            omega=self.omega.to(logits.dtype),
            beta=self.beta.to(logits.dtype),
            class_norms=class_norms.detach(),
            class_weight=self.class_weight.to(compute_dtype(logits.dtype)),
            reduction="sum",
            ignore_index=ignore_index,
            backend=self.backend,
        )
        kept = (target != ignore_index).sum()
        return total / kept

    def fit(
        self,
        loader: Iterable,
        class_norms: torch.Tensor,
        logits_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        epochs: int = 10,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        progress: bool = True,
        desc: str = "MARC",
    ) -> List[float]:
        """The second stage: SGD on ``omega``, ``beta`` with a cosine learning-rate schedule over epochs.

        ``loader`` yields ``(inputs, target)``; ``logits_fn(inputs)`` gives the frozen model's scores (run
        under ``torch.no_grad``, so the backbone stays frozen); without ``logits_fn`` the inputs are the
        scores themselves. Returns the mean training loss of each epoch.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        optimizer = torch.optim.SGD([self.omega, self.beta], lr=lr, momentum=momentum, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        history = []
        bar = progress_bar(range(epochs), desc, progress)
        for _ in bar:
            total, rows = 0.0, 0
            for inputs, target in loader:
                if logits_fn is not None:
                    with torch.no_grad():
                        logits = logits_fn(inputs)
                else:
                    logits = inputs
                target = target.to(logits.device)
                loss = self.loss(logits, target, class_norms.to(logits.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * target.shape[0]
                rows += target.shape[0]
            schedule.step()
            history.append(total / max(rows, 1))
            bar.set_postfix(loss=f"{history[-1]:.4f}")
        return history

    def fit_on_logits(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        class_norms: torch.Tensor,
        batch_size: int = 128,
        seed: int = 0,
        **fit_options,
    ) -> List[float]:
        """:meth:`fit` over precomputed frozen scores (B x C) and labels, shuffled with ``seed``."""
        self._check(logits, class_norms)
        dataset = torch.utils.data.TensorDataset(logits.detach(), target)
        generator = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
        return self.fit(loader, class_norms, **fit_options)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, gamma={self.gamma}, scale={self.scale}, backend={self.backend!r}"
