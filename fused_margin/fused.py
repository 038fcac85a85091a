"""The autograd plumbing shared by every fused backend (Triton, C++ CPU, CUDA).

A fused backend supplies one *row kernel* (:class:`RowKernel`): two ops over the B x C matrix ``raw``
of the GEMM (or the logits themselves). Everything around it, the GEMMs on raw inputs, the inverse norms
and the normalisation Jacobian folded into row/column scalings (SPEC.md section 5, DESIGN.md), lives
here once.

Row kernel contract (``z'_ij = raw_ij * row_scale_i * col_scale_j + col_shift_j`` in fp32, a missing
scale is 1 and a missing shift 0):

``forward(raw, target, row_scale, col_scale, col_shift, class_margins, logit_offset, pair_perturbation,
class_weight, scale, margin_type, lambda_inst, hard_all, lambda_elm, fold, straight_through,
label_smoothing, ignore_index) -> (loss_rows, lse, pred, hard, target_logit, target_grad)``

    per row: the loss of SPEC.md section 4 before the reduction (``w_y``-weighted, smoothed; 0 on
    ignored rows), ``lse``, ``pred = argmax z'`` (int64), ``hard`` (bool), the final target logit
    ``t = s psi(z'_y, M) + a_y`` and ``target_grad = dt / dz'_y``. Ignored rows: loss 0,
    ``target_grad`` 0, ``lse`` of ``s z' + a + P``.

``backward(raw, target, row_scale, col_scale, col_shift, logit_offset, pair_perturbation,
class_weight, lse, target_logit, target_grad, grad_rows, scale, label_smoothing, ignore_index,
scale_grad) -> grad``

    ``G = dL/dz'`` from the saved row statistics: with ``p_ij = exp(l_ij - lse_i)``,
    ``dl_ij = g_i ((1 - eps) w_y (p_ij - [j = y]) + eps / C (sum(w) p_ij - w_j))``, ``G_ij = s dl_ij``
    off the target and ``G_iy = target_grad_i dl_iy``; zero on ignored rows. With ``scale_grad`` the
    kernel returns ``G_ij row_scale_i col_scale_j`` (= dL/draw) in ``raw``'s dtype, else ``G`` in fp32.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from .reference import compute_dtype
from .spec import NORM_EPS, LossTables, MarginLossSpec


class RowKernel(NamedTuple):
    """A backend's pair of row ops (see the module docstring for the contract)."""

    name: str
    forward: Callable
    backward: Callable


def base_scores(raw, row_scale, col_scale, col_shift):
    """``z'_ij = raw_ij row_scale_i col_scale_j + col_shift_j`` in the compute dtype (fp32; fp64 for fp64
    ``raw``); a missing scale is 1 and a missing shift 0."""
    z = raw.to(compute_dtype(raw.dtype))
    if row_scale is not None:
        z = z * row_scale[:, None]
    if col_scale is not None:
        z = z * col_scale[None, :]
    if col_shift is not None:
        z = z + col_shift[None, :]
    return z


def _project_out(grad: torch.Tensor, rows: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``grad_i - (v_hat_i . grad_i) v_hat_i`` for rows with ``||v_i|| >= eps``; ``grad_i`` elsewhere:
    the Jacobian of ``F.normalize`` applied to ``grad`` (which already carries ``1 / max(||v||, eps)``).

    ``grad`` is a fresh GEMM output in the input dtype and is updated in place, in that dtype: the dot
    products (fp32 accumulation) and the radial coefficient rounded to it err no more than the rounding
    ``grad`` already carries (``|v_hat . grad| <= |grad|``), and no fp32 C x D copy is made."""
    dots = torch.linalg.vecdot(rows, grad).to(norms.dtype)
    inv_sq = torch.where(norms >= NORM_EPS, norms.clamp_min(NORM_EPS).reciprocal().square(), 0.0)
    return grad.addcmul_(rows, (dots * inv_sq).neg_().to(grad.dtype)[:, None])


class _FusedMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: RowKernel, spec: MarginLossSpec, input, target, weight, bias,
                class_margins, logit_offset, pair_perturbation, class_weight, omega, beta, class_norms):
        head = spec.head
        acc = compute_dtype(input.dtype)
        x_norm = w_norm = None
        if head == "cosine":
            x_norm = torch.linalg.vector_norm(input, dim=1, dtype=acc)
            w_norm = torch.linalg.vector_norm(weight, dim=1, dtype=acc)
            raw = input @ weight.t()
            row_scale = 1.0 / x_norm.clamp_min(NORM_EPS)
            col_scale = 1.0 / w_norm.clamp_min(NORM_EPS)
            base_col_scale = col_scale
        else:
            raw = input @ weight.t() if head == "linear" else input
            if beta is not None and head == "linear":
                w_norm = torch.linalg.vector_norm(weight, dim=1, dtype=acc)
            row_scale = col_scale = base_col_scale = None
        base_shift = bias.to(acc) if bias is not None else None
        col_shift = base_shift
        if omega is not None:
            omega32 = omega.to(acc)
            col_scale = omega32 if col_scale is None else col_scale * omega32
            if col_shift is not None:
                col_shift = col_shift * omega32
        if beta is not None:
            norms = w_norm if weight is not None else class_norms.to(acc)
            beta_shift = beta.to(acc) * norms
            col_shift = beta_shift if col_shift is None else col_shift + beta_shift
        if col_scale is not None:
            col_scale = col_scale.contiguous()

        loss_rows, lse, pred, hard, target_logit, target_grad = kernel.forward(
            raw, target, row_scale, col_scale, col_shift, class_margins, logit_offset, pair_perturbation,
            class_weight, float(spec.scale), spec.margin_code, float(spec.lambda_inst),
            spec.hard_mode == "all", float(spec.lambda_elm), spec.fold_code,
            spec.margin_grad == "straight_through", float(spec.label_smoothing), int(spec.ignore_index))

        kept = target != spec.ignore_index
        if spec.reduction == "mean":
            if class_weight is None:
                denom = kept.sum().to(loss_rows.dtype)
            else:
                safe = torch.where(kept, target, torch.zeros_like(target))
                denom = torch.where(kept, class_weight.to(loss_rows.dtype)[safe], 0).sum()
            loss = loss_rows.sum() / denom
        elif spec.reduction == "sum":
            loss, denom = loss_rows.sum(), None
        else:
            loss, denom = loss_rows, None

        ctx.kernel, ctx.spec = kernel, spec
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, target, weight, raw, row_scale, col_scale, col_shift, base_col_scale,
                              base_shift, logit_offset, pair_perturbation, class_weight, omega, beta,
                              class_norms, x_norm, w_norm, lse, target_logit, target_grad, denom)
        ctx.mark_non_differentiable(lse, pred, hard)
        return loss, lse, pred, hard

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_pred, _grad_hard):
        (input, target, weight, raw, row_scale, col_scale, col_shift, base_col_scale, base_shift,
         logit_offset, pair_perturbation, class_weight, omega, beta, class_norms, x_norm, w_norm, lse,
         target_logit, target_grad, denom) = ctx.saved_tensors
        spec, kernel = ctx.spec, ctx.kernel
        if torch.is_grad_enabled():
            raise RuntimeError(f"the fused {kernel.name!r} backend gives first-order gradients only; "
                               "for create_graph=True (double backward, meta-learning) use backend='reference'")
        need = ctx.needs_input_grad
        need_input, need_weight, need_bias = need[2], need[4], need[5]
        need_offset, need_pair, need_omega, need_beta = need[7], need[8], need[10], need[11]
        kept = target != spec.ignore_index
        rows = raw.shape[0]

        grad_loss = grad_loss.to(lse.dtype)
        if spec.reduction == "mean":
            grad_rows = (grad_loss / denom).expand(rows)
        elif spec.reduction == "sum":
            grad_rows = grad_loss.expand(rows)
        else:
            grad_rows = grad_loss
        grad_rows = torch.where(kept, grad_rows, torch.zeros_like(grad_rows)).contiguous()

        args = (raw, target, row_scale, col_scale, col_shift, logit_offset, pair_perturbation, class_weight,
                lse, target_logit, target_grad, grad_rows, float(spec.scale), float(spec.label_smoothing),
                int(spec.ignore_index))
        # the eager path materialises the fp32 G = dL/dz': for the tables' gradients, for beta's norm
        # term, and for a low-precision bias gradient (a column sum of G, not of a rounded dL/draw)
        low_precision_bias = need_bias and compute_dtype(raw.dtype) != raw.dtype
        eager_tables = (need_offset or need_pair or need_omega or need_beta or low_precision_bias
                        or (beta is not None and need_weight))
        if not eager_tables:
            grad_raw = kernel.backward(*args, True)
            grad_z = None
        else:
            grad_z = kernel.backward(*args, False)
            grad_raw = grad_z
            if row_scale is not None:
                grad_raw = grad_raw * row_scale[:, None]
            if col_scale is not None:
                grad_raw = grad_raw * col_scale[None, :]
            grad_raw = grad_raw.to(raw.dtype)

        grads = [None] * 13
        if spec.head == "logits":
            if need_input:
                grads[2] = grad_raw.to(input.dtype)
        else:
            if need_input:
                grad_x = grad_raw @ weight
                grads[2] = (_project_out(grad_x, input, x_norm) if spec.head == "cosine" else grad_x).to(input.dtype)
            if need_weight:
                grad_w = grad_raw.t() @ input
                if spec.head == "cosine":
                    grad_w = _project_out(grad_w, weight, w_norm)
                if beta is not None:  # d(beta_j ||W_j||) / dW_j = beta_j W_j / ||W_j|| (0 at W_j = 0)
                    coef = torch.where(w_norm > 0, beta.to(w_norm.dtype) * grad_z.sum(0)
                                       / w_norm.clamp_min(NORM_EPS), 0.0)
                    grad_w = grad_w.addcmul_(weight, coef.to(grad_w.dtype)[:, None])
                grads[4] = grad_w.to(weight.dtype)
            if need_bias:
                if grad_z is not None:
                    col = grad_z.sum(0) * (omega.to(grad_z.dtype) if omega is not None else 1.0)
                else:
                    col = grad_raw.sum(0, dtype=compute_dtype(raw.dtype))
                grads[5] = col.to(ctx.bias_dtype)
        if need_offset or need_pair:
            safe = torch.where(kept, target, torch.zeros_like(target))
            target_dl = _target_logit_grad(lse, target_logit, grad_rows, safe, class_weight,
                                           float(spec.label_smoothing), raw.shape[1])
            onehot = torch.nn.functional.one_hot(safe, raw.shape[1]).bool() & kept[:, None]
            grad_logits = torch.where(onehot, target_dl[:, None], grad_z / spec.scale)
            if need_offset:
                grads[7] = grad_logits.sum(0).to(logit_offset.dtype)
            if need_pair:
                grads[8] = grad_logits.masked_fill(onehot, 0.0).to(pair_perturbation.dtype)
        if need_omega:
            z = base_scores(raw, row_scale, base_col_scale, base_shift)
            grads[10] = (grad_z * z).sum(0).to(omega.dtype)
        if need_beta:
            norms = w_norm if weight is not None else class_norms.to(grad_z.dtype)
            grads[11] = (grad_z.sum(0) * norms).to(beta.dtype)
        return tuple(grads)


def _target_logit_grad(lse, target_logit, grad_rows, safe_target, class_weight, label_smoothing,
                       num_classes):
    """``dL/dl_iy``: the softmax-CE derivative at the target logit (SPEC.md section 4)."""
    p = torch.exp(target_logit - lse)
    if class_weight is None:
        w_y, w_sum = torch.ones_like(p), float(num_classes)
    else:
        w = class_weight.to(p.dtype)
        w_y, w_sum = w[safe_target], w.sum()
    return grad_rows * ((1.0 - label_smoothing) * w_y * (p - 1.0)
                        + label_smoothing / num_classes * (w_sum * p - w_y))


def fused_margin_cross_entropy(kernel: RowKernel, input: torch.Tensor, target: torch.Tensor,
                               weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                               spec: MarginLossSpec, tables: LossTables):
    """Run the loss through ``kernel``; returns ``(loss, lse, pred, hard)``."""
    return _FusedMarginCE.apply(kernel, spec, input, target, weight, bias, tables.class_margins,
                                tables.logit_offset, tables.pair_perturbation, tables.class_weight,
                                tables.omega, tables.beta, tables.class_norms)
