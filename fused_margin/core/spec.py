"""One description of a margin softmax cross-entropy loss (docs/loss.md sections 1-4).

:class:`MarginLossSpec` holds the loss's head and its scalar options (declared once, in
:mod:`fused_margin.core.options`); the per-class and per-pair tables travel in :class:`LossTables`. Every
backend (reference, Triton, C++/CUDA) takes the same pair, so a preset is a spec plus tables and there is one
kernel family. This module also states the row kernels' contract: the arguments and outputs of the row ops
every fused backend implements (:mod:`fused_margin.paths.fused` says what they compute).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from fused_margin.core import options as _options
from fused_margin.core.options import (  # noqa: F401
    FOLD_CODES,
    INT64_MAX,
    INT64_MIN,
    MARGIN_TYPE_CODES,
    REDUCTION_CODES,
    ROW_TABLES,
    as_int,
    as_real,
)

HEADS = ("cosine", "linear", "logits")
#: the rows of the row backward's ``stats`` output (``col_stats=True``), one value a class each:
#: ``sum_i G_ij``, ``sum_i G_ij row_scale_i raw_ij`` and ``sum_i dL/dl_ij`` (csrc/row_kernel.h ``ColumnStat``)
COLUMN_STATS = ("sum_grad", "sum_grad_raw", "sum_logit_grad")

#: eps of the cosine head's normalisation, as ``F.normalize``.
NORM_EPS = 1e-12
#: the clamp applied to a cosine before ``acos`` in the angular margin.
ACOS_CLAMP = 1e-7


def _post_init(self):
    if self.head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
    for option in _options.OPTIONS:  # each option's kind and range; the spec holds plain Python values
        object.__setattr__(self, option.name, option.coerce(getattr(self, option.name)))
    # the options that depend on each other
    if self.margin_type == "additive_angular" and self.head == "linear":
        raise ValueError(
            "margin_type='additive_angular' needs cosine scores: use head='cosine', "
            "or head='logits' with input_is_cosine=True; got head='linear'"
        )
    if self.margin_type == "additive_angular" and self.head == "logits" and not self.input_is_cosine:
        raise ValueError(
            "margin_type='additive_angular' on head='logits' needs input_is_cosine=True "
            "(the angular margin takes acos of the input)"
        )
    if self.angular_fold is not None and self.margin_type != "additive_angular":
        raise ValueError(f"angular_fold={self.angular_fold!r} applies only to margin_type='additive_angular'")


def _kernel_options(self) -> Tuple[List[float], List[int]]:
    """``(floats, ints)``: the option vectors every row op takes (:func:`fused_margin.core.options.pack`)."""
    return _options.pack(self)


_SPEC_DOC = """Scalar options of the loss of docs/loss.md, and its head (``"cosine"``, ``"linear"`` or
``"logits"``; default ``"logits"``).

Per row ``i`` with label ``y`` and base scores ``z'`` (after the optional MARC affine):

* ``M_i = m_y (1 + lambda_inst h_i (1 - z'_iy) / 2) - lambda_elm m_{c*}`` (DBM instance margin,
  ELM's strongest wrong class ``c*``), ``h_i = [argmax_j z'_ij != y]`` (``hard_mode="hard"``) or 1
  (``"all"``);
* target logit ``s psi(z'_iy, M_i)`` with ``psi = cos(acos(c) + M)`` (``additive_angular``: ArcFace,
  DBM) or ``c - M`` (``additive_cosine``: CosFace, LDAM, ELM); other logits ``s z'_ij``;
* then the logit offset, pair perturbation, class weights and label smoothing of ``F.cross_entropy``.

Options (fused_margin/core/options.py, where they are declared):

{options}
"""

#: A frozen dataclass with ``head`` and one field per option of :data:`fused_margin.core.options.OPTIONS`
#: (name, default), checked when built.
MarginLossSpec = dataclasses.make_dataclass(
    "MarginLossSpec",
    [("head", str, dataclasses.field(default="logits"))]
    + [(o.name, object, dataclasses.field(default=o.default)) for o in _options.OPTIONS],
    frozen=True,
    namespace={
        "__post_init__": _post_init,
        "kernel_options": _kernel_options,
        "__doc__": _SPEC_DOC.replace("{options}", _options.docstring(indent=4)),
        "__module__": __name__,
    },
)


#: The row ops' arguments, in the order every backend takes them (the op schemas of
#: ``torch.ops.fused_margin.row_forward`` etc. in csrc/fused_margin.cpp, the eager double in the tests, the
#: Triton ops; what they compute is stated in :mod:`fused_margin.paths.fused`). The loss's options travel as
#: two vectors (``floats``, ``ints``: :mod:`fused_margin.core.options`), its tables as one list in the order of
#: :data:`ROW_TABLES` (``None`` where absent), so a new option or table changes no schema.
#: tests/backends/test_contract.py checks every backend's signature and the C++ schemas against these tables.
ROW_FORWARD_ARGS = ("raw", "target", "tables", "floats", "ints")
#: what the forward returns, in order
ROW_FORWARD_OUTPUTS = ("loss", "lse", "pred", "hard", "nll", "target_grad", "denom")
#: the arguments of the row kernels' backward, in order
ROW_BACKWARD_ARGS = (
    "raw",
    "target",
    "tables",
    "lse",
    "nll",
    "target_grad",
    "grad_rows",
    "denom",
    "floats",
    "ints",
    "scale_grad",
    "row_proj",
    "col_proj",
    "col_stats",
)
#: what the backward returns, in order
ROW_BACKWARD_OUTPUTS = ("grad", "row_coef", "col_coef", "stats")
#: the arguments of the optional forward-with-gradient op (``RowKernel.forward_backward``): the forward's and
#: the projection factors of the backward's sums
ROW_FORWARD_BACKWARD_ARGS = ROW_FORWARD_ARGS + ("row_proj", "col_proj")
#: what it returns: the forward's outputs and the backward's sums (the gradient overwrites ``raw``)
ROW_FORWARD_BACKWARD_OUTPUTS = ROW_FORWARD_OUTPUTS + ("row_coef", "col_coef")


def row_tables(**tables: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """The row ops' ``tables`` list from named tables (:data:`ROW_TABLES`; absent ones ``None``); a
    ``TypeError`` names an unknown one."""
    unknown = sorted(set(tables) - set(ROW_TABLES))
    if unknown:
        raise TypeError(f"unknown row-op tables {unknown}; the row ops take {ROW_TABLES}")
    return [tables.get(name) for name in ROW_TABLES]


def named_tables(tables) -> Dict[str, Optional[torch.Tensor]]:
    """The row ops' ``tables`` list by name (:data:`ROW_TABLES`)."""
    if len(tables) != len(ROW_TABLES):
        raise ValueError(f"the row ops take {len(ROW_TABLES)} tables {ROW_TABLES}, got {len(tables)}")
    return dict(zip(ROW_TABLES, tables))


def _pack(op: str, names: tuple, values: dict) -> tuple:
    missing = [name for name in names if name not in values]
    unknown = [name for name in values if name not in names]
    if missing or unknown:
        raise TypeError(
            f"{op}: "
            + "; ".join(
                part
                for part in (
                    f"missing arguments {missing}" if missing else "",
                    f"unknown arguments {unknown}" if unknown else "",
                )
                if part
            )
        )
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
    """Side outputs: ``lse`` (B, fp32; fp64 for fp64 input) of the final logits, ``pred`` (B, int64) the argmax of
    the base scores, ``hard`` (B, bool) the hard-positive flag (False on ignored rows)."""

    lse: torch.Tensor
    pred: torch.Tensor
    hard: torch.Tensor
