"""The autograd plumbing shared by every fused backend (Triton, C++ CPU, CUDA).

A fused backend supplies one *row kernel* (:class:`RowKernel`): two ops over the B x C matrix ``raw``
of the GEMM (or the logits themselves). Everything around it, the GEMMs on raw inputs, the inverse norms
and the normalisation Jacobian folded into row/column scalings (docs/loss.md section 5, docs/design.md), lives
here once.

Row kernel contract (``z'_ij = raw_ij * row_scale_i * col_scale_j + col_shift_j`` in fp32, a missing
scale is 1 and a missing shift 0; ``raw`` is row-major, its class stride possibly padded, see
:func:`class_padded_mm`):

The ops take the loss's tables as one list, ``tables``, in the order of
:data:`~fused_margin.core.spec.ROW_TABLES` (``row_scale, col_scale, col_shift, class_margins, logit_offset,
pair_perturbation, class_weight``; ``None`` where absent), and its options as two vectors, ``floats`` and
``ints`` (:mod:`fused_margin.core.options`: ``scale, lambda_inst, lambda_elm, label_smoothing`` and
``margin_type, hard_all, fold, straight_through, ignore_index, reduction`` as their codes), so an option or
table added to the loss changes no op's schema.

``forward(raw, target, tables, floats, ints) -> (loss, lse, pred, hard, nll, target_grad, denom)``

    per row: the loss of docs/loss.md section 4 before the reduction (``w_y``-weighted, smoothed; 0 on
    ignored rows), ``lse``, ``pred = argmax z'`` (int64), ``hard`` (bool), ``nll = lse - t`` for the
    final target logit ``t = s psi(z'_y, M) + a_y``, and ``target_grad = dt / dz'_y``. ``nll`` is formed
    relative to the non-target logits' maximum ``M`` with ``S = sum_{j != y} exp(l_j - M)`` (docs/loss.md
    section 8, confident rows): ``log1p(S exp(M - t))`` where ``t >= M``, ``(M - t) + log(S + exp(t - M))``
    where ``t < M``, and ``lse - t`` where ``t`` or ``M`` is not finite (as ``F.cross_entropy``). The loss
    row is ``(1 - eps) w_y nll + eps / C (sum_{j != y} w_j (lse - l_j) + w_y nll)``. Ignored rows: loss 0,
    ``nll`` 0, ``target_grad`` 0, ``lse`` of ``s z' + a + P``. ``denom`` (0-d) is the mean's denominator,
    ``sum`` of ``w_y`` over the kept rows (their count without class weights); ``loss`` is the rows'
    values for ``reduction`` 0 (``"none"``, :data:`~fused_margin.core.spec.REDUCTION_CODES`), their sum over
    ``denom`` for 1 (``"mean"``; NaN where ``denom`` is 0, as ``F.cross_entropy``'s 0 / 0), their sum for
    2 (``"sum"``). Labels out of range raise (a ``ValueError`` naming the row on CPU, a device assertion
    on CUDA), so the caller need not check them.

``backward(raw, target, tables, lse, nll, target_grad, grad_rows, denom, floats, ints, scale_grad, row_proj,
col_proj, col_stats) -> (grad, row_coef, col_coef, stats)``

    ``G = dL/dz'`` from the saved row statistics and the upstream gradient ``g_i`` (``grad_rows``, one
    value a row or a 0-d one for every row, divided by ``denom`` when given: NaN where it is 0): off the
    target, with ``p_ij = exp(l_ij - lse_i)``, ``dl_ij = g_i ((1 - eps) w_y p_ij + eps / C (W p_ij - w_j))``
    and ``G_ij = s dl_ij``; on the target, ``dl_iy = g_i ((1 - eps) w_y expm1(-nll_i) + eps / C ((W - w_y) +
    W expm1(-nll_i)))`` (``p_y - 1`` as ``expm1(-nll)``, precise on confident rows) and ``G_iy =
    target_grad_i dl_iy``; zero on ignored rows (``W = sum_j w_j``, ``C`` without class weights). ``grad``
    is ``G_ij row_scale_i col_scale_j`` (= dL/draw) in ``raw``'s dtype with ``scale_grad``, else ``G`` in
    fp32. The sums, in fp32 from the fp32 ``G`` (empty tensors when not asked for), let the caller finish
    the gradients without another pass over a B x C or C x D tensor (docs/loss.md section 5):
    ``row_coef_i = -row_proj_i sum_j G_ij row_scale_i col_scale_j raw_ij`` (with ``row_proj = 1 /
    ||x||^2``: ``dX = dL/draw W + row_coef X`` is the cosine head's normalisation Jacobian),
    ``col_coef_j = -col_proj_j sum_i G_ij row_scale_i col_scale_j raw_ij`` (the same for ``W``), and with
    ``col_stats`` the C-vectors of :data:`~fused_margin.core.spec.COLUMN_STATS` (3 x C): ``sum_i G_ij`` (bias,
    MARC's ``beta``), ``sum_i G_ij row_scale_i raw_ij`` (MARC's ``omega``) and ``sum_i dL/dl_ij`` (the logit
    offset). Each sum is formed in a fixed order (per-block partials, no float atomics): deterministic.

``forward_backward(raw, target, tables, floats, ints, row_proj, col_proj) -> (loss, lse, pred, hard, nll,
target_grad, denom, row_coef, col_coef)`` (optional; the C++ CPU and Triton kernels have it)

    the forward and, on each row right after it (the row still in cache), the backward for the upstream
    gradient 1 of the reduced loss (``reduction`` mean or sum): ``dL/draw`` (``scale_grad``) overwrites
    ``raw`` in place (no second B x C buffer, no second pass over ``raw``; the C++ kernel reuses the
    logsumexp's exponentials, so the gradient agrees with ``backward``'s to the rounding of ``p``; the
    Triton kernel rereads the row from cache and forms ``backward``'s own expression) and
    ``row_coef``/``col_coef`` are the backward's sums (empty without ``row_proj``/``col_proj``; a kernel
    with ``project_out``, which is then given neither, may refuse them, as Triton's does).
    :func:`fused_margin_cross_entropy` takes it for a training step (grad enabled, features or weights
    requiring grad, no other input requiring grad, not under ``torch.compile`` or a ``torch.func``
    transform; the ``grad_in_forward`` switch of :mod:`fused_margin.config`) and multiplies by the actual
    upstream gradient in the backward when it is not 1.

``norms(x, eps) -> (norm, inv, proj)``

    per row of ``x``, in fp32: ``||x_i||``, ``1 / max(||x_i||, eps)`` and ``1 / ||x_i||^2`` where
    ``||x_i|| >= eps``, else 0 (the cosine head's ``row_scale``/``col_scale`` and ``row_proj``/``col_proj``).

All backends share one floating-point rule: no contraction of ``a * b + c`` into fused multiply-adds in
the kernels' own arithmetic (``-ffp-contract=off`` for the C++ kernels, ``--fmad=false`` for nvcc,
``enable_fp_fusion=False`` on every Triton launch), so ``z'`` and the logits round as eager torch's
separate ops; library functions (``exp``, ``log``, ``cos``) keep their own internal FMAs.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from fused_margin.config import CONFIG
from fused_margin.core.reference import compute_dtype
from fused_margin.core.spec import (
    COLUMN_STATS,
    NORM_EPS,
    REDUCTION_CODES,
    ROW_FORWARD_OUTPUTS,
    LossTables,
    MarginLossSpec,
    row_backward_args,
    row_forward_args,
    row_forward_backward_args,
    row_tables,
)


def project_rows_(grad: torch.Tensor, v: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``grad += coef[:, None] v`` in place, in ``coef``'s dtype (fp32) with one rounding to ``grad``'s: the
    cosine head's projection on a GEMM output (docs/loss.md section 5), from coefficients the row kernel
    summed. One ``addcmul_``; a backend with ``RowKernel.project_out`` (C++ CPU, CUDA, Triton) forms the
    coefficient from the GEMM output instead, in its own op."""
    return grad.addcmul_(v, coef[:, None])


class RowKernel(NamedTuple):
    """A backend's row ops (see the module docstring for the contract), its projection
    (:func:`project_rows_` unless the backend has a faster one) and, optionally, its forward that also forms
    the gradient (``forward_backward``)."""

    name: str
    forward: Callable
    backward: Callable
    norms: Callable
    project: Callable = project_rows_
    forward_backward: Optional[Callable] = None
    #: ``project_out(grad, v, proj, scale)``: ``grad_i = scale (grad_i - proj_i (grad_i . v_i) v_i)`` in place,
    #: the coefficient formed from the GEMM output itself in fp32, one rounding; ``scale`` a 0-d tensor (an
    #: upstream gradient applied in the same pass) or None (optional; then the row kernels form no row/column
    #: sums for the projections, see :meth:`_FusedMarginCE._backward`)
    project_out: Optional[Callable] = None


#: the class stride of the B x C buffers of the fused path is padded to a multiple of this many elements
#: (csrc/ops_common.h kClassAlign): every row then starts 32-byte aligned (bf16) and the Triton launches
#: see a row stride divisible by 16, so their loads and stores of raw and dL/draw vectorise (16-byte
#: ``ld.global.v4``) whatever C is; C = 8142 would otherwise give scalar ones
CLASS_ALIGN = 16


def padded_classes(cols: int) -> int:
    """``cols`` rounded up to a multiple of :data:`CLASS_ALIGN`: the row stride of the padded B x C buffers."""
    return cols + (-cols) % CLASS_ALIGN


def inverse_norms(norm: torch.Tensor, eps: float = NORM_EPS):
    """``(1 / max(norm, eps), 1 / norm^2 where norm >= eps else 0)``: the scaling and the projection factor
    of the normalisation (the last two outputs of the contract's ``norms``), in ``norm``'s dtype."""
    inv = 1.0 / norm.clamp_min(eps)
    return inv, torch.where(norm >= eps, inv * inv, torch.zeros_like(inv))


def class_padded_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` (B x C) written by the GEMM into a buffer whose row stride is C rounded up to
    :data:`CLASS_ALIGN` (a view of it; no copy). Under ``torch.compile`` the plain product (the compiler
    picks its own layouts)."""
    cols = b.shape[0]
    if cols % CLASS_ALIGN == 0 or torch.compiler.is_compiling():
        return a @ b.t()
    buffer = a.new_empty((a.shape[0], padded_classes(cols)))
    return torch.mm(a, b.t(), out=buffer[:, :cols])


def grad_row_stride(raw: torch.Tensor) -> int:
    """The row stride of the row backward's gradient for ``raw``: padded to :data:`CLASS_ALIGN` when raw's
    own rows are padded (the fused path's GEMM output), else C (contiguous, e.g. the logits head's input)."""
    cols = raw.shape[1]
    return cols if raw.stride(0) == cols else padded_classes(cols)


def empty_forward_outputs(raw: torch.Tensor, reduction: int):
    """Uninitialised outputs of a row forward (:data:`~fused_margin.core.spec.ROW_FORWARD_OUTPUTS`) for ``raw``
    (B x C): one value a row, fp32 but ``pred`` (int64) and ``hard`` (bool); ``loss`` 0-d but for
    ``reduction`` 0 (``"none"``), ``denom`` 0-d. The fake kernels return these."""
    rows = raw.shape[0]
    dtypes = dict(pred=torch.int64, hard=torch.bool)
    shapes = dict(loss=(rows,) if reduction == REDUCTION_CODES["none"] else (), denom=())
    return tuple(
        raw.new_empty(shapes.get(name, (rows,)), dtype=dtypes.get(name, torch.float32)) for name in ROW_FORWARD_OUTPUTS
    )


def empty_projection_sums(raw: torch.Tensor, row_proj, col_proj):
    """Uninitialised ``(row_coef, col_coef)`` of a forward that forms the gradient (the last two outputs of
    :data:`~fused_margin.core.spec.ROW_FORWARD_BACKWARD_OUTPUTS`): fp32, B (or 0 without ``row_proj``) and C (or 0
    without ``col_proj``) values."""
    rows, cols = raw.shape
    return (
        raw.new_empty((rows if row_proj is not None else 0,), dtype=torch.float32),
        raw.new_empty((cols if col_proj is not None else 0,), dtype=torch.float32),
    )


def empty_backward_outputs(raw: torch.Tensor, scale_grad: bool, row_proj, col_proj, col_stats: bool):
    """Uninitialised outputs of a row backward (:data:`~fused_margin.core.spec.ROW_BACKWARD_OUTPUTS`): ``grad``
    (``raw``'s shape; its dtype with ``scale_grad``, else fp32), ``row_coef`` (B, or 0 without
    ``row_proj``), ``col_coef`` (C, or 0 without ``col_proj``), ``stats`` (3 x C with ``col_stats``, else
    0 values), all fp32 but ``grad``, which has the row stride of :func:`grad_row_stride`."""
    rows, cols = raw.shape
    grad = raw.new_empty((rows, grad_row_stride(raw)), dtype=raw.dtype if scale_grad else torch.float32)
    return (
        (grad[:, :cols],)
        + empty_projection_sums(raw, row_proj, col_proj)
        + (raw.new_empty((len(COLUMN_STATS), cols) if col_stats else (0,), dtype=torch.float32),)
    )


def scaled_scores(raw, row_scale, col_scale, col_shift):
    """``z'_ij = raw_ij row_scale_i col_scale_j + col_shift_j`` in the compute dtype (fp32; fp64 for fp64
    ``raw``); a missing scale is 1 and a missing shift 0. The row-kernel form of ``reference.base_scores``
    (``z'`` from the inputs, docs/loss.md section 1); the Triton kernels load it with
    ``load_scaled_scores``."""
    z = raw.to(compute_dtype(raw.dtype))
    if row_scale is not None:
        z = z * row_scale[:, None]
    if col_scale is not None:
        z = z * col_scale[None, :]
    if col_shift is not None:
        z = z + col_shift[None, :]
    return z


def _pow2_scale(norms: torch.Tensor) -> torch.Tensor:
    """``2^-round(log2 ||v||)`` per row (1 where ``||v|| < eps``, or not finite): multiplying a row by it is
    exact in any binary floating type and brings its norm into ``[0.7, 1.5)``."""
    ok = torch.isfinite(norms) & (norms >= NORM_EPS)
    exponent = torch.round(torch.log2(torch.where(ok, norms, torch.ones_like(norms))))
    return torch.exp2(-exponent)


def _cosine_operands(kernel: RowKernel, input, weight):
    """The GEMM operands of the cosine head with their scalings (the ``norms`` op of ``kernel``, one call
    each): ``(x, w, x_norm, w_norm, row_scale, col_scale, row_proj, col_proj, x_pow, w_pow)``, where
    ``row_scale``/``col_scale`` turn the GEMM output into cosines and ``row_proj``/``col_proj`` are the
    projection factors ``1 / ||v||^2`` (0 below eps) of the operands as passed to the GEMM.

    In fp16 (range 65504) ``x @ w.T`` overflows for ``||x|| ||w|| > 65504`` and ``dL/draw =
    G / (||x|| ||w||)`` under- or overflows for extreme norms, so there both operands are rescaled by
    powers of two (``x_pow``, ``w_pow``: exact, the cosines unchanged) to unit-order norms: the GEMMs and
    ``dL/draw`` stay near the cosines' own range. The copies are in the input dtype (B x D and C x D
    fp16, no fp32 C x D copy); bf16 and fp32 (fp32's range) use the tensors themselves (pows None)."""
    x_norm, row_scale, row_proj = kernel.norms(input, NORM_EPS)
    w_norm, col_scale, col_proj = kernel.norms(weight, NORM_EPS)
    if input.dtype != torch.float16 and weight.dtype != torch.float16:
        return input, weight, x_norm, w_norm, row_scale, col_scale, row_proj, col_proj, None, None
    x_pow, w_pow = _pow2_scale(x_norm), _pow2_scale(w_norm)
    # raw carries x_pow_i w_pow_j: undone in the (exact) scalings; the operands' norms carry them too
    return (
        input * x_pow.to(input.dtype)[:, None],
        weight * w_pow.to(weight.dtype)[:, None],
        x_norm,
        w_norm,
        row_scale / x_pow,
        col_scale / w_pow,
        row_proj / (x_pow * x_pow),
        col_proj / (w_pow * w_pow),
        x_pow,
        w_pow,
    )


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
        return False


def _first_order_error(kernel_name: str) -> str:
    return (
        f"the fused {kernel_name!r} backend gives first-order gradients only; for create_graph=True "
        "(double backward, meta-learning) pass double_backward=True to the loss (margin_cross_entropy, the "
        "presets and the modules), which runs backend='reference'; nested torch.func.grad also needs "
        "backend='reference'"
    )


def first_order_backward(
    backward: Callable[[], tuple], grad_output: torch.Tensor, message: str, saved: Sequence[Optional[torch.Tensor]] = ()
) -> tuple:
    """``backward()``, the gradients of a backward that gives first-order gradients only, with the refusals
    every such ``autograd.Function`` makes (the fused row path, the memory-lean path, the class shards):

    * a backward over a batch of cotangents (``torch.func.jacrev``/``jacfwd``, ``vmap`` of a ``vjp``): a
      ``RuntimeError`` naming ``backend='reference'`` (the kernels have no batching rules);
    * under nested ``torch.func`` transforms (``grad`` of ``grad``): ``RuntimeError(message)``;
    * a backward that builds a graph (``create_graph=True``; ``torch.func.grad`` and the function of
      ``torch.func.vjp`` always ask for one): the first-order gradients, which raise ``message`` when
      differentiated again (torch's ``once_differentiable`` rule), so a second derivative is never
      silently wrong. ``saved``: the function's saved tensors; those that require grad link the error into
      the graph, so that differentiating the gradients with respect to them reaches it."""
    if torch._C._functorch.is_batchedtensor(grad_output):
        raise RuntimeError(
            "fused_margin's fused backends, memory-lean path and class shards give one gradient "
            "at a time: torch.func.jacrev, jacfwd and vmap over their backward need "
            "backend='reference' (with class_chunk='off')"
        )
    if not torch.is_grad_enabled():
        return backward()
    if torch._C._functorch.get_dynamic_layer_stack_depth() > 1:  # nested transforms
        raise RuntimeError(message)
    with torch.no_grad():
        grads = backward()
    present = [g for g in grads if g is not None]
    # outside transforms, the error node also takes the saved tensors that require grad (the inputs), so it
    # sits between the gradients and them; under one torch.func.grad the gradients are wrapped at its level
    anchors = (
        [t for t in saved if isinstance(t, torch.Tensor) and t.requires_grad]
        if torch._C._functorch.get_dynamic_layer_stack_depth() == 0
        else []
    )
    if present:
        wrapped = torch._C._functions.DelayedError(message.encode(), len(present) + len(anchors))(*present, *anchors)
        wrapped = iter((wrapped,) if isinstance(wrapped, torch.Tensor) else wrapped)
        grads = tuple(None if g is None else next(wrapped) for g in grads)
    return grads


class _Residuals(NamedTuple):
    """What ``_FusedMarginCE.forward`` computes for ``backward`` (returned after ``(loss, lse, pred, hard)``
    and dropped by the caller). ``None`` where absent, or where it would repeat an input or another
    output (``setup_context`` restores those; ``torch.compile`` refuses an output returned twice)."""

    raw: Optional[torch.Tensor]  # the GEMM output (None on the logits head: the input itself)
    row_scale: Optional[torch.Tensor]  # 1 / max(||x_i||, eps) (over x_pow_i on the fp16 cosine head)
    col_scale: Optional[torch.Tensor]  # the head's column scale times omega
    col_shift: Optional[torch.Tensor]  # (bias times omega) + beta ||W|| (None when it is base_shift)
    base_col_scale: Optional[torch.Tensor]  # the head's column scale alone (None when it is col_scale)
    base_shift: Optional[torch.Tensor]  # the bias in the compute dtype
    row_proj: Optional[torch.Tensor]  # 1 / ||x_op||^2 (0 below eps): the cosine head's projections
    col_proj: Optional[torch.Tensor]
    w_norm: Optional[torch.Tensor]  # ||W_j|| (MARC's beta)
    x_pow: Optional[torch.Tensor]  # the fp16 cosine head's power-of-two rescaling (_cosine_operands)
    w_pow: Optional[torch.Tensor]
    row_coef: Optional[torch.Tensor]  # the backward's sums formed in the forward (grad_in_forward), else None
    col_coef: Optional[torch.Tensor]
    nll: torch.Tensor
    target_grad: torch.Tensor
    denom: Optional[torch.Tensor]  # the mean's denominator


#: the outputs of ``_FusedMarginCE.forward``, in order
_OUTPUTS = ("loss", "lse", "pred", "hard") + _Residuals._fields
#: the inputs ``backward`` reads (saved by name; see :class:`_Saved`)
_SAVED_INPUTS = (
    "input",
    "target",
    "weight",
    "logit_offset",
    "pair_perturbation",
    "class_weight",
    "omega",
    "beta",
    "class_norms",
)


class _Saved(
    NamedTuple("_SavedBase", [(name, Optional[torch.Tensor]) for name in _SAVED_INPUTS + ("lse",) + _Residuals._fields])
):
    """``ctx.saved_tensors`` by name: the inputs of :data:`_SAVED_INPUTS`, ``lse`` and the residuals."""


class _FusedMarginCE(torch.autograd.Function):
    """``forward`` + ``setup_context`` (what ``torch.func.grad`` needs); ``forward`` returns, after
    ``(loss, lse, pred, hard)``, the :class:`_Residuals` that ``backward`` needs, which the caller drops.

    Inputs, outputs, saved tensors and gradients are handled by name (:data:`INPUT_NAMES`, derived once
    from ``forward``'s signature; :data:`_OUTPUTS`; :class:`_Saved`), so adding an argument shifts no
    index."""

    @staticmethod
    def forward(
        kernel: RowKernel,
        spec: MarginLossSpec,
        input,
        target,
        weight,
        bias,
        class_margins,
        logit_offset,
        pair_perturbation,
        class_weight,
        omega,
        beta,
        class_norms,
        grad_in_forward,
    ):
        head = spec.head
        acc = compute_dtype(input.dtype)
        w_norm = x_pow = w_pow = row_proj = col_proj = None
        if head == "cosine":
            (x_op, w_op, _, w_norm, row_scale, col_scale, row_proj, col_proj, x_pow, w_pow) = _cosine_operands(
                kernel, input, weight
            )
            raw = class_padded_mm(x_op, w_op)
            base_col_scale = col_scale
        else:
            raw = class_padded_mm(input, weight) if head == "linear" else input
            if beta is not None and head == "linear":
                w_norm = kernel.norms(weight, NORM_EPS)[0]
            row_scale = col_scale = base_col_scale = None
        # copies (C-sized) where .to would return an input itself: outputs must not alias inputs
        base_shift = bias.to(acc, copy=True) if bias is not None else None
        col_shift = base_shift
        if omega is not None:
            omega32 = omega.to(acc, copy=True)
            col_scale = omega32 if col_scale is None else col_scale * omega32
            if col_shift is not None:
                col_shift = col_shift * omega32
        if beta is not None:
            norms = w_norm if weight is not None else class_norms.to(acc)
            beta_shift = beta.to(acc) * norms
            col_shift = beta_shift if col_shift is None else col_shift + beta_shift

        # the loss comes reduced (mean / sum) from the kernel, with the mean's denominator
        floats, ints = spec.kernel_options()
        args = dict(
            raw=raw,
            target=target,
            floats=floats,
            ints=ints,
            tables=row_tables(
                row_scale=row_scale,
                col_scale=col_scale,
                col_shift=col_shift,
                class_margins=class_margins,
                logit_offset=logit_offset,
                pair_perturbation=pair_perturbation,
                class_weight=class_weight,
            ),
        )
        row_coef = col_coef = None
        if grad_in_forward:  # raw becomes dL/draw (upstream gradient 1), with the backward's sums
            sums = kernel.project_out is None  # else the projections form their coefficients themselves
            loss, lse, pred, hard, nll, target_grad, denom, row_coef, col_coef = kernel.forward_backward(
                *row_forward_backward_args(
                    **args, row_proj=row_proj if sums else None, col_proj=col_proj if sums else None
                )
            )
        else:
            loss, lse, pred, hard, nll, target_grad, denom = kernel.forward(*row_forward_args(**args))
        residuals = _Residuals(
            raw=None if head == "logits" else raw,
            row_scale=row_scale,
            col_scale=col_scale,
            col_shift=None if col_shift is base_shift else col_shift,
            base_col_scale=None if base_col_scale is col_scale else base_col_scale,
            base_shift=base_shift,
            row_proj=row_proj,
            col_proj=col_proj,
            w_norm=w_norm,
            x_pow=x_pow,
            w_pow=w_pow,
            row_coef=row_coef,
            col_coef=col_coef,
            nll=nll,
            target_grad=target_grad,
            denom=denom if spec.reduction == "mean" else None,
        )
        return (loss, lse, pred, hard) + tuple(residuals)

    @staticmethod
    def setup_context(ctx, inputs, output):
        args = dict(zip(INPUT_NAMES, inputs))
        out = dict(zip(_OUTPUTS, output))
        ctx.kernel, ctx.spec = args["kernel"], args["spec"]
        ctx.grad_in_forward = bool(args["grad_in_forward"])  # the saved raw is dL/draw (upstream gradient 1)
        ctx.dtypes = {name: value.dtype for name, value in args.items() if isinstance(value, torch.Tensor)}
        ctx.device_type = args["input"].device.type
        ctx.raw_is_input = out["raw"] is None
        ctx.col_shift_is_base = out["col_shift"] is None and out["base_shift"] is not None
        ctx.base_col_scale_is_col = out["base_col_scale"] is None and ctx.spec.head == "cosine"
        ctx.save_for_backward(
            *(args[name] for name in _SAVED_INPUTS), out["lse"], *(out[name] for name in _Residuals._fields)
        )
        ctx.set_materialize_grads(False)  # no zero tensors for the outputs that get no gradient
        ctx.mark_non_differentiable(*[out[name] for name in _OUTPUTS[1:] if isinstance(out[name], torch.Tensor)])

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError(
            f"the fused {args[0].name!r} backend does not support torch.func.vmap (its row "
            "kernels have no batching rule); use backend='reference' under vmap, or loop"
        )

    @staticmethod
    def backward(ctx, grad_loss, *_grad_outputs):
        if grad_loss is None:  # only the non-differentiable outputs were used
            return (None,) * len(INPUT_NAMES)
        if _autocast_enabled(ctx.device_type):
            # a backward run inside an autocast region: as the forward, with autocast off (the GEMMs take
            # the saved operands' dtype, the row math and the projection stay fp32)
            with torch.autocast(ctx.device_type, enabled=False):
                return _FusedMarginCE._first_order_backward(ctx, grad_loss)
        return _FusedMarginCE._first_order_backward(ctx, grad_loss)

    @staticmethod
    def _first_order_backward(ctx, grad_loss):
        return first_order_backward(
            lambda: _FusedMarginCE._backward(ctx, grad_loss),
            grad_loss,
            _first_order_error(ctx.kernel.name),
            ctx.saved_tensors,
        )

    @staticmethod
    def _backward(ctx, grad_loss):
        """The gradients from one row-kernel backward (``dL/draw`` and the sums of the contract), the two
        GEMMs and C- or B-sized finishing ops; the projections of the cosine head are one in-place op each
        on the GEMM outputs (docs/loss.md section 5). Only the pair perturbation's gradient, itself B x C, is
        formed in eager torch from ``G``. Three steps: :func:`_draw` (``dL/draw``), :func:`_head_grads` (the
        features, the classifier, the bias) and :func:`_table_grads` (offset, MARC's omega and beta)."""
        saved = _Saved(*ctx.saved_tensors)
        need = dict(zip(INPUT_NAMES, ctx.needs_input_grad))
        grad_raw, grad_pair, row_coef, col_coef, stats, upstream = _draw(ctx, saved, grad_loss, need)
        grads = {"pair_perturbation": grad_pair} if grad_pair is not None else {}
        grads.update(_head_grads(ctx, saved, need, grad_raw, row_coef, col_coef, stats, upstream))
        grads.update(_table_grads(ctx, saved, need, stats))
        return tuple(grads.get(name) for name in INPUT_NAMES)


def _draw(ctx, saved: _Saved, grad_loss, need):
    """``(dL/draw, dL/dP, row_coef, col_coef, stats, upstream)``: the row kernel's part of the backward.
    ``dL/draw`` came with the forward (``grad_in_forward``) or comes from the row backward; ``dL/dP`` (the
    pair perturbation's gradient, ``dL/dl`` off the target) only where it is asked for; ``upstream`` is an
    upstream gradient the projections still have to apply (``project_out``'s scale), else None."""
    spec, kernel = ctx.spec, ctx.kernel
    input, target = saved.input, saved.target
    raw = input if ctx.raw_is_input else saved.raw
    cosine = spec.head == "cosine"
    # the projections' coefficients: from the GEMM outputs themselves (kernel.project_out: the radial part then
    # cancels to the final rounding, whatever the rounding of dL/draw and of the GEMMs), else from the row
    # kernel's sums of dL/draw raw
    out_proj = kernel.project_out is not None
    upstream = None
    if ctx.grad_in_forward:
        # dL/draw and its sums came with the forward, for an upstream gradient of 1 (no other input needs a
        # gradient there: grad_in_forward); scaled when the actual one may not be 1 (on a GPU, always: reading
        # it would sync). On the cosine head with project_out, every gradient (dX, dW) goes through a
        # projection, which is linear in dL/draw: it applies the factor in its pass over its GEMM output, and
        # dL/draw (B x C) needs no pass of its own
        grad, row_coef, col_coef = raw, saved.row_coef, saved.col_coef
        if grad_loss.device.type != "cpu" or float(grad_loss) != 1.0:
            if cosine and out_proj:
                upstream = grad_loss
            else:
                grad = grad * grad_loss  # one op, in fp32 and rounded once to raw's dtype (0-d: no promotion)
                row_coef = row_coef * grad_loss if row_coef is not None else None
                col_coef = col_coef * grad_loss if col_coef is not None else None
        return grad, None, row_coef, col_coef, None, upstream
    col_shift = saved.base_shift if ctx.col_shift_is_base else saved.col_shift
    beta_weight = saved.beta is not None and need["weight"]  # d(beta_j ||W_j||) / dW_j
    floats, ints = spec.kernel_options()
    grad, row_coef, col_coef, stats = kernel.backward(
        *row_backward_args(
            raw=raw,
            target=target,
            tables=row_tables(
                row_scale=saved.row_scale,
                col_scale=saved.col_scale,
                col_shift=col_shift,
                logit_offset=saved.logit_offset,
                pair_perturbation=saved.pair_perturbation,
                class_weight=saved.class_weight,
            ),
            lse=saved.lse,
            nll=saved.nll,
            target_grad=saved.target_grad,
            grad_rows=grad_loss,
            denom=saved.denom,
            floats=floats,
            ints=ints,
            scale_grad=not need["pair_perturbation"],
            row_proj=saved.row_proj if cosine and need["input"] and not out_proj else None,
            col_proj=saved.col_proj if cosine and need["weight"] and not out_proj else None,
            col_stats=bool(need["bias"] or need["logit_offset"] or need["omega"] or need["beta"] or beta_weight),
        )
    )
    if not need["pair_perturbation"]:
        return grad, None, row_coef, col_coef, stats, upstream
    # grad is G (fp32): dL/draw from it, and dL/dP = dL/dl off the target (B x C)
    kept = target != spec.ignore_index
    onehot = torch.nn.functional.one_hot(torch.where(kept, target, 0), raw.shape[1]).bool() & kept[:, None]
    grad_pair = (grad / spec.scale).masked_fill_(onehot, 0.0).to(saved.pair_perturbation.dtype)
    grad_raw = grad
    if saved.row_scale is not None:
        grad_raw = grad_raw * saved.row_scale[:, None]
    if saved.col_scale is not None:
        grad_raw = grad_raw * saved.col_scale[None, :]
    return grad_raw.to(raw.dtype), grad_pair, row_coef, col_coef, stats, upstream


def _head_grads(ctx, saved: _Saved, need, grad_raw, row_coef, col_coef, stats, upstream) -> dict:
    """The gradients of the features (the logits on the logits head), the classifier weight and the bias
    from ``dL/draw``: the two backward GEMMs, the cosine head's projections (one in-place op each on the GEMM
    output), and the C-sized finishing of the bias and of MARC's ``beta ||W_j||`` term."""
    spec, kernel = ctx.spec, ctx.kernel
    input, weight, beta = saved.input, saved.weight, saved.beta
    grads = {}
    if spec.head == "logits":
        if need["input"]:
            grads["input"] = grad_raw.to(input.dtype)
        return grads
    cosine = spec.head == "cosine"
    out_proj = kernel.project_out is not None
    x_pow, w_pow = saved.x_pow, saved.w_pow
    x_op, w_op = input, weight
    if x_pow is not None:  # the fp16 cosine head's rescaled operands (see _cosine_operands)
        x_op = input * x_pow.to(input.dtype)[:, None]
        w_op = weight * w_pow.to(weight.dtype)[:, None]
    if need["input"]:
        grad_x = grad_raw @ w_op
        if cosine:  # dX = dL/draw W - (sum_j dL/draw_ij raw_ij / ||x_i||^2) X, in fp32, rounded once
            grad_x = (
                kernel.project_out(grad_x, x_op, saved.row_proj, upstream)
                if out_proj
                else kernel.project(grad_x, x_op, row_coef)
            )
            if x_pow is not None:  # d x_op / d x = x_pow: one rounding, in fp32 (B x D)
                grad_x = grad_x.to(x_pow.dtype) * x_pow[:, None]
        grads["input"] = grad_x.to(input.dtype)
    if need["weight"]:
        grad_w = grad_raw.t() @ x_op
        if cosine:
            grad_w = (
                kernel.project_out(grad_w, w_op, saved.col_proj, upstream)
                if out_proj
                else kernel.project(grad_w, w_op, col_coef)
            )
            if w_pow is not None:  # d w_op / d w = w_pow: exact powers of two, in place
                grad_w = grad_w.mul_(w_pow.to(grad_w.dtype)[:, None])
        if beta is not None:  # d(beta_j ||W_j||) / dW_j = beta_j W_j / ||W_j|| (0 at W_j = 0)
            w_norm = saved.w_norm
            coef = torch.where(w_norm > 0, beta.to(w_norm.dtype) * stats[0] / w_norm.clamp_min(NORM_EPS), 0.0)
            grad_w = grad_w.addcmul_(weight, coef.to(grad_w.dtype)[:, None])
        grads["weight"] = grad_w.to(weight.dtype)
    if need["bias"]:  # dz'_j / db_j = omega_j
        omega = saved.omega
        col = stats[0] * omega.to(stats.dtype) if omega is not None else stats[0]
        grads["bias"] = col.to(ctx.dtypes["bias"])
    return grads


def _table_grads(ctx, saved: _Saved, need, stats) -> dict:
    """The gradients of the logit offset and of MARC's ``omega``/``beta`` from the column stats."""
    grads = {}
    if need["logit_offset"]:
        grads["logit_offset"] = stats[2].to(saved.logit_offset.dtype)
    if need["omega"]:  # sum_i G_ij z_ij with z = raw row_scale base_col_scale + base_shift
        base_col_scale = saved.col_scale if ctx.base_col_scale_is_col else saved.base_col_scale
        col = stats[1] if base_col_scale is None else stats[1] * base_col_scale
        if saved.base_shift is not None:
            col = col + stats[0] * saved.base_shift
        grads["omega"] = col.to(saved.omega.dtype)
    if need["beta"]:
        norms = saved.w_norm if saved.weight is not None else saved.class_norms.to(stats.dtype)
        grads["beta"] = (stats[0] * norms).to(saved.beta.dtype)
    return grads


# autograd.Function.apply binds the arguments to forward's signature on every call (setup_context style):
# the signature computed once, not per step (inspect.signature honours __signature__)
_FusedMarginCE.forward.__signature__ = inspect.signature(_FusedMarginCE.forward)
#: the arguments of ``_FusedMarginCE.forward`` in order (``needs_input_grad`` and the gradients by name)
INPUT_NAMES = tuple(_FusedMarginCE.forward.__signature__.parameters)


def grad_in_forward(
    kernel: RowKernel,
    spec: MarginLossSpec,
    input: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    tables: LossTables,
) -> bool:
    """Whether this call forms dL/draw in its forward (``kernel.forward_backward``): a training step of a
    reduced loss on a GEMM head (grad enabled; the features or the class weights, and no other input, require
    grad; no MARC ``beta``, whose weight gradient needs the column sums), outside ``torch.compile`` and
    ``torch.func`` transforms (which trace or transform the ops themselves), where the kernel has the op and
    the ``grad_in_forward`` switch of :mod:`fused_margin.config` is on."""
    if kernel.forward_backward is None or not CONFIG.grad_in_forward or tables.beta is not None:
        return False
    if spec.head == "logits" or spec.reduction == "none" or not torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling() or torch._C._functorch.get_dynamic_layer_stack_depth() > 0:
        return False
    if not (input.requires_grad or (weight is not None and weight.requires_grad)):
        return False
    return not any(isinstance(t, torch.Tensor) and t.requires_grad for t in (bias,) + tuple(tables))


def fused_margin_cross_entropy(
    kernel: RowKernel,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    spec: MarginLossSpec,
    tables: LossTables,
):
    """Run the loss through ``kernel``; returns ``(loss, lse, pred, hard)``."""
    early = grad_in_forward(kernel, spec, input, weight, bias, tables)
    loss, lse, pred, hard, *_saved = _FusedMarginCE.apply(
        kernel,
        spec,
        input,
        target,
        weight,
        bias,
        tables.class_margins,
        tables.logit_offset,
        tables.pair_perturbation,
        tables.class_weight,
        tables.omega,
        tables.beta,
        tables.class_norms,
        early,
    )
    return loss, lse, pred, hard
