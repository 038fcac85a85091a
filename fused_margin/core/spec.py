"""One description of a margin softmax cross-entropy loss (docs/loss.md sections 1-4).

:class:`MarginLossSpec` holds the scalar options of the loss; the per-class and per-pair tables travel in
:class:`LossTables`. Every backend (reference, Triton, C++/CUDA) takes the same pair, so a preset is a
spec plus tables and there is one kernel family.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

HEADS = ("cosine", "linear", "logits")
#: the integer code of each ``margin_type`` and ``angular_fold`` in the row kernels' ``margin_type`` and
#: ``fold`` arguments: the one Python table of them. The C++ enums (csrc/row_kernel.h, returned by
#: ``fused_margin._C.contract()``) and the Triton kernels' constexprs (``triton/_common.py``) are checked
#: against it by tests/test_contract.py.
MARGIN_TYPE_CODES = {"additive_cosine": 0, "additive_angular": 1}
FOLD_CODES = {None: 0, "threshold": 1, "easy": 2}
#: the row forward's ``reduction`` code (csrc/row_kernel.h ``Reduction``)
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
MARGIN_TYPES = tuple(MARGIN_TYPE_CODES)
HARD_MODES = ("hard", "all")
ANGULAR_FOLDS = tuple(FOLD_CODES)
MARGIN_GRADS = ("exact", "straight_through")
REDUCTIONS = ("mean", "sum", "none")
#: the rows of the row backward's ``stats`` output (``col_stats=True``), one value a class each:
#: ``sum_i G_ij``, ``sum_i G_ij row_scale_i raw_ij`` and ``sum_i dL/dl_ij`` (csrc/row_kernel.h ``ColumnStat``)
COLUMN_STATS = ("sum_grad", "sum_grad_raw", "sum_logit_grad")

#: the range of int64, which holds labels and ``ignore_index`` on every backend.
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _scalar_tensor(name: str, value: torch.Tensor):
    if value.dim() != 0:
        raise TypeError(f"{name} must be a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
    if value.requires_grad:
        raise TypeError(f"{name} is a constant option and gets no gradient: pass a plain number (or "
                        "value.detach()), not a tensor that requires grad")
    return value.item()


def as_real(name: str, value) -> float:
    """``value`` as a Python float: accepts ``int``/``float``, any ``numbers.Real`` (NumPy scalars) and
    0-d real tensors; refuses ``bool``, strings and everything else with a ``TypeError`` naming ``name``.
    Finiteness is the caller's check."""
    if type(value) is float or type(value) is int:
        return float(value)
    if isinstance(value, torch.Tensor) and not (value.is_complex() or value.dtype == torch.bool):
        value = _scalar_tensor(name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def as_int(name: str, value) -> int:
    """``value`` as a Python int: accepts ``int``, any ``numbers.Integral`` (NumPy integers) and 0-d
    integer tensors; refuses ``bool``, floats (even integral ones) and values outside int64 with an error
    naming ``name``."""
    if type(value) is not int:
        if isinstance(value, torch.Tensor) and not (value.is_floating_point() or value.is_complex()
                                                    or value.dtype == torch.bool):
            value = _scalar_tensor(name, value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        value = int(value)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must fit in int64 (the labels' dtype), got {value}")
    return value


#: eps of the cosine head's normalisation, as ``F.normalize``.
NORM_EPS = 1e-12
#: the clamp applied to a cosine before ``acos`` in the angular margin.
ACOS_CLAMP = 1e-7


@dataclass(frozen=True)
class MarginLossSpec:
    """Scalar options of the loss of docs/loss.md.

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
        # numbers arrive as Python, NumPy or 0-d tensor scalars; the spec holds plain Python numbers
        for name in ("scale", "lambda_inst", "lambda_elm", "label_smoothing"):
            value = as_real(name, getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "ignore_index", as_int("ignore_index", self.ignore_index))
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.lambda_inst < 0:
            raise ValueError(f"lambda_inst must be >= 0, got {self.lambda_inst}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
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
        return MARGIN_TYPE_CODES[self.margin_type]

    @property
    def fold_code(self) -> int:
        return FOLD_CODES[self.angular_fold]

    def row_options(self) -> dict:
        """The scalar arguments of the row kernels' forward (:data:`ROW_FORWARD_ARGS`) that this spec
        sets, by name: ``scale, margin_type, lambda_inst, hard_all, lambda_elm, fold, straight_through,
        label_smoothing, ignore_index, reduction``; the backward takes ``scale, label_smoothing,
        ignore_index`` of them."""
        return dict(scale=float(self.scale), margin_type=self.margin_code, lambda_inst=float(self.lambda_inst),
                    hard_all=self.hard_mode == "all", lambda_elm=float(self.lambda_elm), fold=self.fold_code,
                    straight_through=self.margin_grad == "straight_through",
                    label_smoothing=float(self.label_smoothing), ignore_index=int(self.ignore_index),
                    reduction=REDUCTION_CODES[self.reduction])


#: The arguments of the row kernels' forward, in the order every backend takes them (the op schema of
#: ``torch.ops.fused_margin.row_forward`` in csrc/fused_margin.cpp, ``row_torch.row_forward``, the Triton
#: and C++/CUDA ops; the contract is stated in :mod:`fused_margin.paths.fused`). tests/test_contract.py checks
#: each backend's signature and the C++ op schema against this table.
ROW_FORWARD_ARGS = ("raw", "target", "row_scale", "col_scale", "col_shift", "class_margins", "logit_offset",
                    "pair_perturbation", "class_weight", "scale", "margin_type", "lambda_inst", "hard_all",
                    "lambda_elm", "fold", "straight_through", "label_smoothing", "ignore_index", "reduction")
#: what the forward returns, in order
ROW_FORWARD_OUTPUTS = ("loss", "lse", "pred", "hard", "nll", "target_grad", "denom")
#: the arguments of the row kernels' backward, in order
ROW_BACKWARD_ARGS = ("raw", "target", "row_scale", "col_scale", "col_shift", "logit_offset", "pair_perturbation",
                     "class_weight", "lse", "nll", "target_grad", "grad_rows", "denom", "scale", "label_smoothing",
                     "ignore_index", "scale_grad", "row_proj", "col_proj", "col_stats")
#: what the backward returns, in order
ROW_BACKWARD_OUTPUTS = ("grad", "row_coef", "col_coef", "stats")
#: the arguments of the optional forward-with-gradient op (``RowKernel.forward_backward``): the forward's and
#: the projection factors of the backward's sums
ROW_FORWARD_BACKWARD_ARGS = ROW_FORWARD_ARGS + ("row_proj", "col_proj")
#: what it returns: the forward's outputs and the backward's sums (the gradient overwrites ``raw``)
ROW_FORWARD_BACKWARD_OUTPUTS = ROW_FORWARD_OUTPUTS + ("row_coef", "col_coef")


def _pack(op: str, names: tuple, values: dict) -> tuple:
    missing = [name for name in names if name not in values]
    unknown = [name for name in values if name not in names]
    if missing or unknown:
        raise TypeError(f"{op}: " + "; ".join(
            part for part in (f"missing arguments {missing}" if missing else "",
                              f"unknown arguments {unknown}" if unknown else "") if part))
    return tuple(values[name] for name in names)


def row_forward_args(**values) -> tuple:
    """The positional arguments of a row kernel's forward from named ones (every name of
    :data:`ROW_FORWARD_ARGS`, no other): a ``TypeError`` names a missing or unknown argument."""
    return _pack("row_forward", ROW_FORWARD_ARGS, values)


def row_backward_args(**values) -> tuple:
    """The positional arguments of a row kernel's backward from named ones (:data:`ROW_BACKWARD_ARGS`)."""
    return _pack("row_backward", ROW_BACKWARD_ARGS, values)


def row_forward_backward_args(**values) -> tuple:
    """The positional arguments of ``RowKernel.forward_backward`` (:data:`ROW_FORWARD_BACKWARD_ARGS`)."""
    return _pack("row_forward_backward", ROW_FORWARD_BACKWARD_ARGS, values)


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
