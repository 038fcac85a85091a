"""``margin_cross_entropy`` and its presets: validation, then the chosen backend.

The loss is SPEC.md's: base scores from a cosine, linear or logits head, optional MARC affine, a target
margin (class table, DBM instance margin on hard positives, ELM's strongest wrong class; angular or
cosine), logit offset, pair perturbation, class weights and label smoothing, with PyTorch's reductions.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import builders
from .backends import resolve_backend
from .fused import fused_margin_cross_entropy
from .reference import margin_cross_entropy_reference
from .spec import LossTables, MarginAux, MarginLossSpec

__all__ = [
    "margin_cross_entropy",
    "set_sync_label_check",
    "dbm_loss",
    "ldam_loss",
    "elm_loss",
    "arcface_loss",
    "cosface_loss",
    "balanced_softmax_loss",
    "logit_adjusted_loss",
]


def _check_tensor(name, value, device, *, dims, floating=True):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but input is on {device}")


_SYNC_LABEL_CHECK = {"enabled": False}


def set_sync_label_check(enabled: bool) -> None:
    """Check labels on accelerators with a host sync and a ``ValueError`` naming the bad entry (slower).

    By default labels on CPU tensors are checked that way, and labels on CUDA tensors with an
    asynchronous device assertion (no host sync in the training step, as ``F.cross_entropy``)."""
    _SYNC_LABEL_CHECK["enabled"] = bool(enabled)


def _check_labels(target, num_classes, ignore_index):
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if target.device.type == "cpu" or _SYNC_LABEL_CHECK["enabled"]:
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"target[{i}] = {int(target[i])} is out of range: labels must be in "
                             f"[0, {num_classes}) or equal ignore_index ({ignore_index})")
    else:
        torch._assert_async(~bad.any(), f"fused_margin: target has a label outside [0, {num_classes}) that is "
                                        f"not ignore_index ({ignore_index})")


def _validate(input, target, weight, bias, spec: MarginLossSpec, tables: LossTables) -> int:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    device = input.device
    _check_tensor("input", input, device, dims=2)
    rows = input.shape[0]
    if spec.head == "logits":
        if weight is not None:
            raise ValueError("weight (the C x D class weights) is given but head='logits'")
        num_classes = input.shape[1]
    else:
        if weight is None:
            raise ValueError(f"head={spec.head!r} needs weight, the C x D class weights")
        _check_tensor("weight", weight, device, dims=2)
        if weight.dtype != input.dtype:
            raise TypeError(f"weight has dtype {weight.dtype} but input has {input.dtype}")
        if weight.shape[1] != input.shape[1]:
            raise ValueError(f"weight must be C x D with D = input.shape[1] = {input.shape[1]}, "
                             f"got shape {tuple(weight.shape)}")
        num_classes = weight.shape[0]
    if num_classes < 2:
        raise ValueError(f"the number of classes C must be at least 2, got {num_classes}")
    if bias is not None:
        if spec.head != "linear":
            raise ValueError(f"bias applies only to head='linear', got head={spec.head!r}")
        _check_tensor("bias", bias, device, dims=1)
        if bias.shape[0] != num_classes:
            raise ValueError(f"bias must have C = {num_classes} entries, got {bias.shape[0]}")

    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of int64 labels, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must have dtype torch.int64, got {target.dtype}")
    _check_tensor("target", target, device, dims=1, floating=False)
    if target.shape[0] != rows:
        raise ValueError(f"target has {target.shape[0]} labels but input has {rows} rows")
    if not torch.compiler.is_compiling() and rows > 0:
        _check_labels(target, num_classes, spec.ignore_index)

    for name in ("class_margins", "logit_offset", "class_weight", "omega", "beta", "class_norms"):
        value = getattr(tables, name)
        if value is not None:
            _check_tensor(name, value, device, dims=1)
            if value.shape[0] != num_classes:
                raise ValueError(f"{name} must have C = {num_classes} entries, got {value.shape[0]}")
    if tables.pair_perturbation is not None:
        _check_tensor("pair_perturbation", tables.pair_perturbation, device, dims=2)
        if tuple(tables.pair_perturbation.shape) != (rows, num_classes):
            raise ValueError(f"pair_perturbation must be B x C = {rows} x {num_classes}, "
                             f"got {tuple(tables.pair_perturbation.shape)}")
    if tables.beta is not None and spec.head == "logits" and tables.class_norms is None:
        raise ValueError("beta on head='logits' needs class_norms, the classifier's row norms ||W_j||")
    if tables.class_norms is not None and (spec.head != "logits" or tables.beta is None):
        raise ValueError("class_norms is used only with beta on head='logits' "
                         "(the cosine and linear heads take the norms from weight)")
    return num_classes


def margin_cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                         *, bias: Optional[torch.Tensor] = None, head: Optional[str] = None,
                         input_is_cosine: bool = False, scale: float = 1.0,
                         class_margins: Optional[torch.Tensor] = None, margin_type: str = "additive_cosine",
                         lambda_inst: float = 0.0, hard_mode: str = "hard", lambda_elm: float = 0.0,
                         angular_fold: Optional[str] = None, margin_grad: str = "exact",
                         logit_offset: Optional[torch.Tensor] = None,
                         pair_perturbation: Optional[torch.Tensor] = None,
                         omega: Optional[torch.Tensor] = None, beta: Optional[torch.Tensor] = None,
                         class_norms: Optional[torch.Tensor] = None,
                         class_weight: Optional[torch.Tensor] = None, reduction: str = "mean",
                         ignore_index: int = -100, label_smoothing: float = 0.0, return_aux: bool = False,
                         backend: str = "auto"):
    r"""Margin softmax cross-entropy (SPEC.md), one op for DBM, LDAM, ELM, ArcFace, CosFace, balanced
    softmax, logit adjustment, MARC and MetaLAD.

    Args:
        input: B x C scores (``head="logits"``) or B x D features (cosine / linear heads).
        target: B int64 labels in ``[0, C)`` or ``ignore_index``.
        weight: C x D class weights (``nn.Linear`` layout). Given, the head defaults to ``"cosine"``:
            ``z_ij = X_i . W_j / (max(||X_i||, eps) max(||W_j||, eps))``; ``head="linear"`` gives
            ``X_i . W_j + b_j``.
        input_is_cosine: with ``head="logits"``, says the input holds cosines (needed for angular margins).
        scale: ``s``. class_margins: ``m`` (C). margin_type: ``"additive_cosine"`` (``psi = c - M``:
            CosFace, LDAM, ELM) or ``"additive_angular"`` (``psi = cos(acos(c) + M)``: ArcFace, DBM).
        lambda_inst: DBM instance margin ``M = m_y (1 + lambda_inst h (1 - z'_y) / 2)``, ``h`` = hard
            positive (``hard_mode="hard"``: argmax of the base scores != label) or 1 (``"all"``).
        lambda_elm: ELM, ``M -= lambda_elm m_{c*}`` with ``c*`` the strongest wrong class.
        angular_fold: ``None``, ``"threshold"`` (ArcFace's ``c - M sin M`` past ``cos(pi - M)``) or
            ``"easy"`` (no margin where ``c <= 0``). margin_grad: ``"exact"`` or ``"straight_through"``.
        logit_offset: ``a`` (C) added after the scale (balanced softmax ``log p``, logit adjustment).
        pair_perturbation: ``P`` (B x C) added to non-target logits (MetaLAD).
        omega, beta: MARC's ``z' = omega_j z + beta_j ||W_j||`` (trainable); ``class_norms`` gives
            ``||W_j||`` for the logits head.
        class_weight, reduction, ignore_index, label_smoothing: as ``F.cross_entropy``.
        return_aux: also return :class:`MarginAux` ``(lse, pred, hard)``.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpu"``.

    Returns the loss (fp32; fp64 for fp64 input), and the side outputs with ``return_aux``.
    """
    if head is None:
        head = "logits" if weight is None else "cosine"
    spec = MarginLossSpec(head=head, input_is_cosine=input_is_cosine, scale=scale, margin_type=margin_type,
                          lambda_inst=lambda_inst, hard_mode=hard_mode, lambda_elm=lambda_elm,
                          angular_fold=angular_fold, margin_grad=margin_grad,
                          label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction)
    tables = LossTables(class_margins, logit_offset, pair_perturbation, class_weight, omega, beta, class_norms)
    _validate(input, target, weight, bias, spec, tables)
    return apply_loss(input, target, weight, bias, spec, tables, backend=backend, return_aux=return_aux)


def apply_loss(input, target, weight, bias, spec: MarginLossSpec, tables: LossTables, *, backend="auto",
               return_aux=False):
    """Run validated inputs through the chosen backend (no checks; see :func:`margin_cross_entropy`)."""
    kernel = resolve_backend(backend, input.device, input.dtype)
    if kernel is None:
        loss, aux = margin_cross_entropy_reference(input, target, weight, bias, spec, tables)
    else:
        loss, lse, pred, hard = fused_margin_cross_entropy(kernel, input, target, weight, bias, spec, tables)
        aux = MarginAux(lse, pred, hard)
    return (loss, aux) if return_aux else loss


def _num_classes(input, weight):
    return input.shape[1] if weight is None else weight.shape[0]


def _head_kwargs(weight):
    """Presets on cosine classifiers: ``weight`` given means features and the cosine head, else the
    input holds cosines."""
    return {"head": "cosine"} if weight is not None else {"head": "logits", "input_is_cosine": True}


def _table(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device)


def dbm_loss(input, target, weight=None, *, class_counts, variant="ce", K=0.1, tau=1.0, scale=30.0,
             lambda_inst=1.0, margin_ref="min", hard_mode="hard", epoch=0, drw_betas=(0.0, 0.9999),
             drw_step=160, cb_beta=0.9999, **kwargs):
    """DBM (difficulty-aware balancing margin, AAAI'25): ArcFace-style angular margin on a cosine
    classifier, ``M_i = m_y (1 + lambda_inst h_i (1 - cos_iy) / 2)`` with ``m_y = K (n_ref / n_y)^tau``.

    ``variant``: ``"ce"``; ``"bs"`` adds the log prior after the scale (balanced softmax); ``"cb"``
    weights classes by class-balanced weights (``cb_beta``); ``"drw"`` uses the DRW schedule at ``epoch``.
    Builds its tables on every call: in a training loop use :class:`fused_margin.DBMLoss`."""
    tables = dbm_tables(class_counts, variant, K, tau, margin_ref, epoch, drw_betas, drw_step, cb_beta)
    tables = {k: _table(v, input) for k, v in tables.items()}
    return margin_cross_entropy(input, target, weight, scale=scale, margin_type="additive_angular",
                                lambda_inst=lambda_inst, hard_mode=hard_mode, **tables,
                                **_head_kwargs(weight), **kwargs)


def dbm_tables(class_counts, variant, K, tau, margin_ref, epoch=0, drw_betas=(0.0, 0.9999), drw_step=160,
               cb_beta=0.9999):
    """The tables of a DBM variant (see :func:`dbm_loss`)."""
    tables = {"class_margins": builders.dbm_class_margins(class_counts, K, tau, margin_ref)}
    if variant == "bs":
        tables["logit_offset"] = builders.log_prior(class_counts)
    elif variant == "cb":
        tables["class_weight"] = builders.class_balanced_weights(class_counts, cb_beta)
    elif variant == "drw":
        tables["class_weight"] = builders.drw_weights(class_counts, epoch, drw_betas, drw_step)
    elif variant != "ce":
        raise ValueError(f"variant must be 'ce', 'bs', 'cb' or 'drw', got {variant!r}")
    return tables


def ldam_loss(input, target, weight=None, *, class_counts, max_m=0.5, scale=30.0, **kwargs):
    """LDAM (Cao et al. 2019): ``s (cos_y - m_y)`` with ``m_y`` proportional to ``n_y^-1/4``, largest
    ``max_m``. Pass ``class_weight`` for LDAM-DRW."""
    margins = _table(builders.ldam_margins(class_counts, max_m), input)
    return margin_cross_entropy(input, target, weight, scale=scale, class_margins=margins,
                                margin_type="additive_cosine", **_head_kwargs(weight), **kwargs)


def elm_loss(input, target, weight=None, *, class_counts, max_m=0.5, lambda_elm=1.0, scale=30.0, **kwargs):
    """ELM (Kato & Hotta, eq. 7): LDAM's margins with the strongest wrong class's margin added back,
    target ``s (cos_y - m_y + lambda_elm m_{c*})``."""
    margins = _table(builders.ldam_margins(class_counts, max_m), input)
    return margin_cross_entropy(input, target, weight, scale=scale, class_margins=margins,
                                margin_type="additive_cosine", lambda_elm=lambda_elm,
                                **_head_kwargs(weight), **kwargs)


def arcface_loss(input, target, weight=None, *, margin=0.5, scale=64.0, **kwargs):
    """ArcFace (Deng et al. 2019): ``s cos(theta_y + m)``; ``angular_fold="threshold"`` for its guard."""
    builders._finite("margin", margin)
    margins = torch.full((_num_classes(input, weight),), float(margin), device=input.device)
    return margin_cross_entropy(input, target, weight, scale=scale, class_margins=margins,
                                margin_type="additive_angular", **_head_kwargs(weight), **kwargs)


def cosface_loss(input, target, weight=None, *, margin=0.35, scale=64.0, **kwargs):
    """CosFace (Wang et al. 2018): ``s (cos_y - m)``."""
    builders._finite("margin", margin)
    margins = torch.full((_num_classes(input, weight),), float(margin), device=input.device)
    return margin_cross_entropy(input, target, weight, scale=scale, class_margins=margins,
                                margin_type="additive_cosine", **_head_kwargs(weight), **kwargs)


def balanced_softmax_loss(input, target, weight=None, *, class_counts, **kwargs):
    """Balanced softmax (Ren et al. 2020): cross-entropy of ``logits + log p_j``. With ``weight`` the
    head is linear (``head="cosine"`` and ``scale`` to use a cosine classifier)."""
    kwargs.setdefault("head", "logits" if weight is None else "linear")
    offset = _table(builders.log_prior(class_counts), input)
    return margin_cross_entropy(input, target, weight, logit_offset=offset, **kwargs)


def logit_adjusted_loss(input, target, weight=None, *, class_counts, tau=1.0, **kwargs):
    """Logit-adjusted loss (Menon et al. 2021): cross-entropy of ``logits + tau log pi_j``."""
    kwargs.setdefault("head", "logits" if weight is None else "linear")
    builders._finite("tau", tau)
    offset = _table(builders.log_prior(class_counts) * float(tau), input)
    return margin_cross_entropy(input, target, weight, logit_offset=offset, **kwargs)
