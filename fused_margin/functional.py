"""``margin_cross_entropy`` and its presets: validation, then the chosen backend.

The loss is docs/loss.md's: base scores from a cosine, linear or logits head, optional MARC affine, a target
margin (class table, DBM instance margin on hard positives, ELM's strongest wrong class; angular or
cosine), logit offset, pair perturbation, class weights and label smoothing, with PyTorch's reductions.
"""

from __future__ import annotations

import inspect
import numbers
import warnings
import weakref
from contextlib import nullcontext
from typing import Optional, Union

import torch

from fused_margin.backends import BACKENDS, resolve_backend
from fused_margin.config import CONFIG, configure
from fused_margin.core import builders, options
from fused_margin.core.reference import compute_dtype, margin_cross_entropy_reference
from fused_margin.core.spec import LossTables, MarginAux, MarginLossSpec
from fused_margin.paths.fused import fused_margin_cross_entropy
from fused_margin.paths.lean import BUDGET_BYTES, lean_margin_cross_entropy
from fused_margin.paths.sampled import (
    check_class_indices,
    check_generator,
    check_sample_rate,
    check_sparse_grad,
    gather_rows,
    remap_labels,
    sample_classes,
)

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


def set_sync_label_check(enabled: bool) -> None:
    """Check labels and tables on accelerators with a host sync and a ``ValueError`` naming the bad entry
    (slower; for debugging): ``fm.configure(sync_checks=enabled)`` (:mod:`fused_margin.config`).

    By default labels on CPU tensors are checked that way, and labels on CUDA tensors with an
    asynchronous device assertion (no host sync in the training step, as ``F.cross_entropy``); the
    per-class tables are checked for NaN/inf on CPU only (see :func:`margin_cross_entropy`). With this
    switch on, CUDA labels and tables get the CPU's checks."""
    configure(sync_checks=bool(enabled))


def _check_labels(target, num_classes, ignore_index):
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if torch.compiler.is_compiling():
        # traced into the graph: no host sync, no graph break, and it runs before any kernel reads the
        # labels (on the reference and the memory-lean path)
        torch._assert_async(
            ~bad.any(),
            f"fused_margin: target has a label out of range: labels must be in "
            f"[0, {num_classes}) or equal ignore_index ({ignore_index})",
        )
    elif target.device.type == "cpu" or CONFIG.sync_checks:
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"target[{i}] = {int(target[i])} is out of range: labels must be in "
                f"[0, {num_classes}) or equal ignore_index ({ignore_index})"
            )
    else:
        torch._assert_async(
            ~bad.any(),
            f"fused_margin: target has a label out of range: labels must be in "
            f"[0, {num_classes}) or equal ignore_index ({ignore_index})",
        )


#: tables found finite, with the version counter they had then (a table is read again only once changed
#: in place, e.g. by an optimizer step, or when it is a new tensor)
#: (id -> (weak reference, version); tensors compare elementwise, so they cannot be weak dictionary keys)
_FINITE_TABLES: dict = {}


def _known_finite(value) -> bool:
    entry = _FINITE_TABLES.get(id(value))
    return entry is not None and entry[0]() is value and entry[1] == value._version


def _mark_finite(value) -> None:
    key = id(value)
    _FINITE_TABLES[key] = (weakref.ref(value, lambda _ref, key=key: _FINITE_TABLES.pop(key, None)), value._version)


def _check_finite(name, value):
    """NaN/inf in a table: a ``ValueError`` naming it on CPU tensors (and on any device with
    :func:`set_sync_label_check`), an assertion in the graph under ``torch.compile`` on CPU; CUDA tables
    are not read back on the host per call (the modules and builders check theirs at construction).
    A table is read once per version: the same tensor, unchanged since it was found finite, is not read
    again (so a module's buffers cost nothing per step)."""
    if value.device.type != "cpu" and not CONFIG.sync_checks:
        return
    if torch.compiler.is_compiling():
        if value.device.type == "cpu":
            torch._assert_async(torch.isfinite(value).all(), f"fused_margin: {name} has a NaN or inf entry")
        return
    if _known_finite(value):
        return
    if not bool(torch.isfinite(value.detach()).all()):
        raise finite_error(name, value)
    _mark_finite(value)


def finite_error(name: str, value: torch.Tensor) -> ValueError:
    """The ``ValueError`` for a table ``name`` with a NaN or inf entry, naming the first one."""
    bad = ~torch.isfinite(value.detach())
    i = tuple(int(k) for k in bad.nonzero()[0])
    index = ", ".join(map(str, i))
    return ValueError(f"{name} must be finite, got {name}[{index}] = {float(value.detach()[i])}")


def _validate(input, target, weight, bias, spec: MarginLossSpec, tables: LossTables) -> int:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    device = input.device
    _check_tensor("input", input, device, dims=2)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        raise ValueError(
            f"weight is the C x D classifier weight (2-D, the nn.Linear layout), got a 1-D tensor "
            f"of shape {tuple(weight.shape)}: per-class weights (F.cross_entropy's weight) go in "
            "class_weight="
        )
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
            raise ValueError(
                f"weight must be C x D with D = input.shape[1] = {input.shape[1]}, got shape {tuple(weight.shape)}"
            )
        num_classes = weight.shape[0]
    if num_classes < 2:
        raise ValueError(f"the number of classes C must be at least 2, got {num_classes}")
    if bias is not None:
        if spec.head != "linear":
            raise ValueError(
                f"bias applies only to head='linear', got head={spec.head!r} "
                "(pass head='linear' for an nn.Linear classifier with a bias)"
            )
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
    # the labels' range: apply_loss (the row kernels check it themselves)

    for name in ("class_margins", "logit_offset", "class_weight", "omega", "beta", "class_norms"):
        value = getattr(tables, name)
        if value is not None:
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{name} must be a torch.Tensor of C numbers, got {type(value).__name__} "
                    f"{value!r}"
                    + (
                        " (build per-class weights with fm.class_balanced_weights or fm.marc_weights)"
                        if name == "class_weight"
                        else ""
                    )
                )
            _check_tensor(name, value, device, dims=1)
            if value.shape[0] != num_classes:
                raise ValueError(f"{name} must have C = {num_classes} entries, got {value.shape[0]}")
    if tables.pair_perturbation is not None:
        _check_tensor("pair_perturbation", tables.pair_perturbation, device, dims=2)
        if tuple(tables.pair_perturbation.shape) != (rows, num_classes):
            raise ValueError(
                f"pair_perturbation must be B x C = {rows} x {num_classes}, got {tuple(tables.pair_perturbation.shape)}"
            )
    if tables.beta is not None and spec.head == "logits" and tables.class_norms is None:
        raise ValueError("beta on head='logits' needs class_norms, the classifier's row norms ||W_j||")
    if tables.class_norms is not None and (spec.head != "logits" or tables.beta is None):
        raise ValueError(
            "class_norms is used only with beta on head='logits' "
            "(the cosine and linear heads take the norms from weight)"
        )
    for name, value in zip(LossTables._fields, tables):
        if value is not None:
            _check_finite(name, value)
    return num_classes


@options.takes_options
def margin_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    head: Optional[str] = None,
    class_margins: Optional[torch.Tensor] = None,
    logit_offset: Optional[torch.Tensor] = None,
    pair_perturbation: Optional[torch.Tensor] = None,
    omega: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    class_norms: Optional[torch.Tensor] = None,
    class_weight: Optional[torch.Tensor] = None,
    return_aux: bool = False,
    backend: str = "auto",
    class_chunk: Union[str, int] = "auto",
    double_backward: bool = False,
    sample_rate: float = 1.0,
    sampled_classes=None,
    generator: Optional[torch.Generator] = None,
    sparse_grad: bool = True,
    **loss_options,
):
    r"""Margin softmax cross-entropy (docs/loss.md), one op for DBM, LDAM, ELM, ArcFace, CosFace, balanced
    softmax, logit adjustment, MARC and MetaLAD.

    Args:
        input: B x C scores (``head="logits"``) or B x D features (cosine / linear heads).
        target: B int64 labels in ``[0, C)`` or ``ignore_index``.
        weight: the C x D classifier weight (``nn.Linear`` layout), not per-class loss weights (those are
            ``class_weight``). ``head="cosine"``: ``z_ij = X_i . W_j / (max(||X_i||, eps) max(||W_j||, eps))``;
            ``head="linear"``: ``X_i . W_j + b_j``.
        head: ``None`` applies the package's head rule (:data:`HEAD_RULE`): ``"logits"`` without
            ``weight``; with ``weight``, the preset's default feature head, here ``"cosine"``.
        class_margins: ``m`` (C), the class margins of ``M`` (docs/loss.md section 2).
        logit_offset: ``a`` (C) added after the scale (balanced softmax ``log p``, logit adjustment).
        pair_perturbation: ``P`` (B x C) added to non-target logits (MetaLAD).
        omega, beta: MARC's ``z' = omega_j z + beta_j ||W_j||`` (trainable); ``class_norms`` gives
            ``||W_j||`` for the logits head.
        class_weight: ``w`` (C), as ``F.cross_entropy``'s ``weight``.
        return_aux: also return :class:`MarginAux` ``(lse, pred, hard)``.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpu"``.
        class_chunk: the memory-lean path for large vocabularies (docs/loss.md section 9): ``"auto"``
            takes it on a fused backend with a cosine or linear head when a B x C fp32 matrix would exceed
            :data:`LEAN_THRESHOLD_BYTES` (64 MiB), with the chunk from the same budget; ``"off"`` never;
            an int ``k >= 1`` always, with ``k`` classes per chunk (any backend and head; ``"reference"``
            then runs the chunks in eager torch). The lean path never holds a B x C matrix: extra memory
            about ``6 B k`` fp32 values plus O(B D + C), for a fourth GEMM (the backward recomputes
            each chunk's scores). Same results as the other paths (docs/loss.md section 8).
        double_backward: ``True`` when the loss will be differentiated twice (``create_graph=True``, e.g.
            MetaLAD's virtual step): the fused backends and the lean path give first-order gradients only,
            and which backward is asked for is not known at forward time, so say it here. It runs the
            reference (with ``backend="auto"`` or ``"reference"``; a fused ``backend`` or an int
            ``class_chunk`` is a ``ValueError`` now, before any work). Without it a ``create_graph``
            backward through a fused backend raises, pointing here.
        sample_rate: Partial FC's negative-class sampling (docs/loss.md section 10): below 1, each call keeps
            the batch's positive classes and samples other classes up to ``ceil(sample_rate C)``; the loss is
            the margin loss over the kept classes (labels renumbered, ``aux.pred`` the argmax over them as a
            class index, label smoothing over them), and ``weight`` gets a sparse gradient of its kept rows.
            1 (the default) keeps every class: the exact loss.
        sampled_classes: the kept classes given explicitly (class indices; the batch's positives are added),
            for tests and reproducibility; ``generator``: the ``torch.Generator`` of the sampling.
        sparse_grad: with sampling, ``weight``'s gradient as a sparse tensor of the kept rows (the default;
            SGD with momentum and SparseAdam take it, weight decay and Adam(W) do not) or, with False, dense
            with zeros on the other rows (Partial FC's update, for any optimizer; one C x D tensor).

    The loss's options (keyword-only; fused_margin/core/options.py declares them):

        {options}

    Mixed precision: inside a ``torch.autocast`` region (CPU or CUDA) the cosine and linear heads follow
    ``F.linear``: ``input``, ``weight`` and ``bias`` (floating, not float64) are cast to the autocast
    dtype for the GEMMs, the row math and the tables stay fp32, and each gradient comes back in its
    tensor's own dtype (an fp32 ``weight`` gets an fp32 gradient). The logits head is not cast (no GEMM;
    the row math reads any floating dtype in fp32). Outside autocast, ``weight`` and ``input`` of different
    dtypes are a ``TypeError``.

    Learnable tables: ``logit_offset``, ``pair_perturbation``, ``omega`` and ``beta`` get gradients on
    every backend. ``class_margins``, ``class_weight`` and ``class_norms`` get one from the reference only:
    when one requires grad (and grad mode is on), ``backend="auto"`` runs the reference (a one-time
    ``RuntimeWarning`` names the table), a fused ``backend`` or an int ``class_chunk`` is a ``ValueError``
    naming it, never a silently missing gradient.

    Scalar options take Python, NumPy or 0-d tensor numbers (a tensor that requires grad is refused:
    options get no gradient).

    Checks, and what they cost: shapes, dtypes and devices always (host metadata only). Labels out of
    range: a ``ValueError`` naming the row on CPU, an asynchronous device assertion on CUDA (as
    ``F.cross_entropy``). The fused row kernels check them themselves (no extra op in the step; inside a
    ``torch.compile`` graph too); the reference and the memory-lean path check them before any kernel
    reads them (under ``torch.compile`` as an assertion traced into the graph). NaN/inf in the tables: a
    ``ValueError`` naming the table and entry for CPU tensors (a pass over C values, or B x C for
    ``pair_perturbation``, once per version of a table: an unchanged tensor is not read again), a graph
    assertion for CPU tensors under ``torch.compile``; CUDA tables are not read back per call, since a
    host sync every step costs more than the loss. The modules and the builders check their tables once,
    at construction; :func:`set_sync_label_check` adds the host-synced checks on CUDA for debugging.

    Returns the loss (fp32; fp64 for fp64 input), and the side outputs with ``return_aux``.
    """
    options.check_names(loss_options, "margin_cross_entropy()")
    head = resolve_head(head, weight, "cosine")
    spec = MarginLossSpec(head=head, **loss_options)
    tables = LossTables(class_margins, logit_offset, pair_perturbation, class_weight, omega, beta, class_norms)
    autocast_device = autocast_device_of(input) if head != "logits" else None
    if autocast_device is not None:
        input, weight, bias = autocast_operands(autocast_device, input, weight, bias)
    num_classes = _validate(input, target, weight, bias, spec, tables)
    class_chunk = check_class_chunk(class_chunk)
    backend, class_chunk = route_backend(backend, class_chunk, tables, double_backward)
    kept = None
    check_sparse_grad(sparse_grad)
    if _samples(sample_rate, sampled_classes, generator):
        input, target, weight, bias, tables, kept = _sample(
            input, target, weight, bias, spec, tables, num_classes, sample_rate, sampled_classes, generator, sparse_grad
        )
    context = torch.autocast(autocast_device, enabled=False) if autocast_device is not None else nullcontext()
    with context:  # under autocast: the row math in fp32, the GEMMs in the cast dtype
        out = apply_loss(
            input, target, weight, bias, spec, tables, backend=backend, return_aux=return_aux, class_chunk=class_chunk
        )
    if kept is not None and return_aux:  # the argmax over the kept classes, as a class index
        loss, aux = out
        return loss, aux._replace(pred=kept[aux.pred])
    return out


def _samples(sample_rate, sampled_classes, generator) -> bool:
    """Whether the call samples classes (``sample_rate`` below 1 or ``sampled_classes`` given); the arguments
    checked."""
    rate = check_sample_rate(sample_rate)
    check_generator(generator)
    return rate < 1.0 or sampled_classes is not None


def _sample(
    input, target, weight, bias, spec, tables: LossTables, num_classes, sample_rate, sampled_classes, generator, sparse
):
    """The call over the kept classes (fused_margin.paths.sampled): the positives of the batch and sampled
    negatives, the labels renumbered, the classifier's kept rows (a sparse gradient), the tables' kept entries."""
    if input.shape[0] > 0:
        _check_labels(target, num_classes, spec.ignore_index)
    if sampled_classes is not None:
        sampled_classes = check_class_indices("sampled_classes", sampled_classes, num_classes, target.device)
    kept = sample_classes(
        target,
        0,
        num_classes,
        check_sample_rate(sample_rate),
        ignore_index=spec.ignore_index,
        sampled_classes=sampled_classes,
        generator=generator,
    )
    target = remap_labels(target, kept, 0, spec.ignore_index, outside=kept.numel())
    if spec.head == "logits":
        input = input.index_select(1, kept)
    else:
        weight = gather_rows(weight, kept, sparse)
        bias = None if bias is None else bias.index_select(0, kept)
    tables = LossTables(
        *(
            None if t is None else (t.index_select(1, kept) if name == "pair_perturbation" else t.index_select(0, kept))
            for name, t in zip(LossTables._fields, tables)
        )
    )
    return input, target, weight, bias, tables, kept


def autocast_device_of(input) -> Optional[str]:
    """The device type of ``input`` when a ``torch.autocast`` region for it is active, else ``None``."""
    if not isinstance(input, torch.Tensor):
        return None
    device_type = input.device.type
    try:
        return device_type if torch.is_autocast_enabled(device_type) else None
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
        return None


def autocast_operands(device_type: str, *tensors):
    """``tensors`` as ``F.linear`` sees them under autocast: floating tensors other than float64 cast to
    the region's dtype (differentiably: a gradient comes back in the tensor's own dtype); anything else
    (None, float64, integer, non-tensors, left for the checks) unchanged."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


#: tables whose gradient only the reference computes (see :func:`margin_cross_entropy`, "Learnable tables")
REFERENCE_ONLY_GRADS = ("class_margins", "class_weight", "class_norms")
_warned_learnable = set()


def route_backend(backend, class_chunk, tables: LossTables, double_backward: bool):
    """``(backend, class_chunk)`` for a call that needs the reference's autograd (``double_backward``, or a
    learnable table of :data:`REFERENCE_ONLY_GRADS`): ``("reference", "off")`` from ``"auto"`` or
    ``"reference"``; a ``ValueError`` naming the reason for a fused ``backend`` or an int ``class_chunk``.
    Other calls pass through unchanged."""
    if not isinstance(double_backward, bool):
        raise TypeError(f"double_backward must be a bool, got {type(double_backward).__name__} {double_backward!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    learnable = []
    if torch.is_grad_enabled():
        learnable = [
            name
            for name in REFERENCE_ONLY_GRADS
            if isinstance(getattr(tables, name), torch.Tensor) and getattr(tables, name).requires_grad
        ]
    if not double_backward and not learnable:
        return backend, class_chunk
    if double_backward:
        why = (
            "double_backward=True: the fused backends and the memory-lean path give first-order "
            "gradients only, backend='reference' gives second derivatives"
        )
    else:
        why = (
            f"{', '.join(learnable)} requires grad: the fused backends and the memory-lean path give "
            f"{'it' if len(learnable) == 1 else 'them'} no gradient, backend='reference' computes "
            f"{'its' if len(learnable) == 1 else 'their'} gradient"
        )
    if backend not in ("auto", "reference"):
        raise ValueError(f"{why}; got backend={backend!r}: pass backend='reference' (or 'auto')")
    if class_chunk not in ("auto", "off"):
        raise ValueError(f"{why}; got class_chunk={class_chunk!r}: pass class_chunk='off'")
    if backend == "auto" and learnable and tuple(learnable) not in _warned_learnable:
        _warned_learnable.add(tuple(learnable))
        warnings.warn(f"fused_margin: {why}; backend='auto' runs the reference", RuntimeWarning, stacklevel=3)
    return "reference", "off"


#: every keyword option of :func:`margin_cross_entropy` (what ``**options`` of the presets and modules may
#: name; a typo fails at construction against this set).
OPTION_NAMES = frozenset(
    name
    for name, p in inspect.signature(margin_cross_entropy).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


def check_option_names(options, owner: str, taken=(), extra=()) -> None:
    """Refuse keyword options that :func:`margin_cross_entropy` does not take (typos; ``extra`` names
    ``owner``'s own keywords), or that ``owner`` sets itself (``taken``), naming them and the valid set."""
    unknown = sorted(set(options) - OPTION_NAMES - set(extra))
    if unknown:
        raise TypeError(
            f"{owner} got unknown option(s) {unknown}; valid options are "
            f"{sorted((OPTION_NAMES | set(extra)) - set(taken))}"
        )
    clash = sorted(set(options) & set(taken))
    if clash:
        raise TypeError(f"{owner} sets {clash} itself; pass them through its own arguments")


HEAD_RULE = """\
With ``weight=None`` the input holds scores (``head="logits"``). With ``weight`` and no ``head``, the
loss uses the head of its published form: ``"cosine"`` for :func:`margin_cross_entropy` and the margin
losses (DBM, LDAM, ELM, ArcFace, CosFace: normalised classifiers), ``"linear"`` for balanced softmax and
logit adjustment (an ``nn.Linear`` classifier, bias allowed). ``head=`` (modules: ``feature_head=``)
overrides it."""

#: the head each entry point uses when ``weight`` is given without ``head`` (:data:`HEAD_RULE`).
DEFAULT_FEATURE_HEADS = {
    "margin_cross_entropy": "cosine",
    "dbm_loss": "cosine",
    "ldam_loss": "cosine",
    "elm_loss": "cosine",
    "arcface_loss": "cosine",
    "cosface_loss": "cosine",
    "balanced_softmax_loss": "linear",
    "logit_adjusted_loss": "linear",
}


def resolve_head(head: Optional[str], weight, default_feature_head: str) -> str:
    """The head rule (:data:`HEAD_RULE`), one function for every entry point: an explicit ``head`` wins;
    else ``"logits"`` without ``weight`` and ``default_feature_head`` with it."""
    if head is not None:
        return head
    return "logits" if weight is None else default_feature_head


#: ``class_chunk="auto"`` takes the memory-lean path when a B x C fp32 matrix would exceed this many bytes.
LEAN_THRESHOLD_BYTES = BUDGET_BYTES


def check_class_chunk(class_chunk) -> Union[str, int]:
    """``class_chunk`` checked: ``"auto"``, ``"off"`` or a positive int (NumPy/0-d tensor ints taken)."""
    if isinstance(class_chunk, str):
        if class_chunk in ("auto", "off"):
            return class_chunk
    elif (
        isinstance(class_chunk, torch.Tensor)
        and class_chunk.dim() == 0
        and not class_chunk.is_floating_point()
        and class_chunk.dtype != torch.bool
    ):
        class_chunk = int(class_chunk)
        if class_chunk >= 1:
            return class_chunk
    elif isinstance(class_chunk, numbers.Integral) and not isinstance(class_chunk, bool) and class_chunk >= 1:
        return int(class_chunk)
    raise ValueError(f"class_chunk must be 'auto', 'off' or a positive int (classes per chunk), got {class_chunk!r}")


def uses_lean_path(class_chunk, fused: bool, spec: MarginLossSpec, rows: int, num_classes: int) -> bool:
    """Whether :func:`apply_loss` takes the memory-lean path (see ``class_chunk`` of
    :func:`margin_cross_entropy`) with a fused backend (``fused``) or the reference."""
    if class_chunk == "off":
        return False
    if class_chunk != "auto":
        return True
    return fused and spec.head != "logits" and rows * num_classes * 4 > LEAN_THRESHOLD_BYTES


def apply_loss(
    input,
    target,
    weight,
    bias,
    spec: MarginLossSpec,
    tables: LossTables,
    *,
    backend="auto",
    return_aux=False,
    class_chunk="auto",
):
    """Run validated inputs through the chosen backend (see :func:`margin_cross_entropy`). The labels'
    range is checked here, before any kernel reads them, except on the fused row path, whose kernels
    check it themselves (the contract of :mod:`fused_margin.paths.fused`: no extra op in the step)."""
    entry = resolve_backend(backend, input.device, input.dtype)
    kernel = entry.row_kernel(input.device.type)
    num_classes = _num_classes(input, weight)
    lean = uses_lean_path(class_chunk, entry.fused, spec, input.shape[0], num_classes)
    synced = CONFIG.sync_checks and input.device.type != "cpu"  # the debugging switch's ValueError
    if (lean or kernel is None or synced) and input.shape[0] > 0:
        _check_labels(target, num_classes, spec.ignore_index)
    if lean:
        chunk = None if class_chunk == "auto" else min(class_chunk, num_classes)
        loss, lse, pred, hard = lean_margin_cross_entropy(
            input, target, weight, bias, spec, tables, chunk=chunk, kernel=entry.name
        )
        aux = MarginAux(lse, pred, hard)
    elif kernel is None:
        loss, aux = margin_cross_entropy_reference(input, target, weight, bias, spec, tables)
    else:
        loss, lse, pred, hard = fused_margin_cross_entropy(kernel, input, target, weight, bias, spec, tables)
        aux = MarginAux(lse, pred, hard)
    return (loss, aux) if return_aux else loss


def _num_classes(input, weight):
    return input.shape[1] if weight is None else weight.shape[0]


def _table(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float64 table on ``like``'s device in its compute dtype (float64 for float64 input, else float32):
    fp64 runs see the exact values, the others one rounding to float32."""
    return values.to(device=like.device, dtype=compute_dtype(like.dtype))


def _preset(name, input, target, weight, head, cosine_logits, preset_options, kwargs):
    """Call :func:`margin_cross_entropy` with a preset's options; the caller's keywords override them
    (tables included), and the head follows :data:`HEAD_RULE`."""
    head = resolve_head(head, weight, DEFAULT_FEATURE_HEADS[name])
    options = {"head": head, **preset_options}
    if head == "logits" and cosine_logits:
        options["input_is_cosine"] = True
    options.update(kwargs)
    return margin_cross_entropy(input, target, weight, **options)


def dbm_loss(
    input,
    target,
    weight=None,
    *,
    class_counts,
    variant="ce",
    K=0.1,
    tau=1.0,
    scale=30.0,
    lambda_inst=1.0,
    margin_ref="min",
    hard_mode="hard",
    epoch=0,
    drw_betas=(0.0, 0.9999),
    drw_step=160,
    cb_beta=0.9999,
    head=None,
    **kwargs,
):
    """DBM (difficulty-aware balancing margin, AAAI'25): ArcFace-style angular margin on a cosine
    classifier, ``M_i = m_y (1 + lambda_inst h_i (1 - cos_iy) / 2)`` with ``m_y = K (n_ref / n_y)^tau``.

    ``variant``: ``"ce"``; ``"bs"`` adds the log prior after the scale (balanced softmax); ``"cb"``
    weights classes by class-balanced weights (``cb_beta``); ``"drw"`` uses the DRW schedule at ``epoch``.
    Head: ``weight`` given means features on the cosine head, else the input holds cosines
    (:data:`HEAD_RULE`). Tables are built in float64 and used in the input's compute dtype. Builds its
    tables on every call: in a training loop use :class:`fused_margin.DBMLoss`."""
    tables = dbm_tables(
        class_counts, variant, K, tau, margin_ref, epoch, drw_betas, drw_step, cb_beta, dtype=torch.float64
    )
    tables = {k: _table(v, input) for k, v in tables.items()}
    return _preset(
        "dbm_loss",
        input,
        target,
        weight,
        head,
        True,
        dict(scale=scale, margin_type="additive_angular", lambda_inst=lambda_inst, hard_mode=hard_mode, **tables),
        kwargs,
    )


def dbm_tables(
    class_counts,
    variant,
    K,
    tau,
    margin_ref,
    epoch=0,
    drw_betas=(0.0, 0.9999),
    drw_step=160,
    cb_beta=0.9999,
    dtype=torch.float32,
):
    """The tables of a DBM variant (see :func:`dbm_loss`), computed in float64 and cast to ``dtype``.
    ``drw_betas`` and ``drw_step`` are checked whatever ``epoch`` (so a bad schedule fails now)."""
    tables = {"class_margins": builders.dbm_class_margins(class_counts, K, tau, margin_ref, dtype=dtype)}
    if variant == "bs":
        tables["logit_offset"] = builders.log_prior(class_counts, dtype=dtype)
    elif variant == "cb":
        tables["class_weight"] = builders.class_balanced_weights(class_counts, cb_beta, dtype=dtype)
    elif variant == "drw":
        tables["class_weight"] = builders.drw_weights(class_counts, epoch, drw_betas, drw_step, dtype=dtype)
    elif variant != "ce":
        raise ValueError(f"variant must be 'ce', 'bs', 'cb' or 'drw', got {variant!r}")
    return tables


def ldam_loss(input, target, weight=None, *, class_counts, max_m=0.5, scale=30.0, head=None, **kwargs):
    """LDAM (Cao et al. 2019): ``s (cos_y - m_y)`` with ``m_y`` proportional to ``n_y^-1/4``, largest
    ``max_m``. Pass ``class_weight`` for LDAM-DRW. Head: ``weight`` given means features on the cosine
    head (``head="linear"`` for an unnormalised one), else the input holds cosines (:data:`HEAD_RULE`)."""
    margins = _table(builders.ldam_margins(class_counts, max_m, dtype=torch.float64), input)
    return _preset(
        "ldam_loss",
        input,
        target,
        weight,
        head,
        True,
        dict(scale=scale, class_margins=margins, margin_type="additive_cosine"),
        kwargs,
    )


def elm_loss(input, target, weight=None, *, class_counts, max_m=0.5, lambda_elm=1.0, scale=30.0, head=None, **kwargs):
    """ELM (Kato & Hotta, eq. 7): LDAM's margins with the strongest wrong class's margin added back,
    target ``s (cos_y - m_y + lambda_elm m_{c*})``. Head: ``weight`` given means the cosine head, else the
    input holds cosines (:data:`HEAD_RULE`)."""
    margins = _table(builders.ldam_margins(class_counts, max_m, dtype=torch.float64), input)
    return _preset(
        "elm_loss",
        input,
        target,
        weight,
        head,
        True,
        dict(scale=scale, class_margins=margins, margin_type="additive_cosine", lambda_elm=lambda_elm),
        kwargs,
    )


def _constant_margins(input, weight, margin):
    margin = builders._finite("margin", margin)
    return torch.full((_num_classes(input, weight),), margin, device=input.device, dtype=compute_dtype(input.dtype))


def arcface_loss(input, target, weight=None, *, margin=0.5, scale=64.0, head=None, **kwargs):
    """ArcFace (Deng et al. 2019): ``s cos(theta_y + m)``; ``angular_fold="threshold"`` for its guard.
    Head: ``weight`` given means the cosine head, else the input holds cosines (:data:`HEAD_RULE`)."""
    margins = _constant_margins(input, weight, margin)
    return _preset(
        "arcface_loss",
        input,
        target,
        weight,
        head,
        True,
        dict(scale=scale, class_margins=margins, margin_type="additive_angular"),
        kwargs,
    )


def cosface_loss(input, target, weight=None, *, margin=0.35, scale=64.0, head=None, **kwargs):
    """CosFace (Wang et al. 2018): ``s (cos_y - m)``. Head: ``weight`` given means the cosine head, else
    the input holds cosines (:data:`HEAD_RULE`)."""
    margins = _constant_margins(input, weight, margin)
    return _preset(
        "cosface_loss",
        input,
        target,
        weight,
        head,
        True,
        dict(scale=scale, class_margins=margins, margin_type="additive_cosine"),
        kwargs,
    )


def balanced_softmax_loss(input, target, weight=None, *, class_counts, head=None, **kwargs):
    """Balanced softmax (Ren et al. 2020): cross-entropy of ``logits + log p_j`` (``p_j = n_j / sum n``).
    Head: ``weight`` given means the linear head ``X W^T + b`` of the paper (``head="cosine"`` with a
    ``scale`` for a cosine classifier), else the input holds logits (:data:`HEAD_RULE`)."""
    offset = _table(builders.log_prior(class_counts, dtype=torch.float64), input)
    return _preset("balanced_softmax_loss", input, target, weight, head, False, dict(logit_offset=offset), kwargs)


def logit_adjusted_loss(input, target, weight=None, *, class_counts, tau=1.0, head=None, **kwargs):
    """Logit-adjusted loss (Menon et al. 2021): cross-entropy of ``logits + tau log pi_j``. Head: ``weight``
    given means the linear head of the paper (``head="cosine"`` with a ``scale`` for a cosine
    classifier), else the input holds logits (:data:`HEAD_RULE`)."""
    tau = builders._finite("tau", tau)
    offset = _table(builders.log_prior(class_counts, dtype=torch.float64) * tau, input)
    return _preset("logit_adjusted_loss", input, target, weight, head, False, dict(logit_offset=offset), kwargs)
