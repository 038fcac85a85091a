"""One description of a margin softmax cross-entropy loss (SPEC.md sections 1-4).

:class:`MarginLossSpec` holds the scalar options of the loss; the per-class and per-pair tables travel in
:class:`LossTables`. Every backend (reference, Triton, C++/CUDA) takes the same pair, so a preset is a
spec plus tables and there is one kernel family.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

HEADS = ("cosine", "linear", "logits")
MARGIN_TYPES = ("additive_cosine", "additive_angular")
HARD_MODES = ("hard", "all")
ANGULAR_FOLDS = (None, "threshold", "easy")
MARGIN_GRADS = ("exact", "straight_through")
REDUCTIONS = ("mean", "sum", "none")

#: eps of the cosine head's normalisation, as ``F.normalize``.
NORM_EPS = 1e-12
#: the clamp applied to a cosine before ``acos`` in the angular margin.
ACOS_CLAMP = 1e-7


@dataclass(frozen=True)
class MarginLossSpec:
    """Scalar options of the loss of SPEC.md.

    Per row ``i`` with label ``y`` and base scores ``z'`` (after the optional MARC affine):

    * ``M_i = m_y (1 + lambda_inst h_i (1 - z'_iy) / 2) - lambda_elm m_{c*}`` (DBM instance margin,
      ELM's strongest wrong class ``c*``), ``h_i = [argmax_j z'_ij != y]`` (``hard_mode="hard"``) or 1
      (``"all"``);
    * target logit ``s psi(z'_iy, M_i)`` with ``psi = cos(acos(c) + M)`` (``additive_angular``: ArcFace,
      DBM) or ``c - M`` (``additive_cosine``: CosFace, LDAM, ELM); other logits ``s z'_ij``;
    * then the logit offset, pair perturbation, class weights and label smoothing of
      ``F.cross_entropy``.
    """

    head: str = "logits"
    input_is_cosine: bool = False
    scale: float = 1.0
    margin_type: str = "additive_cosine"
    lambda_inst: float = 0.0
    hard_mode: str = "hard"
    lambda_elm: float = 0.0
    angular_fold: Optional[str] = None
    margin_grad: str = "exact"
    label_smoothing: float = 0.0
    ignore_index: int = -100
    reduction: str = "mean"

    def __post_init__(self):
        _choice("head", self.head, HEADS)
        _choice("margin_type", self.margin_type, MARGIN_TYPES)
        _choice("hard_mode", self.hard_mode, HARD_MODES)
        _choice("angular_fold", self.angular_fold, ANGULAR_FOLDS)
        _choice("margin_grad", self.margin_grad, MARGIN_GRADS)
        _choice("reduction", self.reduction, REDUCTIONS)
        for name in ("scale", "lambda_inst", "lambda_elm", "label_smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.lambda_inst < 0:
            raise ValueError(f"lambda_inst must be >= 0, got {self.lambda_inst}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if self.margin_type == "additive_angular" and self.head == "linear":
            raise ValueError("margin_type='additive_angular' needs cosine scores: use head='cosine', "
                             "or head='logits' with input_is_cosine=True; got head='linear'")
        if self.margin_type == "additive_angular" and self.head == "logits" and not self.input_is_cosine:
            raise ValueError("margin_type='additive_angular' on head='logits' needs input_is_cosine=True "
                             "(the angular margin takes acos of the input)")
        if self.angular_fold is not None and self.margin_type != "additive_angular":
            raise ValueError(f"angular_fold={self.angular_fold!r} applies only to "
                             "margin_type='additive_angular'")

    # integer codes shared with the kernels
    @property
    def margin_code(self) -> int:
        return MARGIN_TYPES.index(self.margin_type)

    @property
    def fold_code(self) -> int:
        return ANGULAR_FOLDS.index(self.angular_fold)


class LossTables(NamedTuple):
    """Per-class (C) and per-pair (B x C) tables of the loss; ``None`` where unused.

    ``class_margins`` m, ``logit_offset`` a (added after the scale), ``pair_perturbation`` P (non-target
    entries only), ``class_weight`` w, MARC's ``omega``/``beta`` and, for the logits head, the classifier
    row norms ``class_norms`` that multiply ``beta``.
    """

    class_margins: Optional[torch.Tensor] = None
    logit_offset: Optional[torch.Tensor] = None
    pair_perturbation: Optional[torch.Tensor] = None
    class_weight: Optional[torch.Tensor] = None
    omega: Optional[torch.Tensor] = None
    beta: Optional[torch.Tensor] = None
    class_norms: Optional[torch.Tensor] = None


class MarginAux(NamedTuple):
    """Side outputs: ``lse`` (B, fp32; fp64 for fp64 input) of the final logits, ``pred`` (B, int64) the argmax of the base
    scores, ``hard`` (B, bool) the hard-positive flag (False on ignored rows)."""

    lse: torch.Tensor
    pred: torch.Tensor
    hard: torch.Tensor


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
