"""The autograd plumbing shared by every fused backend (Triton, C++ CPU, CUDA).

A fused backend supplies one *row kernel* (:class:`RowKernel`): two ops over the B x C matrix ``raw``
of the GEMM (or the logits themselves). Everything around it, the GEMMs on raw inputs, the inverse norms
and the normalisation Jacobian folded into row/column scalings (docs/loss.md section 5, docs/design.md), lives
here once.

Row kernel contract (``z'_ij = raw_ij * row_scale_i * col_scale_j + col_shift_j`` in fp32, a missing
scale is 1 and a missing shift 0):

``forward(raw, target, row_scale, col_scale, col_shift, class_margins, logit_offset, pair_perturbation,
class_weight, scale, margin_type, lambda_inst, hard_all, lambda_elm, fold, straight_through,
label_smoothing, ignore_index) -> (loss_rows, lse, pred, hard, nll, target_grad)``

    per row: the loss of docs/loss.md section 4 before the reduction (``w_y``-weighted, smoothed; 0 on
    ignored rows), ``lse``, ``pred = argmax z'`` (int64), ``hard`` (bool), ``nll = lse - t`` for the
    final target logit ``t = s psi(z'_y, M) + a_y``, and ``target_grad = dt / dz'_y``. ``nll`` is formed
    relative to the non-target logits' maximum ``M`` with ``S = sum_{j != y} exp(l_j - M)`` (docs/loss.md
    section 8, confident rows): ``log1p(S exp(M - t))`` where ``t >= M``, ``(M - t) + log(S + exp(t - M))``
    where ``t < M``, and ``lse - t`` where ``t`` or ``M`` is not finite (as ``F.cross_entropy``). The loss
    row is ``(1 - eps) w_y nll + eps / C (sum_{j != y} w_j (lse - l_j) + w_y nll)``. Ignored rows: loss 0,
    ``nll`` 0, ``target_grad`` 0, ``lse`` of ``s z' + a + P``.

``backward(raw, target, row_scale, col_scale, col_shift, logit_offset, pair_perturbation,
class_weight, lse, nll, target_grad, grad_rows, scale, label_smoothing, ignore_index,
scale_grad) -> grad``

    ``G = dL/dz'`` from the saved row statistics: off the target, with ``p_ij = exp(l_ij - lse_i)``,
    ``dl_ij = g_i ((1 - eps) w_y p_ij + eps / C (W p_ij - w_j))`` and ``G_ij = s dl_ij``; on the target,
    ``dl_iy = g_i ((1 - eps) w_y expm1(-nll_i) + eps / C ((W - w_y) + W expm1(-nll_i)))`` (``p_y - 1`` as
    ``expm1(-nll)``, precise on confident rows) and ``G_iy = target_grad_i dl_iy``; zero on ignored
    rows (``W = sum_j w_j``, ``C`` without class weights). With ``scale_grad`` the kernel returns
    ``G_ij row_scale_i col_scale_j`` (= dL/draw) in ``raw``'s dtype, else ``G`` in fp32.

All backends share one floating-point rule: no contraction of ``a * b + c`` into fused multiply-adds in
the kernels' own arithmetic (``-ffp-contract=off`` for the C++ kernels, ``--fmad=false`` for nvcc,
``enable_fp_fusion=False`` on every Triton launch), so ``z'`` and the logits round as eager torch's
separate ops; library functions (``exp``, ``log``, ``cos``) keep their own internal FMAs.
"""
from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Optional

import torch

from .reference import compute_dtype
from .spec import NORM_EPS, LossTables, MarginLossSpec, row_backward_args, row_forward_args


class RowKernel(NamedTuple):
    """A backend's pair of row ops (see the module docstring for the contract)."""

    name: str
    forward: Callable
    backward: Callable


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


#: rows per block of :func:`_row_dots`' fp32 copies (bounds the temporary at this many rows of D fp32 values)
_DOT_BLOCK_ELEMENTS = 1 << 22


def _row_dots(rows: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``rows_i . grad_i`` per row in ``dtype`` (fp32 or fp64) from the exact values of low-precision
    operands: each block of rows is widened to ``dtype`` (the products exact, the sums in ``dtype``), so
    no full ``dtype`` copy of a C x D operand is held (at most :data:`_DOT_BLOCK_ELEMENTS` values)."""
    if rows.dtype == dtype and grad.dtype == dtype:
        return torch.linalg.vecdot(rows, grad)
    step = max(1, _DOT_BLOCK_ELEMENTS // max(1, rows.shape[1]))
    if rows.shape[0] <= step:
        return torch.linalg.vecdot(rows.to(dtype), grad.to(dtype))
    return torch.cat([torch.linalg.vecdot(rows[i:i + step].to(dtype), grad[i:i + step].to(dtype))
                      for i in range(0, rows.shape[0], step)])


def _project_out(grad: torch.Tensor, rows: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``grad_i - (v_hat_i . grad_i) v_hat_i`` for rows with ``||v_i|| >= eps``; ``grad_i`` elsewhere:
    the Jacobian of ``F.normalize`` applied to ``grad`` (which already carries ``1 / max(||v||, eps)``;
    docs/loss.md section 5).

    ``grad`` is a fresh GEMM output in the input dtype and is updated in place. The radial coefficient
    ``(v_i . grad_i) / ||v_i||^2`` is formed in ``norms``' dtype (fp32; fp64 for fp64) from the exact
    values of ``grad`` and ``rows`` (:func:`_row_dots`), and ``grad + rows * (-coef)`` is one ``addcmul``
    computed in that dtype and rounded once to ``grad``'s: a mostly radial gradient cancels in fp32, as the
    reference's ``F.normalize`` backward does, not in bf16/fp16 (where the rounded coefficient and
    product would each add an error of the radial part's size). No C x D fp32 copy is made."""
    dots = _row_dots(rows, grad, norms.dtype)
    inv_sq = torch.where(norms >= NORM_EPS, norms.clamp_min(NORM_EPS).reciprocal().square(), 0.0)
    return grad.addcmul_(rows, (dots * inv_sq).neg_()[:, None])


def _pow2_scale(norms: torch.Tensor) -> torch.Tensor:
    """``2^-round(log2 ||v||)`` per row (1 where ``||v|| < eps``, or not finite): multiplying a row by it is
    exact in any binary floating type and brings its norm into ``[0.7, 1.5)``."""
    ok = torch.isfinite(norms) & (norms >= NORM_EPS)
    exponent = torch.round(torch.log2(torch.where(ok, norms, torch.ones_like(norms))))
    return torch.exp2(-exponent)


def _cosine_operands(input, weight, acc):
    """The GEMM operands of the cosine head and their fp32 norms: ``(x, w, x_norm, w_norm, x_pow, w_pow)``.

    In fp16 (range 65504) ``x @ w.T`` overflows for ``||x|| ||w|| > 65504`` and ``dL/draw =
    G / (||x|| ||w||)`` under- or overflows for extreme norms, so there both operands are rescaled by
    powers of two (``x_pow``, ``w_pow``: exact, the cosines unchanged) to unit-order norms: the GEMMs and
    ``dL/draw`` stay near the cosines' own range. The copies are in the input dtype (B x D and C x D
    fp16, no fp32 C x D copy); bf16 and fp32 (fp32's range) use the tensors themselves (pows None)."""
    x_norm = torch.linalg.vector_norm(input, dim=1, dtype=acc)
    w_norm = torch.linalg.vector_norm(weight, dim=1, dtype=acc)
    if input.dtype != torch.float16 and weight.dtype != torch.float16:
        return input, weight, x_norm, w_norm, None, None
    x_pow, w_pow = _pow2_scale(x_norm), _pow2_scale(w_norm)
    return (input * x_pow.to(input.dtype)[:, None], weight * w_pow.to(weight.dtype)[:, None],
            x_norm, w_norm, x_pow, w_pow)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
        return False


def _first_order_error(kernel_name: str) -> str:
    return (f"the fused {kernel_name!r} backend gives first-order gradients only; for create_graph=True "
            "(double backward, meta-learning) pass double_backward=True to the loss (margin_cross_entropy, the "
            "presets and the modules), which runs backend='reference'; nested torch.func.grad also needs "
            "backend='reference'")


class _Residuals(NamedTuple):
    """What ``_FusedMarginCE.forward`` computes for ``backward`` (returned after ``(loss, lse, pred, hard)``
    and dropped by the caller). ``None`` where absent, or where it would repeat an input or another
    output (``setup_context`` restores those; ``torch.compile`` refuses an output returned twice)."""

    raw: Optional[torch.Tensor]             # the GEMM output (None on the logits head: the input itself)
    row_scale: Optional[torch.Tensor]       # 1 / max(||x_i||, eps) (over x_pow_i on the fp16 cosine head)
    col_scale: Optional[torch.Tensor]       # the head's column scale times omega
    col_shift: Optional[torch.Tensor]       # (bias times omega) + beta ||W|| (None when it is base_shift)
    base_col_scale: Optional[torch.Tensor]  # the head's column scale alone (None when it is col_scale)
    base_shift: Optional[torch.Tensor]      # the bias in the compute dtype
    x_norm: Optional[torch.Tensor]
    w_norm: Optional[torch.Tensor]
    x_pow: Optional[torch.Tensor]           # the fp16 cosine head's power-of-two rescaling (_cosine_operands)
    w_pow: Optional[torch.Tensor]
    nll: torch.Tensor
    target_grad: torch.Tensor
    denom: Optional[torch.Tensor]           # the mean's denominator


#: the outputs of ``_FusedMarginCE.forward``, in order
_OUTPUTS = ("loss", "lse", "pred", "hard") + _Residuals._fields
#: the inputs ``backward`` reads (saved by name; see :class:`_Saved`)
_SAVED_INPUTS = ("input", "target", "weight", "logit_offset", "pair_perturbation", "class_weight", "omega", "beta",
                 "class_norms")


class _Saved(NamedTuple("_SavedBase", [(name, Optional[torch.Tensor])
                                       for name in _SAVED_INPUTS + ("lse",) + _Residuals._fields])):
    """``ctx.saved_tensors`` by name: the inputs of :data:`_SAVED_INPUTS`, ``lse`` and the residuals."""


class _FusedMarginCE(torch.autograd.Function):
    """``forward`` + ``setup_context`` (what ``torch.func.grad`` needs); ``forward`` returns, after
    ``(loss, lse, pred, hard)``, the :class:`_Residuals` that ``backward`` needs, which the caller drops.

    Inputs, outputs, saved tensors and gradients are handled by name (:data:`INPUT_NAMES`, derived once
    from ``forward``'s signature; :data:`_OUTPUTS`; :class:`_Saved`), so adding an argument shifts no
    index."""

    @staticmethod
    def forward(kernel: RowKernel, spec: MarginLossSpec, input, target, weight, bias,
                class_margins, logit_offset, pair_perturbation, class_weight, omega, beta, class_norms):
        head = spec.head
        acc = compute_dtype(input.dtype)
        x_norm = w_norm = x_pow = w_pow = None
        if head == "cosine":
            x_op, w_op, x_norm, w_norm, x_pow, w_pow = _cosine_operands(input, weight, acc)
            raw = x_op @ w_op.t()
            row_scale = 1.0 / x_norm.clamp_min(NORM_EPS)
            col_scale = 1.0 / w_norm.clamp_min(NORM_EPS)
            if x_pow is not None:  # raw carries x_pow_i w_pow_j: undo it in the (exact) scalings
                row_scale = row_scale / x_pow
                col_scale = col_scale / w_pow
            base_col_scale = col_scale
        else:
            raw = input @ weight.t() if head == "linear" else input
            if beta is not None and head == "linear":
                w_norm = torch.linalg.vector_norm(weight, dim=1, dtype=acc)
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
        if col_scale is not None:
            col_scale = col_scale.contiguous()

        loss_rows, lse, pred, hard, nll, target_grad = kernel.forward(*row_forward_args(
            raw=raw, target=target, row_scale=row_scale, col_scale=col_scale, col_shift=col_shift,
            class_margins=class_margins, logit_offset=logit_offset, pair_perturbation=pair_perturbation,
            class_weight=class_weight, **spec.row_options()))

        kept = target != spec.ignore_index
        denom = None
        if spec.reduction == "mean":
            if class_weight is None:
                denom = kept.sum().to(loss_rows.dtype)
            else:
                safe = torch.where(kept, target, torch.zeros_like(target))
                denom = torch.where(kept, class_weight.to(loss_rows.dtype)[safe], 0).sum()
            # as F.cross_entropy: a zero denominator (no kept row, or every kept w_y = 0) gives NaN, 0 / 0
            loss = torch.where(denom != 0, loss_rows.sum() / denom, torch.full_like(denom, float("nan")))
        elif spec.reduction == "sum":
            loss = loss_rows.sum()
        else:
            loss = loss_rows
        residuals = _Residuals(
            raw=None if head == "logits" else raw, row_scale=row_scale, col_scale=col_scale,
            col_shift=None if col_shift is base_shift else col_shift,
            base_col_scale=None if base_col_scale is col_scale else base_col_scale, base_shift=base_shift,
            x_norm=x_norm, w_norm=w_norm, x_pow=x_pow, w_pow=w_pow, nll=nll, target_grad=target_grad,
            denom=denom)
        return (loss, lse, pred, hard) + tuple(residuals)

    @staticmethod
    def setup_context(ctx, inputs, output):
        args = dict(zip(INPUT_NAMES, inputs))
        out = dict(zip(_OUTPUTS, output))
        ctx.kernel, ctx.spec = args["kernel"], args["spec"]
        ctx.dtypes = {name: value.dtype for name, value in args.items() if isinstance(value, torch.Tensor)}
        ctx.device_type = args["input"].device.type
        ctx.raw_is_input = out["raw"] is None
        ctx.col_shift_is_base = out["col_shift"] is None and out["base_shift"] is not None
        ctx.base_col_scale_is_col = out["base_col_scale"] is None and ctx.spec.head == "cosine"
        ctx.save_for_backward(*(args[name] for name in _SAVED_INPUTS), out["lse"],
                              *(out[name] for name in _Residuals._fields))
        ctx.mark_non_differentiable(*[out[name] for name in _OUTPUTS[1:] if isinstance(out[name], torch.Tensor)])

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError(f"the fused {args[0].name!r} backend does not support torch.func.vmap (its row "
                           "kernels have no batching rule); use backend='reference' under vmap, or loop")

    @staticmethod
    def backward(ctx, grad_loss, *_grad_outputs):
        if _autocast_enabled(ctx.device_type):
            # a backward run inside an autocast region: as the forward, with autocast off (the GEMMs take
            # the saved operands' dtype, the row math and the projection stay fp32)
            with torch.autocast(ctx.device_type, enabled=False):
                return _FusedMarginCE._first_order_backward(ctx, grad_loss)
        return _FusedMarginCE._first_order_backward(ctx, grad_loss)

    @staticmethod
    def _first_order_backward(ctx, grad_loss):
        spec, kernel = ctx.spec, ctx.kernel
        if torch.is_grad_enabled():
            # a create_graph backward: refused outright (a plain create_graph=True, nested torch.func.grad),
            # except under one torch.func.grad transform, which always asks for one; there the gradients
            # are returned as first-order only (differentiating them again raises)
            if torch._C._functorch.get_dynamic_layer_stack_depth() != 1:  # not one torch.func.grad
                raise RuntimeError(_first_order_error(kernel.name))
            with torch.no_grad():
                grads = _FusedMarginCE._backward(ctx, grad_loss)
            present = [g for g in grads if g is not None]
            if present:
                wrapped = torch._C._functions.DelayedError(_first_order_error(kernel.name).encode(),
                                                           len(present))(*present)
                wrapped = iter((wrapped,) if isinstance(wrapped, torch.Tensor) else wrapped)
                grads = tuple(None if g is None else next(wrapped) for g in grads)
            return grads
        return _FusedMarginCE._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        saved = _Saved(*ctx.saved_tensors)
        (input, target, weight, logit_offset, pair_perturbation, class_weight, omega, beta, class_norms) = (
            getattr(saved, name) for name in _SAVED_INPUTS)
        lse, nll, target_grad, denom = saved.lse, saved.nll, saved.target_grad, saved.denom
        row_scale, col_scale, x_norm, w_norm, x_pow, w_pow = (
            saved.row_scale, saved.col_scale, saved.x_norm, saved.w_norm, saved.x_pow, saved.w_pow)
        raw = input if ctx.raw_is_input else saved.raw
        base_shift = saved.base_shift
        col_shift = base_shift if ctx.col_shift_is_base else saved.col_shift
        base_col_scale = col_scale if ctx.base_col_scale_is_col else saved.base_col_scale
        spec, kernel = ctx.spec, ctx.kernel
        need = dict(zip(INPUT_NAMES, ctx.needs_input_grad))
        need_input, need_weight, need_bias = need["input"], need["weight"], need["bias"]
        need_offset, need_pair = need["logit_offset"], need["pair_perturbation"]
        need_omega, need_beta = need["omega"], need["beta"]
        kept = target != spec.ignore_index
        rows = raw.shape[0]

        grad_loss = grad_loss.to(lse.dtype)
        if spec.reduction == "mean":
            # d(sum / denom) = 1 / denom; NaN where the loss is the NaN of a zero denominator
            grad_rows = torch.where(denom != 0, grad_loss / denom, torch.full_like(denom, float("nan")))
            grad_rows = grad_rows.expand(rows)
        elif spec.reduction == "sum":
            grad_rows = grad_loss.expand(rows)
        else:
            grad_rows = grad_loss
        grad_rows = torch.where(kept, grad_rows, torch.zeros_like(grad_rows)).contiguous()

        args = dict(raw=raw, target=target, row_scale=row_scale, col_scale=col_scale, col_shift=col_shift,
                    logit_offset=logit_offset, pair_perturbation=pair_perturbation, class_weight=class_weight,
                    lse=lse, nll=nll, target_grad=target_grad, grad_rows=grad_rows, scale=float(spec.scale),
                    label_smoothing=float(spec.label_smoothing), ignore_index=int(spec.ignore_index))
        # the eager path materialises the fp32 G = dL/dz': for the tables' gradients, for beta's norm
        # term, and for a low-precision bias gradient (a column sum of G, not of a rounded dL/draw)
        low_precision_bias = need_bias and compute_dtype(raw.dtype) != raw.dtype
        eager_tables = (need_offset or need_pair or need_omega or need_beta or low_precision_bias
                        or (beta is not None and need_weight))
        if not eager_tables:
            grad_raw = kernel.backward(*row_backward_args(**args, scale_grad=True))
            grad_z = None
        else:
            grad_z = kernel.backward(*row_backward_args(**args, scale_grad=False))
            grad_raw = grad_z
            if row_scale is not None:
                grad_raw = grad_raw * row_scale[:, None]
            if col_scale is not None:
                grad_raw = grad_raw * col_scale[None, :]
            grad_raw = grad_raw.to(raw.dtype)

        grads = {}  # by input name
        if spec.head == "logits":
            if need_input:
                grads["input"] = grad_raw.to(input.dtype)
        else:
            x_op, w_op = input, weight
            x_op_norm, w_op_norm = x_norm, w_norm
            if x_pow is not None:  # the fp16 cosine head's rescaled operands (see _cosine_operands)
                x_op = input * x_pow.to(input.dtype)[:, None]
                w_op = weight * w_pow.to(weight.dtype)[:, None]
                x_op_norm, w_op_norm = x_norm * x_pow, w_norm * w_pow
            if need_input:
                grad_x = grad_raw @ w_op
                if spec.head == "cosine":
                    grad_x = _project_out(grad_x, x_op, x_op_norm)
                    if x_pow is not None:  # d x_op / d x = x_pow: one rounding, in fp32 (B x D)
                        grad_x = grad_x.to(x_pow.dtype) * x_pow[:, None]
                grads["input"] = grad_x.to(input.dtype)
            if need_weight:
                grad_w = grad_raw.t() @ (x_op if spec.head == "cosine" else input)
                if spec.head == "cosine":
                    grad_w = _project_out(grad_w, w_op, w_op_norm)
                    if w_pow is not None:  # d w_op / d w = w_pow: exact powers of two, in place
                        grad_w = grad_w.mul_(w_pow.to(grad_w.dtype)[:, None])
                if beta is not None:  # d(beta_j ||W_j||) / dW_j = beta_j W_j / ||W_j|| (0 at W_j = 0)
                    coef = torch.where(w_norm > 0, beta.to(w_norm.dtype) * grad_z.sum(0)
                                       / w_norm.clamp_min(NORM_EPS), 0.0)
                    grad_w = grad_w.addcmul_(weight, coef.to(grad_w.dtype)[:, None])
                grads["weight"] = grad_w.to(weight.dtype)
            if need_bias:
                if grad_z is not None:
                    col = grad_z.sum(0) * (omega.to(grad_z.dtype) if omega is not None else 1.0)
                else:
                    col = grad_raw.sum(0, dtype=compute_dtype(raw.dtype))
                grads["bias"] = col.to(ctx.dtypes["bias"])
        if need_offset or need_pair:
            safe = torch.where(kept, target, torch.zeros_like(target))
            target_dl = _target_logit_grad(nll, grad_rows, safe, class_weight, float(spec.label_smoothing),
                                           raw.shape[1])
            onehot = torch.nn.functional.one_hot(safe, raw.shape[1]).bool() & kept[:, None]
            grad_logits = torch.where(onehot, target_dl[:, None], grad_z / spec.scale)
            if need_offset:
                grads["logit_offset"] = grad_logits.sum(0).to(logit_offset.dtype)
            if need_pair:
                grads["pair_perturbation"] = grad_logits.masked_fill(onehot, 0.0).to(pair_perturbation.dtype)
        if need_omega:
            z = scaled_scores(raw, row_scale, base_col_scale, base_shift)
            grads["omega"] = (grad_z * z).sum(0).to(omega.dtype)
        if need_beta:
            norms = w_norm if weight is not None else class_norms.to(grad_z.dtype)
            grads["beta"] = (grad_z.sum(0) * norms).to(beta.dtype)
        return tuple(grads.get(name) for name in INPUT_NAMES)


#: the arguments of ``_FusedMarginCE.forward`` in order (``needs_input_grad`` and the gradients by name)
INPUT_NAMES = tuple(inspect.signature(_FusedMarginCE.forward).parameters)


def _target_logit_grad(nll, grad_rows, safe_target, class_weight, label_smoothing, num_classes):
    """``dL/dl_iy``, the softmax-CE derivative at the target logit (docs/loss.md section 4), from the precise
    ``nll``: ``g ((1 - eps) w_y expm1(-nll) + eps / C ((W - w_y) + W expm1(-nll)))``
    (``p_y - 1 = expm1(-nll)``, ``W = sum_j w_j``)."""
    if class_weight is None:
        w_y, w_sum = torch.ones_like(nll), float(num_classes)
    else:
        w = class_weight.to(nll.dtype)
        w_y, w_sum = w[safe_target], w.sum()
    pm1 = torch.expm1(-nll)
    return grad_rows * ((1.0 - label_smoothing) * w_y * pm1
                        + label_smoothing / num_classes * ((w_sum - w_y) + w_sum * pm1))


def fused_margin_cross_entropy(kernel: RowKernel, input: torch.Tensor, target: torch.Tensor,
                               weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                               spec: MarginLossSpec, tables: LossTables):
    """Run the loss through ``kernel``; returns ``(loss, lse, pred, hard)``."""
    loss, lse, pred, hard, *_saved = _FusedMarginCE.apply(
        kernel, spec, input, target, weight, bias, tables.class_margins, tables.logit_offset,
        tables.pair_perturbation, tables.class_weight, tables.omega, tables.beta, tables.class_norms)
    return loss, lse, pred, hard
