"""The memory-lean execution of the loss for large vocabularies: never a B x C matrix.

The forward loops over chunks of classes: the GEMM of the features with one chunk of the class
weights, that chunk's partial statistics (:mod:`fused_margin.class_split`), and the chunk is dropped;
the partials are merged and the rows finished from O(B) data. The backward loops over the chunks
again: it recomputes each chunk's GEMM (a fourth GEMM in all), forms the chunk's ``dL/dz'`` from the
saved ``lse``, ``nll``, target logit and ``dt/dz'_y``, accumulates the features' gradient in fp32
(B x D) and writes the chunk's rows of the weight gradient once.

Memory beyond the inputs and the gradients: a few B x chunk buffers, O(B + C) row and column
statistics, and a B x D fp32 accumulator. The chunk is chosen from a byte budget (:data:`BUDGET_BYTES`)
unless given.

Cosine head: the features and each chunk of the class weights are normalised before the GEMM
(``F.normalize``, as the reference), so the GEMM computes the cosines themselves and stays in range in
fp16 whatever the norms; the normalisation Jacobian is applied to the two gradients,
``dL/dX_i = (g_i - (x_hat_i . g_i) x_hat_i) / max(|X_i|, eps)`` with ``g = dL/dX_hat`` (and the same for
``W_j``), dropping the projection where the norm is below eps (docs/loss.md section 5).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .class_split import block_partials, combine, finish
from .reference import compute_dtype
from .spec import NORM_EPS, LossTables, MarginLossSpec

#: default byte budget for the per-chunk buffers of the lean path (B x chunk elements, several of them).
BUDGET_BYTES = 64 * 2 ** 20
#: fp32-equivalent B x chunk buffers alive at once in a chunk's forward/backward (a conservative count).
_BUFFERS = 6


def auto_chunk(rows: int, num_classes: int, budget_bytes: int = BUDGET_BYTES) -> int:
    """Classes per chunk so that about ``_BUFFERS`` fp32 B x chunk buffers fit in ``budget_bytes``: a
    multiple of 128 (aligned GEMMs), at least 128, at most ``num_classes``."""
    per_class = max(1, rows) * 4 * _BUFFERS
    chunk = max(128, (budget_bytes // per_class) // 128 * 128)
    return int(min(chunk, num_classes))


def _norm(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=1, dtype=compute_dtype(v.dtype))


def _project(grad: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``(g - (u . g) u) / max(|v|, eps)`` row by row (``g / eps`` where ``|v| < eps``): the Jacobian of
    ``F.normalize`` applied to ``g``; ``grad`` and ``unit`` in the compute dtype."""
    dots = (unit * grad).sum(1, keepdim=True)
    radial = torch.where((norm >= NORM_EPS)[:, None], dots * unit, torch.zeros_like(grad))
    return (grad - radial) / norm.clamp_min(NORM_EPS)[:, None]


class _Chunks:
    """The per-chunk base scores of the three heads (and what their gradients need)."""

    def __init__(self, spec, input, weight, bias, tables: LossTables):
        self.spec, self.input, self.weight, self.bias, self.tables = spec, input, weight, bias, tables
        self.cd = compute_dtype(input.dtype)
        self.x_norm = self.x_hat = None
        if spec.head == "cosine":
            self.x_norm = _norm(input)
            self.x_hat = F.normalize(input.to(self.cd), dim=1, eps=NORM_EPS).to(input.dtype)

    def scores(self, c0, c1):
        """``(z, z', w_hat, w_norm)`` of classes ``[c0, c1)``: the head's scores ``z`` and ``z'`` after
        MARC (compute dtype), the chunk's normalised weights (cosine head) and row norms (where used)."""
        spec, t, cd = self.spec, self.tables, self.cd
        w_hat = w_norm = None
        if spec.head == "cosine":
            w = self.weight[c0:c1]
            w_norm = _norm(w)
            w_hat = F.normalize(w.to(cd), dim=1, eps=NORM_EPS).to(w.dtype)
            z = (self.x_hat @ w_hat.t()).to(cd)
        elif spec.head == "linear":
            z = (self.input @ self.weight[c0:c1].t()).to(cd)
            if self.bias is not None:
                z = z + self.bias[c0:c1].to(cd)
            if t.beta is not None:
                w_norm = _norm(self.weight[c0:c1])
        else:
            z = self.input[:, c0:c1].to(cd)
        z_prime = z
        if t.omega is not None:
            z_prime = z_prime * t.omega[c0:c1].to(cd)
        if t.beta is not None:
            norms = w_norm if self.weight is not None else t.class_norms[c0:c1].to(cd)
            z_prime = z_prime + t.beta[c0:c1].to(cd) * norms
        return z, z_prime, w_hat, w_norm


def _slice(table, c0, c1, cd):
    return None if table is None else table[c0:c1].to(cd)


class _LeanMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: MarginLossSpec, chunk: int, input, target, weight, bias, class_margins, logit_offset,
                pair_perturbation, class_weight, omega, beta, class_norms):
        tables = LossTables(class_margins, logit_offset, pair_perturbation, class_weight, omega, beta, class_norms)
        chunks = _Chunks(spec, input, weight, bias, tables)
        cd = chunks.cd
        num_classes = input.shape[1] if spec.head == "logits" else weight.shape[0]
        kept = target != spec.ignore_index
        y = torch.where(kept, target, torch.zeros_like(target))
        track_wrong = class_margins is not None and spec.lambda_elm != 0.0
        merged = None
        for c0 in range(0, num_classes, chunk):
            c1 = min(c0 + chunk, num_classes)
            _, z_prime, _, _ = chunks.scores(c0, c1)
            pair = None if pair_perturbation is None else pair_perturbation[:, c0:c1].to(cd)
            part = block_partials(z_prime, c0, y, kept, spec, offset=_slice(logit_offset, c0, c1, cd), pair=pair,
                                  class_weight=_slice(class_weight, c0, c1, cd), track_wrong=track_wrong)
            merged = part if merged is None else combine(merged, part)
        rows = finish(merged, y, kept, spec, num_classes, class_margins=class_margins, logit_offset=logit_offset,
                      class_weight=None if class_weight is None else class_weight.to(cd))
        if spec.reduction == "mean":
            w_y = class_weight.to(cd)[y] if class_weight is not None else torch.ones_like(rows.loss)
            denom = torch.where(kept, w_y, torch.zeros_like(w_y)).sum()
            loss = rows.loss.sum() / denom
        elif spec.reduction == "sum":
            loss, denom = rows.loss.sum(), None
        else:
            loss, denom = rows.loss, None

        ctx.spec, ctx.chunk, ctx.num_classes = spec, chunk, num_classes
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, target, weight, bias, logit_offset, pair_perturbation, class_weight, omega, beta,
                              class_norms, rows.lse, rows.nll, rows.target_logit, rows.target_grad, denom)
        ctx.mark_non_differentiable(rows.lse, rows.pred, rows.hard)
        return loss, rows.lse, rows.pred, rows.hard

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_pred, _grad_hard):
        (input, target, weight, bias, logit_offset, pair_perturbation, class_weight, omega, beta, class_norms,
         lse, nll, target_logit, target_grad, denom) = ctx.saved_tensors
        if torch.is_grad_enabled():
            raise RuntimeError("the memory-lean path gives first-order gradients only; for create_graph=True "
                               "(double backward, meta-learning) use backend='reference'")
        spec, chunk, num_classes = ctx.spec, ctx.chunk, ctx.num_classes
        (need_input, need_weight, need_bias, need_offset, need_pair, need_omega,
         need_beta) = (ctx.needs_input_grad[i] for i in (2, 4, 5, 7, 8, 10, 11))
        tables = LossTables(None, logit_offset, pair_perturbation, class_weight, omega, beta, class_norms)
        chunks = _Chunks(spec, input, weight, bias, tables)
        cd = chunks.cd
        kept = target != spec.ignore_index
        y = torch.where(kept, target, torch.zeros_like(target))
        rows = y.shape[0]

        grad_loss = grad_loss.to(cd)
        if spec.reduction == "mean":
            g = (grad_loss / denom).expand(rows)
        elif spec.reduction == "sum":
            g = grad_loss.expand(rows)
        else:
            g = grad_loss
        g = torch.where(kept, g, torch.zeros_like(g))
        eps = spec.label_smoothing
        if class_weight is not None:
            w_all = class_weight.to(cd)
            w_y, w_sum = w_all[y], w_all.sum()
        else:
            w_all, w_y, w_sum = None, torch.ones_like(lse), float(num_classes)
        p_y = torch.exp(-nll)
        # dL/dt: (1 - eps) w_y (p_y - 1) + eps / C (W p_y - w_y), p_y - 1 = expm1(-nll) kept precise
        dl_target = g * ((1.0 - eps) * w_y * torch.expm1(-nll) + eps / num_classes * (w_sum * p_y - w_y))

        grad_input = grad_x_acc = None
        if need_input and spec.head != "logits":
            grad_x_acc = torch.zeros(input.shape, dtype=cd, device=input.device)
        elif need_input:
            grad_input = torch.empty_like(input)
        grad_weight = torch.empty_like(weight) if need_weight and weight is not None else None
        grad_bias = torch.empty(num_classes, dtype=cd, device=input.device) if need_bias else None
        grad_offset = torch.empty(num_classes, dtype=cd, device=input.device) if need_offset else None
        grad_pair = torch.empty_like(pair_perturbation) if need_pair else None
        grad_omega = torch.empty(num_classes, dtype=cd, device=input.device) if need_omega else None
        grad_beta = torch.empty(num_classes, dtype=cd, device=input.device) if need_beta else None

        for c0 in range(0, num_classes, chunk):
            c1 = min(c0 + chunk, num_classes)
            z, z_prime, w_hat, w_norm = chunks.scores(c0, c1)
            local_y = y - c0
            own = kept & (local_y >= 0) & (local_y < c1 - c0)   # rows whose target column is in the chunk
            index = local_y.clamp(0, c1 - c0 - 1)[:, None]
            p = z_prime * spec.scale                            # the logits, then p and dL/dl in place
            if logit_offset is not None:
                p += logit_offset[c0:c1].to(cd)[None, :]
            if pair_perturbation is not None:
                p += pair_perturbation[:, c0:c1].to(cd)
            p.sub_(lse[:, None]).exp_()
            # off the target, dl_j = g ((1 - eps) w_y p_j + eps / C (W p_j - w_j)), linear in p_j
            dl = p.mul_((g * ((1.0 - eps) * w_y + eps / num_classes * w_sum))[:, None])
            if eps != 0.0:
                w_j = w_all[c0:c1] if w_all is not None else torch.ones(c1 - c0, dtype=cd, device=dl.device)
                dl.addr_(g * (eps / num_classes), w_j, alpha=-1.0)
            dl.scatter_(1, index, torch.where(own, dl_target, dl.gather(1, index).squeeze(1))[:, None])
            if grad_offset is not None:
                grad_offset[c0:c1] = dl.sum(0)
            if grad_pair is not None:
                out = grad_pair[:, c0:c1]
                out.copy_(dl)
                out.scatter_(1, index, torch.where(own, torch.zeros_like(dl_target),
                                                   out.gather(1, index).squeeze(1).to(cd)).to(out.dtype)[:, None])
            grad = dl.mul_(spec.scale)                                                   # dL/dz'
            grad.scatter_(1, index, torch.where(own, dl_target * target_grad, grad.gather(1, index).squeeze(1))[:, None])
            if grad_omega is not None:
                grad_omega[c0:c1] = (grad * z).sum(0)
            col_sum = grad.sum(0) if (beta is not None or grad_bias is not None) else None
            if grad_beta is not None:
                norms = w_norm if weight is not None else class_norms[c0:c1].to(cd)
                grad_beta[c0:c1] = col_sum * norms
            grad_z = grad * omega[c0:c1].to(cd)[None, :] if omega is not None else grad  # dL/dz
            if grad_bias is not None:
                grad_bias[c0:c1] = grad_z.sum(0)
            if spec.head == "logits":
                if grad_input is not None:
                    grad_input[:, c0:c1] = grad_z.to(input.dtype)
                continue
            gz = grad_z.to(input.dtype)
            rhs = w_hat if spec.head == "cosine" else weight[c0:c1]
            if grad_x_acc is not None:
                if gz.dtype == cd:
                    grad_x_acc.addmm_(gz, rhs)
                else:
                    grad_x_acc += (gz @ rhs).to(cd)
            if grad_weight is not None:
                lhs = chunks.x_hat if spec.head == "cosine" else input
                gw = (gz.t() @ lhs).to(cd)
                if spec.head == "cosine":
                    gw = _project(gw, w_hat.to(cd), w_norm)
                if beta is not None:  # d(beta_j |W_j|)/dW_j = beta_j W_j / |W_j| (0 at W_j = 0)
                    w_c = weight[c0:c1].to(cd)
                    coef = torch.where(w_norm > 0, beta[c0:c1].to(cd) * col_sum / w_norm.clamp_min(NORM_EPS), 0.0)
                    gw = gw + coef[:, None] * w_c
                grad_weight[c0:c1] = gw.to(weight.dtype)

        if grad_x_acc is not None:
            if spec.head == "cosine":
                grad_x_acc = _project(grad_x_acc, chunks.x_hat.to(cd), chunks.x_norm)
            grad_input = grad_x_acc.to(input.dtype)
        as_dtype = lambda t, ref: None if t is None else t.to(ref.dtype)  # noqa: E731
        return (None, None, grad_input, None, grad_weight,
                None if grad_bias is None else grad_bias.to(ctx.bias_dtype), None,
                as_dtype(grad_offset, logit_offset), grad_pair, None, as_dtype(grad_omega, omega),
                as_dtype(grad_beta, beta), None)


def lean_margin_cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                              bias: Optional[torch.Tensor], spec: MarginLossSpec, tables: LossTables,
                              chunk: Optional[int] = None):
    """The loss over class chunks of ``chunk`` classes (:func:`auto_chunk` when None); returns
    ``(loss, lse, pred, hard)`` like the fused path. Inputs must be validated already."""
    num_classes = input.shape[1] if spec.head == "logits" else weight.shape[0]
    if chunk is None:
        chunk = auto_chunk(input.shape[0], num_classes)
    return _LeanMarginCE.apply(spec, int(chunk), input, target, weight, bias, tables.class_margins,
                               tables.logit_offset, tables.pair_perturbation, tables.class_weight, tables.omega,
                               tables.beta, tables.class_norms)
