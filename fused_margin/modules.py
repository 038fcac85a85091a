"""``nn.Module`` losses (tables cached as buffers, so ``.to(device)`` moves them) and the cosine head."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import nn

from fused_margin.backends import BACKENDS
from fused_margin.core import builders
from fused_margin.core.reference import compute_dtype
from fused_margin.core.spec import MarginLossSpec
from fused_margin.functional import check_class_chunk, check_option_names, dbm_tables, margin_cross_entropy
from fused_margin.paths.sampled import check_sample_rate, check_sparse_grad

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


class ExactTables(nn.Module):
    """A module whose class tables (buffers named in ``_EXACT_TABLES``) keep the float64 values they were
    built from in ``self._exact``: the buffers hold them in the module's table dtype (float32 until moved),
    and ``.double()`` (or ``.to(torch.float64)``) restores the float64 values, not float32-rounded ones. A
    table assigned by hand replaces its kept values."""

    _EXACT_TABLES: Sequence[str] = ()

    def __setattr__(self, name, value):
        if name in self._EXACT_TABLES and "_exact" in self.__dict__:
            self._exact.pop(name, None)
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        for name, exact in self._exact.items():
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype == torch.float64:
                # a copy, so that in-place writes to the buffer (load_state_dict) leave the kept values alone
                self._buffers[name] = exact.to(device=buf.device, copy=True)
        return result


_SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(MarginLossSpec))
#: keywords of :class:`MarginLoss` that :func:`margin_cross_entropy` does not have
_MODULE_OPTIONS = ("feature_head", "cosine_input") + _TABLES


def _check_options(options, owner, taken=()):
    for name, ours in (("head", "feature_head"), ("input_is_cosine", "cosine_input")):
        if name in options:
            raise TypeError(
                f"{owner} takes {ours}= (the head when forward gets weight / whether logits are "
                f"cosines), not {name}=; forward(..., {name}=...) overrides it per call"
            )
    check_option_names(options, owner, taken=tuple(taken) + ("head", "input_is_cosine"), extra=_MODULE_OPTIONS)


class MarginLoss(ExactTables):
    """The loss of docs/loss.md with fixed options and per-class tables held as buffers.

    ``forward(input, target, weight=None, **kwargs)``: ``input`` is B x C scores when ``weight`` is None
    (cosines when ``cosine_input``), else B x D features with ``weight`` the C x D classifier of
    ``feature_head``. Head rule (:data:`fused_margin.functional.HEAD_RULE`): ``feature_head=None`` means
    the class's ``default_feature_head``, ``"cosine"`` for the margin losses and ``"linear"`` for
    :class:`BalancedSoftmaxLoss` and :class:`LogitAdjustedLoss`.

    Keyword arguments of ``forward`` override the stored options per call, tables included
    (``loss(x, y, w, class_weight=drw.weights(epoch))`` uses those weights for that call); other keywords
    of :func:`fused_margin.margin_cross_entropy` (``pair_perturbation``, ``omega``, ...) pass through.

    Everything is checked at construction: option names against :func:`margin_cross_entropy`'s keywords
    (a typo is a ``TypeError`` here, not at the first ``forward``), option values, and the tables (1-D,
    real, finite; one host read here, none per step). Tables are computed in float64 and stored as float32
    buffers; ``.double()`` (or ``.to(torch.float64)``) gives the float64 values themselves, not
    float32-rounded ones.
    """

    _EXACT_TABLES = _TABLES

    #: the head used when ``forward`` gets ``weight`` and ``feature_head`` was not given.
    default_feature_head = "cosine"

    def __init__(
        self,
        *,
        class_margins=None,
        logit_offset=None,
        class_weight=None,
        scale=1.0,
        margin_type="additive_cosine",
        cosine_input=True,
        feature_head=None,
        reduction="mean",
        ignore_index=-100,
        label_smoothing=0.0,
        backend="auto",
        **options,
    ):
        super().__init__()
        owner = type(self).__name__
        _check_options(options, owner)
        if feature_head is None:
            feature_head = self.default_feature_head
        if feature_head not in ("cosine", "linear"):
            raise ValueError(
                f"feature_head must be 'cosine' or 'linear' (the head when forward gets weight), got {feature_head!r}"
            )
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        options = dict(
            scale=scale,
            margin_type=margin_type,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            **options,
        )
        spec_options = {k: v for k, v in options.items() if k in _SPEC_FIELDS}
        spec = MarginLossSpec(head=feature_head, **spec_options)  # every value checked now
        options.update({k: getattr(spec, k) for k in spec_options})  # as plain Python numbers
        if "class_chunk" in options:  # the memory-lean path: "auto", "off" or classes per chunk
            options["class_chunk"] = check_class_chunk(options["class_chunk"])
        if not isinstance(options.get("double_backward", False), bool):  # the reference for create_graph
            raise TypeError(f"double_backward must be a bool, got {options['double_backward']!r}")
        if "sample_rate" in options:  # Partial FC's negative-class sampling
            options["sample_rate"] = check_sample_rate(options["sample_rate"])
        if "sparse_grad" in options:
            check_sparse_grad(options["sparse_grad"])
        options["backend"] = backend
        self._exact = {}
        for name in _TABLES:
            self.register_buffer(name, None, persistent=False)
        for name, value in zip(_TABLES, (class_margins, logit_offset, class_weight)):
            if value is not None:
                self.set_table(name, value)
        self.cosine_input = bool(cosine_input)
        self.feature_head = feature_head
        self.options = options

    def set_table(self, name: str, values) -> torch.Tensor:
        """Store table ``name`` (``"class_margins"``, ``"logit_offset"`` or ``"class_weight"``) from
        ``values`` (sequence, array or tensor; checked 1-D, real and finite, with one host read), keeping
        the float64 values for ``.double()``; the buffer keeps the device and dtype of the module's tables
        (float32 until moved). Returns the buffer."""
        if name not in _TABLES:
            raise ValueError(f"name must be one of {_TABLES}, got {name!r}")
        exact = builders.as_table(name, values, self._num_classes())
        device, dtype = self._table_place(name)
        with torch.no_grad():
            self._buffers[name] = exact.to(device=device, dtype=dtype)
        self._exact[name] = exact
        return self._buffers[name]

    def _num_classes(self):
        return next((b.shape[0] for b in self._buffers.values() if b is not None), None)

    def _table_place(self, name):
        current = self._buffers.get(name)
        if current is None:
            current = next((b for b in self._buffers.values() if b is not None), None)
        return (torch.device("cpu"), torch.float32) if current is None else (current.device, current.dtype)

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None, **kwargs
    ) -> torch.Tensor:
        options = {name: self._buffers[name] for name in _TABLES if self._buffers[name] is not None}
        options.update(self.options)
        if weight is None:
            options["head"], options["input_is_cosine"] = "logits", self.cosine_input
        else:
            options["head"] = self.feature_head
        options.update(kwargs)  # per-call options and tables win
        return margin_cross_entropy(input, target, weight, **options)

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

    All options after ``class_counts`` are keyword-only. ``state_dict`` holds the epoch (and the schedule
    it belongs to), so ``load_state_dict`` on a resumed run restores the DRW weights of that epoch.
    """

    def __init__(
        self,
        class_counts,
        *,
        variant="ce",
        K=0.1,
        tau=1.0,
        scale=30.0,
        lambda_inst=1.0,
        margin_ref="min",
        hard_mode="hard",
        drw_betas: Sequence[float] = (0.0, 0.9999),
        drw_step=160,
        cb_beta=0.9999,
        backend="auto",
        **options,
    ):
        counts = builders.as_class_counts(class_counts)
        drw_betas = builders.check_betas(drw_betas, "drw_betas")
        drw_step = builders._positive_int("drw_step", drw_step, 1, "> 0")
        tables = dbm_tables(counts, variant, K, tau, margin_ref, 0, drw_betas, drw_step, cb_beta, dtype=torch.float64)
        _check_options(options, "DBMLoss", taken=("margin_type",) + tuple(tables))
        super().__init__(
            **tables,
            scale=scale,
            margin_type="additive_angular",
            lambda_inst=lambda_inst,
            hard_mode=hard_mode,
            backend=backend,
            **options,
        )
        self.class_counts = counts
        self.variant = variant
        self.drw_betas, self.drw_step = drw_betas, drw_step
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """DRW: switch the class weights to ``betas[epoch // step]`` (no effect on the tables of other
        variants). ``epoch``: a Python, NumPy or 0-d tensor integer >= 0."""
        epoch = builders._positive_int("epoch", epoch, 0)
        if self.variant == "drw":
            self.set_table(
                "class_weight",
                builders.drw_weights(self.class_counts, epoch, self.drw_betas, self.drw_step, dtype=torch.float64),
            )
        self.epoch = epoch

    def get_extra_state(self):
        return {
            "epoch": self.epoch,
            "variant": self.variant,
            "drw_betas": self.drw_betas,
            "drw_step": self.drw_step,
            "class_counts": torch.from_numpy(self.class_counts.copy()),
        }

    def set_extra_state(self, state):
        counts = state["class_counts"]
        for key, ours, theirs in (
            ("variant", self.variant, state["variant"]),
            ("drw_betas", self.drw_betas, tuple(state["drw_betas"])),
            ("drw_step", self.drw_step, state["drw_step"]),
        ):
            if ours != theirs:
                raise ValueError(f"DBMLoss state was saved with {key}={theirs!r}, this loss has {ours!r}")
        if counts.shape[0] != self.class_counts.size or not bool(
            (counts.double() == torch.from_numpy(self.class_counts)).all()
        ):
            raise ValueError("DBMLoss state was saved with other class_counts than this loss's")
        self.set_epoch(state["epoch"])


class LDAMLoss(MarginLoss):
    """LDAM (Cao et al., NeurIPS 2019): ``s (cos_y - m_y)``, ``m_y`` proportional to ``n_y^-1/4`` with
    the largest ``max_m``; ``class_weight`` (e.g. from :class:`fused_margin.DRWSchedule`) for LDAM-DRW,
    stored or per call (``loss(x, y, w, class_weight=drw.weights(epoch, device=x.device))``). Options
    after ``class_counts`` are keyword-only."""

    def __init__(self, class_counts, *, max_m=0.5, scale=30.0, class_weight=None, backend="auto", **options):
        _check_options(options, "LDAMLoss", taken=("margin_type", "class_margins"))
        super().__init__(
            class_margins=builders.ldam_margins(class_counts, max_m, dtype=torch.float64),
            class_weight=class_weight,
            scale=scale,
            margin_type="additive_cosine",
            backend=backend,
            **options,
        )


class ELMLoss(MarginLoss):
    """ELM (Kato & Hotta): LDAM margins with the strongest wrong class's margin ``lambda_elm m_{c*}``
    added back to the target: ``s (cos_y - m_y + lambda_elm m_{c*})``. Options after ``class_counts``
    are keyword-only."""

    def __init__(self, class_counts, *, max_m=0.5, lambda_elm=1.0, scale=30.0, backend="auto", **options):
        _check_options(options, "ELMLoss", taken=("margin_type", "class_margins"))
        super().__init__(
            class_margins=builders.ldam_margins(class_counts, max_m, dtype=torch.float64),
            scale=scale,
            margin_type="additive_cosine",
            lambda_elm=lambda_elm,
            backend=backend,
            **options,
        )


class _ConstantMarginLoss(MarginLoss):
    def __init__(self, margin, scale, margin_type, backend, **options):
        _check_options(options, type(self).__name__, taken=("margin_type",))
        self_margin = builders._finite("margin", margin)
        super().__init__(scale=scale, margin_type=margin_type, backend=backend, **options)
        self.margin = self_margin

    def forward(self, input, target, weight=None, **kwargs):
        """The constant table ``m`` is made per call on the input's device in its compute dtype (float64
        for float64 input); a per-call ``class_margins`` replaces it."""
        if "class_margins" not in kwargs and self._buffers["class_margins"] is None:
            num_classes = input.shape[1] if weight is None else weight.shape[0]
            kwargs["class_margins"] = torch.full(
                (num_classes,), self.margin, device=input.device, dtype=compute_dtype(input.dtype)
            )
        return super().forward(input, target, weight, **kwargs)


class ArcFaceLoss(_ConstantMarginLoss):
    """ArcFace (Deng et al., CVPR 2019): ``s cos(theta_y + m)``. ``angular_fold="threshold"`` gives
    insightface's th/mm guard, ``"easy"`` its easy margin. All options are keyword-only."""

    def __init__(self, *, margin=0.5, scale=64.0, backend="auto", **options):
        super().__init__(margin, scale, "additive_angular", backend, **options)


class CosFaceLoss(_ConstantMarginLoss):
    """CosFace (Wang et al., CVPR 2018): ``s (cos_y - m)``. All options are keyword-only."""

    def __init__(self, *, margin=0.35, scale=64.0, backend="auto", **options):
        super().__init__(margin, scale, "additive_cosine", backend, **options)


class BalancedSoftmaxLoss(MarginLoss):
    """Balanced softmax (Ren et al., NeurIPS 2020): cross-entropy of ``logits + log p_j``. ``forward``
    takes logits, or features with ``weight`` (and ``bias``) on the linear head of the paper
    (``default_feature_head``; ``feature_head="cosine"`` and a ``scale`` for a cosine classifier).
    Options after ``class_counts`` are keyword-only."""

    default_feature_head = "linear"

    def __init__(self, class_counts, *, backend="auto", **options):
        _check_options(options, "BalancedSoftmaxLoss", taken=("logit_offset", "cosine_input"))
        super().__init__(
            logit_offset=builders.log_prior(class_counts, dtype=torch.float64),
            cosine_input=False,
            backend=backend,
            **options,
        )


class LogitAdjustedLoss(MarginLoss):
    """Logit-adjusted loss (Menon et al., ICLR 2021): cross-entropy of ``logits + tau log pi_j``, on logits
    or on the linear head of the paper (``default_feature_head``; ``feature_head="cosine"`` and a
    ``scale`` for a cosine classifier). Options after ``class_counts`` are keyword-only."""

    default_feature_head = "linear"

    def __init__(self, class_counts, *, tau=1.0, backend="auto", **options):
        _check_options(options, "LogitAdjustedLoss", taken=("logit_offset", "cosine_input"))
        tau = builders._finite("tau", tau)
        super().__init__(
            logit_offset=builders.log_prior(class_counts, dtype=torch.float64) * tau,
            cosine_input=False,
            backend=backend,
            **options,
        )


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
            raise ValueError(
                f"published weight must have shape (in_features, out_features) = {expected}, "
                f"got {tuple(weight_in_out.shape)}"
            )
        with torch.no_grad():
            self.weight.copy_(weight_in_out.t())

    @classmethod
    def from_published(cls, weight_in_out: torch.Tensor) -> CosineClassifier:
        """A head holding a published (in_features, out_features)-layout weight."""
        head = cls(
            weight_in_out.shape[0], weight_in_out.shape[1], device=weight_in_out.device, dtype=weight_in_out.dtype
        )
        head.load_published_weight(weight_in_out)
        return head

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
