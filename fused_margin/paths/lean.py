"""The memory-lean execution of the loss for large vocabularies: never a B x C matrix.

The forward loops over chunks of classes: the GEMM of the features with one chunk of the class
weights, that chunk's partial statistics (:mod:`fused_margin.core.class_split`), and the chunk is dropped;
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

from fused_margin import backends
from fused_margin.core.class_split import Partials, block_partials, combine, empty_partials, finish
from fused_margin.core.reference import compute_dtype
from fused_margin.core.rowmath import target_column_grad
from fused_margin.core.spec import NORM_EPS, LossTables, MarginLossSpec
from fused_margin.paths.fused import _autocast_enabled, first_order_backward, inverse_norms, project_rows_

#: default byte budget for the per-chunk buffers of the lean path (B x chunk elements, several of them).
BUDGET_BYTES = 64 * 2**20
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


def _project_scaled_(grad: torch.Tensor, rows: torch.Tensor, inv_sq: torch.Tensor) -> torch.Tensor:
    """``g - (w . g) / |w|^2 w`` row by row, in place (``inv_sq``: the projection factor of
    :func:`fused_margin.paths.fused.inverse_norms`, 0 below eps, so ``g`` stays there): the normalisation's
    projection for a ``grad`` that already carries ``1 / max(|w|, eps)``; two passes (the dots, then
    :func:`fused_margin.paths.fused.project_rows_`)."""
    dots = torch.linalg.vecdot(rows.to(grad.dtype), grad)
    return project_rows_(grad, rows, (dots * inv_sq).neg_())


def _project(grad: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``(g - (u . g) u) / max(|v|, eps)`` row by row (``g / eps`` where ``|v| < eps``): the Jacobian of
    ``F.normalize`` applied to ``g``; ``grad`` and ``unit`` in the compute dtype."""
    dots = (unit * grad).sum(1, keepdim=True)
    radial = torch.where((norm >= NORM_EPS)[:, None], dots * unit, torch.zeros_like(grad))
    return (grad - radial) / norm.clamp_min(NORM_EPS)[:, None]


class ClassBlock:
    """The classes ``[start, start + count)`` of a loss, computed in chunks of ``chunk`` classes.

    ``weight`` (and a linear head's ``bias``) hold just these classes (row ``c - start`` for class ``c``:
    the whole classifier on one device, a shard of it on a rank); the tables stay the global C-sized
    ones. ``input`` is every row the block sees (a rank's gathered batch). :meth:`partials` gives the
    merged :class:`~fused_margin.core.class_split.Partials` of the block, :meth:`backward` its gradients.
    """

    def __init__(
        self,
        spec: MarginLossSpec,
        input,
        weight,
        bias,
        tables: LossTables,
        *,
        start=0,
        count=None,
        chunk: int,
        kernel: str = "reference",
    ):
        self.spec, self.input, self.weight, self.bias, self.tables = spec, input, weight, bias, tables
        self.kernel = kernel
        #: the backend's chunk kernels (fused_margin.backends.BlockOps), or None: eager torch
        self.ops = backends.get(kernel).block_ops(input.device.type)
        self.start = start
        self.count = (input.shape[1] if spec.head == "logits" else weight.shape[0]) if count is None else count
        self.chunk = chunk
        self.cd = compute_dtype(input.dtype)
        self.x_norm = self.x_hat = self.w_norm = None
        if spec.head == "cosine":
            self.x_norm = _norm(input)
            self.x_hat = F.normalize(input.to(self.cd), dim=1, eps=NORM_EPS).to(input.dtype)
        if spec.head == "cosine" or (tables.beta is not None and weight is not None):
            self.w_norm = _norm(weight)

    def ranges(self):
        """``(c0, c1)`` global class ranges of the chunks, in order."""
        end = self.start + self.count
        return [(c0, min(c0 + self.chunk, end)) for c0 in range(self.start, end, self.chunk)]

    def table(self, table, c0, c1):
        return None if table is None else table[c0:c1].to(self.cd)

    def scores(self, c0, c1):
        """``(z, z', inv_norm, w_norm)`` of classes ``[c0, c1)``: the head's scores ``z`` and ``z'`` after
        MARC (compute dtype), and the chunk's inverse weight norms (cosine head) and norms (where used).
        The cosine head's GEMM runs on the normalised features and the raw weight,
        ``z_ij = (x_hat_i . W_j) / max(|W_j|, eps)``, as the Triton kernels compute it."""
        spec, t, cd = self.spec, self.tables, self.cd
        l0, l1 = c0 - self.start, c1 - self.start
        w_norm = None if self.w_norm is None else self.w_norm[l0:l1]
        inv_norm = None
        if spec.head == "cosine":
            inv_norm = 1.0 / w_norm.clamp_min(NORM_EPS)
            z = (self.x_hat @ self.weight[l0:l1].t()).to(cd) * inv_norm
        elif spec.head == "linear":
            z = (self.input @ self.weight[l0:l1].t()).to(cd)
            if self.bias is not None:
                z = z + self.bias[l0:l1].to(cd)
        else:
            z = self.input[:, l0:l1].to(cd)
        z_prime = z
        if t.omega is not None:
            z_prime = z_prime * t.omega[c0:c1].to(cd)
        if t.beta is not None:
            norms = w_norm if self.weight is not None else t.class_norms[c0:c1].to(cd)
            z_prime = z_prime + t.beta[c0:c1].to(cd) * norms
        return z, z_prime, inv_norm, w_norm

    # ---- the Triton kernels' path: the GEMM on the raw weight, the scales and shifts in the kernels

    def _column_tables(self):
        """``(col_scale, col_shift)`` of the block's classes (local indexing, fp32) for
        ``z' = raw col_scale + col_shift`` with ``raw = x_hat . W_j`` (cosine), ``X . W_j`` (linear) or the
        logits; also the weight norms where used."""
        spec, t, cd = self.spec, self.tables, self.cd
        sl = slice(self.start, self.start + self.count)
        w_norm = self.w_norm
        scale = 1.0 / w_norm.clamp_min(NORM_EPS) if spec.head == "cosine" else None
        shift = self.bias.to(cd) if self.bias is not None else None
        if t.omega is not None:
            omega = t.omega[sl].to(cd)
            scale = omega if scale is None else scale * omega
            shift = None if shift is None else shift * omega
        if t.beta is not None:
            norms = w_norm if self.weight is not None else t.class_norms[sl].to(cd)
            shift = t.beta[sl].to(cd) * norms if shift is None else shift + t.beta[sl].to(cd) * norms
        return scale, shift, w_norm

    def _chunk_buffer(self):
        """A flat buffer of B x chunk elements in the input dtype (None for the logits head), reused by
        every chunk: chunk ``[l0, l1)``'s B x k matrix is its first B k elements, contiguous. One
        allocation a pass instead of one a chunk."""
        if self.spec.head == "logits":
            return None
        rows = self.input.shape[0]
        return torch.empty(rows * min(self.chunk, self.count), dtype=self.input.dtype, device=self.input.device)

    @staticmethod
    def _view(buffer, rows, width):
        return buffer[: rows * width].view(rows, width)

    def _raw(self, l0, l1, buffer=None):
        """The chunk's GEMM output (the logits head: its columns of the input), into ``buffer`` if given."""
        if self.spec.head == "logits":
            return self.input[:, l0:l1]
        x = self.x_hat if self.spec.head == "cosine" else self.input
        w = self.weight[l0:l1]
        if buffer is None:
            return x @ w.t()
        return torch.mm(x, w.t(), out=self._view(buffer, x.shape[0], l1 - l0))

    def _labels(self, y, kept):
        return torch.where(kept, y, torch.full_like(y, self.spec.ignore_index))

    def _kernel_tables(self) -> dict:
        """The chunk kernels' table arguments, the same for every chunk of a pass, so formed once:
        ``col_scale``/``col_shift`` (:meth:`_column_tables`), ``offset`` and ``class_weight`` in the
        accumulation dtype, and the B x C ``pair`` as given for Triton (it loads any float dtype) or in
        the accumulation dtype for the C++ ops."""
        t, cd = self.tables, self.cd
        col_scale, col_shift, _ = self._column_tables()
        pair = t.pair_perturbation
        if pair is not None and self.ops is not None and self.ops.PAIR_IN_COMPUTE_DTYPE:
            pair = pair.to(cd)
        return dict(
            col_scale=col_scale,
            col_shift=col_shift,
            offset=None if t.logit_offset is None else t.logit_offset.to(cd),
            pair=pair,
            class_weight=None if t.class_weight is None else t.class_weight.to(cd),
        )

    def _partials_kernel(self, y, kept) -> Partials:
        class_block = self.ops
        spec, t = self.spec, self.tables
        labels = self._labels(y, kept)
        tables = self._kernel_tables()
        buffers = empty_partials(y.shape[0], y.device, self.cd, class_block.FLAG_DTYPE)
        raw_buffer = self._chunk_buffer()
        for i, (c0, c1) in enumerate(self.ranges()):
            l0 = c0 - self.start
            class_block.block_partials(
                buffers,
                self._raw(l0, c1 - self.start, raw_buffer),
                c0,
                labels,
                first=i == 0,
                scale=spec.scale,
                ignore_index=spec.ignore_index,
                col0=l0,
                **tables,
                track_wrong=t.class_margins is not None and spec.lambda_elm != 0.0,
                smoothing=spec.label_smoothing != 0.0,
            )
        return buffers._replace(has_y=buffers.has_y != 0)

    def _target_terms(self, y, g, nll, num_classes, weights):
        """``(dL/dt, c_i)`` of each row for upstream ``g``: ``dL/dt`` (:func:`~fused_margin.core.rowmath.
        target_column_grad`) and the coefficient ``c_i = g ((1 - eps) w_y + eps W / C)`` of ``p_ij`` off the
        target. ``weights``: ``(w_y, W)`` given by the caller (the class shards: the label's weight from the
        global table, ``W`` over every kept class of every rank), else from this block's class weights (the
        global table) or 1 and ``C``."""
        eps = self.spec.label_smoothing
        w_all = self._kernel_tables()["class_weight"]
        if weights is not None:
            w_y, w_sum = weights
        elif w_all is not None:
            w_y, w_sum = w_all[y], w_all.sum()
        else:
            w_y, w_sum = torch.ones_like(nll), float(num_classes)
        dl_target = g * target_column_grad(nll, w_y, w_sum, eps, num_classes)
        return dl_target, g * ((1.0 - eps) * w_y + eps / num_classes * w_sum)

    def _backward_kernel(self, y, kept, g, nll, target_grad, lse, num_classes, need, weights=None):
        class_block = self.ops
        spec, cd, input, weight = self.spec, self.cd, self.input, self.weight
        eps = spec.label_smoothing
        tables = self._kernel_tables()
        dl_target, row_coef = self._target_terms(y, g, nll, num_classes, weights)
        smooth = g * (eps / num_classes) if eps != 0.0 else None
        target_value = dl_target * target_grad
        labels = self._labels(y, kept)
        w_norm = self.w_norm
        w_inv_sq = None
        if spec.head == "cosine" and "weight" in need:
            w_inv_sq = inverse_norms(w_norm)[1]
        out = {}
        x_acc = None
        if "input" in need:
            if spec.head == "logits":
                out["input"] = torch.empty(input.shape, dtype=input.dtype, device=input.device)
            else:
                x_acc = torch.zeros(input.shape, dtype=cd, device=input.device)
        if "weight" in need:
            out["weight"] = torch.empty(weight.shape, dtype=cd, device=input.device)
        raw_buffer, grad_buffer = self._chunk_buffer(), self._chunk_buffer()
        for c0, c1 in self.ranges():
            l0, l1 = c0 - self.start, c1 - self.start
            raw = self._raw(l0, l1, raw_buffer)
            if spec.head == "logits":
                if "input" not in out:
                    continue
                grad_raw = out["input"][:, l0:l1]
            else:
                grad_raw = self._view(grad_buffer, raw.shape[0], raw.shape[1])
            class_block.block_grad(
                raw,
                c0,
                labels,
                lse,
                row_coef,
                smooth,
                target_value,
                grad_raw,
                scale=spec.scale,
                ignore_index=spec.ignore_index,
                col0=l0,
                **tables,
            )
            if spec.head == "logits":
                continue
            w_chunk = weight[l0:l1]
            if x_acc is not None:
                if grad_raw.dtype == cd:
                    x_acc.addmm_(grad_raw, w_chunk)
                else:
                    x_acc += (grad_raw @ w_chunk).to(cd)
            if "weight" in out:
                rows_of_x = self.x_hat if spec.head == "cosine" else input
                if grad_raw.dtype == cd:  # the GEMM writes the chunk's rows of dW itself
                    gw = torch.mm(grad_raw.t(), rows_of_x, out=out["weight"][l0:l1])
                else:
                    gw = out["weight"][l0:l1]
                    gw.copy_(grad_raw.t() @ rows_of_x)
                if spec.head == "cosine":
                    _project_scaled_(gw, w_chunk, w_inv_sq[l0:l1])
        if x_acc is not None:
            out["input"] = _project(x_acc, self.x_hat.to(cd), self.x_norm) if spec.head == "cosine" else x_acc
        return out

    # ---- both paths

    def partials(self, y, kept) -> Partials:
        if self.ops is not None:
            return self._partials_kernel(y, kept)
        return self._partials_torch(y, kept)

    def backward(self, y, kept, g, nll, target_grad, lse, num_classes, need, weights=None):
        """The gradients of the block for upstream row gradients ``g`` (0 on ignored rows), from the
        finished rows' ``nll``, ``dt/dz'_y`` and ``lse``. ``need``: names among ``input``, ``weight``,
        ``bias``, ``logit_offset``, ``pair_perturbation``, ``omega``, ``beta``. Returns a dict: ``input``
        (fp32/fp64, B x D or the B x block logits), ``weight`` and ``bias`` (this block's rows), and the
        tables' gradients over the global C classes (zero outside the block). The Triton kernels serve
        the gradients of ``input`` and ``weight`` (Triton or C++ kernels); the tables' gradients take the
        eager path. ``weights``: ``(w_y, W)`` where the block cannot form them (see :meth:`_target_terms`)."""
        if self.ops is not None and need <= {"input", "weight"}:
            return self._backward_kernel(y, kept, g, nll, target_grad, lse, num_classes, need, weights)
        return self._backward_torch(y, kept, g, nll, target_grad, lse, num_classes, need, weights)

    def _partials_torch(self, y, kept) -> Partials:
        """The block's partial statistics, chunk by chunk (``y``: labels with ignored rows set to 0)."""
        t, cd = self.tables, self.cd
        track_wrong = t.class_margins is not None and self.spec.lambda_elm != 0.0
        merged = None
        for c0, c1 in self.ranges():
            _, z_prime, _, _ = self.scores(c0, c1)
            pair = None if t.pair_perturbation is None else t.pair_perturbation[:, c0:c1].to(cd)
            part = block_partials(
                z_prime,
                c0,
                y,
                kept,
                self.spec,
                offset=self.table(t.logit_offset, c0, c1),
                pair=pair,
                class_weight=self.table(t.class_weight, c0, c1),
                track_wrong=track_wrong,
            )
            merged = part if merged is None else combine(merged, part)
        return merged

    def _backward_torch(self, y, kept, g, nll, target_grad, lse, num_classes, need, weights=None):
        spec, t, cd, input, weight = self.spec, self.tables, self.cd, self.input, self.weight
        device, count = input.device, self.count
        eps = spec.label_smoothing
        w_all = self._kernel_tables()["class_weight"]
        dl_target, row_coef = self._target_terms(y, g, nll, num_classes, weights)

        out = {}
        x_acc = None
        if "input" in need:
            if spec.head == "logits":
                out["input"] = torch.empty(input.shape, dtype=cd, device=device)
            else:
                x_acc = torch.zeros(input.shape, dtype=cd, device=device)
        if "weight" in need:
            out["weight"] = torch.empty(weight.shape, dtype=cd, device=device)
        if "bias" in need:
            out["bias"] = torch.empty(count, dtype=cd, device=device)
        for name in ("logit_offset", "omega", "beta"):
            if name in need:
                out[name] = torch.zeros(num_classes, dtype=cd, device=device)
        if "pair_perturbation" in need:
            out["pair_perturbation"] = torch.zeros(t.pair_perturbation.shape, dtype=cd, device=device)

        for c0, c1 in self.ranges():
            l0, l1 = c0 - self.start, c1 - self.start
            z, z_prime, inv_norm, w_norm = self.scores(c0, c1)
            local_y = y - c0
            own = kept & (local_y >= 0) & (local_y < c1 - c0)  # rows whose target column is in the chunk
            index = local_y.clamp(0, c1 - c0 - 1)[:, None]
            p = z_prime * spec.scale  # the logits, then p and dL/dl in place
            if t.logit_offset is not None:
                p += t.logit_offset[c0:c1].to(cd)[None, :]
            if t.pair_perturbation is not None:
                p += t.pair_perturbation[:, c0:c1].to(cd)
            p.sub_(lse[:, None]).exp_()
            # off the target, dl_j = g ((1 - eps) w_y p_j + eps / C (W p_j - w_j)), linear in p_j
            dl = p.mul_(row_coef[:, None])
            if eps != 0.0:
                w_j = w_all[c0:c1] if w_all is not None else torch.ones(c1 - c0, dtype=cd, device=device)
                dl.addr_(g * (eps / num_classes), w_j, alpha=-1.0)
            dl.scatter_(1, index, torch.where(own, dl_target, dl.gather(1, index).squeeze(1))[:, None])
            if "logit_offset" in out:
                out["logit_offset"][c0:c1] = dl.sum(0)
            if "pair_perturbation" in out:
                pair_grad = out["pair_perturbation"][:, c0:c1]
                pair_grad.copy_(dl)
                pair_grad.scatter_(
                    1,
                    index,
                    torch.where(own, torch.zeros_like(dl_target), pair_grad.gather(1, index).squeeze(1))[:, None],
                )
            grad = dl.mul_(spec.scale)  # dL/dz'
            grad.scatter_(
                1, index, torch.where(own, dl_target * target_grad, grad.gather(1, index).squeeze(1))[:, None]
            )
            if "omega" in out:
                out["omega"][c0:c1] = (grad * z).sum(0)
            col_sum = grad.sum(0) if (t.beta is not None or "bias" in out) else None
            if "beta" in out:
                out["beta"][c0:c1] = col_sum * (w_norm if weight is not None else t.class_norms[c0:c1].to(cd))
            grad_z = grad * t.omega[c0:c1].to(cd)[None, :] if t.omega is not None else grad  # dL/dz
            if "bias" in out:
                out["bias"][l0:l1] = grad_z.sum(0)
            if spec.head == "logits":
                if "input" in out:
                    out["input"][:, l0:l1] = grad_z
                continue
            w_chunk = weight[l0:l1]
            gz = (grad_z * inv_norm if spec.head == "cosine" else grad_z).to(input.dtype)  # dL/draw
            if x_acc is not None:
                if gz.dtype == cd:
                    x_acc.addmm_(gz, w_chunk)
                else:
                    x_acc += (gz @ w_chunk).to(cd)
            if "weight" in out:
                gw = (gz.t() @ (self.x_hat if spec.head == "cosine" else input)).to(cd)
                if spec.head == "cosine":
                    gw = _project_scaled_(gw, w_chunk, inverse_norms(w_norm)[1])
                if t.beta is not None:  # d(beta_j |W_j|)/dW_j = beta_j W_j / |W_j| (0 at W_j = 0)
                    coef = torch.where(w_norm > 0, t.beta[c0:c1].to(cd) * col_sum / w_norm.clamp_min(NORM_EPS), 0.0)
                    gw = gw + coef[:, None] * w_chunk.to(cd)
                out["weight"][l0:l1] = gw
        if x_acc is not None:
            out["input"] = _project(x_acc, self.x_hat.to(cd), self.x_norm) if spec.head == "cosine" else x_acc
        return out


def reduce_rows(loss_rows, y, kept, class_weight, reduction):
    """``(loss, denom)``: the reduction of docs/loss.md section 4 (``denom`` for ``mean``, else None)."""
    if reduction == "mean":
        w_y = class_weight.to(loss_rows.dtype)[y] if class_weight is not None else torch.ones_like(loss_rows)
        denom = torch.where(kept, w_y, torch.zeros_like(w_y)).sum()
        return loss_rows.sum() / denom, denom
    if reduction == "sum":
        return loss_rows.sum(), None
    return loss_rows, None


def row_grads(grad_loss, denom, kept, reduction, rows, dtype):
    """The upstream gradient of every loss row (0 on ignored rows) from that of the reduced loss."""
    grad_loss = grad_loss.to(dtype)
    if reduction == "mean":
        g = (grad_loss / denom).expand(rows)
    elif reduction == "sum":
        g = grad_loss.expand(rows)
    else:
        g = grad_loss
    return torch.where(kept, g, torch.zeros_like(g))


_GRAD_ORDER = ("input", None, "weight", "bias", None, "logit_offset", "pair_perturbation", None, "omega", "beta", None)


_LEAN_INPUTS = (
    "spec",
    "chunk",
    "kernel",
    "input",
    "target",
    "weight",
    "bias",
    "class_margins",
    "logit_offset",
    "pair_perturbation",
    "class_weight",
    "omega",
    "beta",
    "class_norms",
)


def _lean_first_order_error() -> str:
    return (
        "the memory-lean path (an int class_chunk, or class_chunk='auto' on a large B x C) gives first-order "
        "gradients only; for create_graph=True (double backward, meta-learning) pass double_backward=True to "
        "the loss, or class_chunk='off' with backend='reference'"
    )


class _LeanMarginCE(torch.autograd.Function):
    """``forward`` + ``setup_context`` (what ``torch.func.grad`` and ``vjp`` need); ``forward`` returns, after
    ``(loss, lse, pred, hard)``, the residuals ``(nll, target_grad, denom)`` that ``backward`` needs, which
    the caller drops."""

    @staticmethod
    def forward(
        spec: MarginLossSpec,
        chunk: int,
        kernel: str,
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
    ):
        tables = LossTables(class_margins, logit_offset, pair_perturbation, class_weight, omega, beta, class_norms)
        block = ClassBlock(spec, input, weight, bias, tables, chunk=chunk, kernel=kernel)
        num_classes = block.count
        kept = target != spec.ignore_index
        y = torch.where(kept, target, torch.zeros_like(target))
        rows = finish(
            block.partials(y, kept),
            y,
            kept,
            spec,
            num_classes,
            class_margins=class_margins,
            logit_offset=logit_offset,
            class_weight=None if class_weight is None else class_weight.to(block.cd),
        )
        loss, denom = reduce_rows(rows.loss, y, kept, class_weight, spec.reduction)
        return loss, rows.lse, rows.pred, rows.hard, rows.nll, rows.target_grad, denom

    @staticmethod
    def setup_context(ctx, inputs, output):
        args = dict(zip(_LEAN_INPUTS, inputs))
        _, lse, pred, hard, nll, target_grad, denom = output
        ctx.spec, ctx.chunk, ctx.kernel = args["spec"], args["chunk"], args["kernel"]
        ctx.save_for_backward(*(args[name] for name in _LEAN_INPUTS[3:]), lse, nll, target_grad, denom)
        ctx.mark_non_differentiable(*(t for t in (lse, pred, hard, nll, target_grad, denom) if t is not None))

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError(
            "the memory-lean path does not support torch.func.vmap (its chunk kernels have no "
            "batching rule); use class_chunk='off' with backend='reference' under vmap, or loop"
        )

    @staticmethod
    def backward(ctx, grad_loss, *_grad_outputs):
        device_type = ctx.saved_tensors[0].device.type
        if _autocast_enabled(device_type):
            # a backward inside an autocast region: as the forward, with autocast off (the chunk GEMMs and
            # the row dots of the projection would otherwise be recast to the low-precision dtype)
            with torch.autocast(device_type, enabled=False):
                return _LeanMarginCE._first_order_backward(ctx, grad_loss)
        return _LeanMarginCE._first_order_backward(ctx, grad_loss)

    @staticmethod
    def _first_order_backward(ctx, grad_loss):
        return first_order_backward(
            lambda: _LeanMarginCE._backward(ctx, grad_loss), grad_loss, _lean_first_order_error(), ctx.saved_tensors
        )

    @staticmethod
    def _backward(ctx, grad_loss):
        (
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
            lse,
            nll,
            target_grad,
            denom,
        ) = ctx.saved_tensors
        spec = ctx.spec
        tables = LossTables(class_margins, logit_offset, pair_perturbation, class_weight, omega, beta, class_norms)
        block = ClassBlock(spec, input, weight, bias, tables, chunk=ctx.chunk, kernel=ctx.kernel)
        kept = target != spec.ignore_index
        y = torch.where(kept, target, torch.zeros_like(target))
        g = row_grads(grad_loss, denom, kept, spec.reduction, y.shape[0], block.cd)
        inputs = dict(
            input=input,
            weight=weight,
            bias=bias,
            logit_offset=logit_offset,
            pair_perturbation=pair_perturbation,
            omega=omega,
            beta=beta,
        )
        need = {name for name, flag in zip(_GRAD_ORDER, ctx.needs_input_grad[3:]) if name is not None and flag}
        grads = block.backward(y, kept, g, nll, target_grad, lse, block.count, need)
        return (None, None, None) + tuple(
            None if name is None or name not in grads else grads[name].to(inputs[name].dtype) for name in _GRAD_ORDER
        )


def lean_margin_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    spec: MarginLossSpec,
    tables: LossTables,
    chunk: Optional[int] = None,
    kernel: str = "reference",
):
    """The loss over class chunks of ``chunk`` classes (:func:`auto_chunk` when None); returns
    ``(loss, lse, pred, hard)`` like the fused path. Inputs must be validated already.

    ``kernel``: the backend whose chunk kernels run it (:data:`fused_margin.backends.REGISTRY`):
    ``"reference"`` (eager partials and gradients; any device and dtype), ``"triton"`` (one Triton launch per
    chunk for the partials and one for ``dL/draw``; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``;
    fp16/bf16/fp32), ``"cpu"`` or ``"cuda"`` (the C++ extension's class-block ops, one call each per chunk;
    fp16/bf16/fp32/fp64). A ``RuntimeError`` says why one cannot run here."""
    status = backends.get(kernel).status(input.device, input.dtype, block=True)
    if status != "ok":
        raise RuntimeError(f"kernel={kernel!r} cannot run the memory-lean path here: {status}")
    num_classes = input.shape[1] if spec.head == "logits" else weight.shape[0]
    if chunk is None:
        chunk = auto_chunk(input.shape[0], num_classes)
    return _LeanMarginCE.apply(
        spec,
        int(chunk),
        kernel,
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
    )[:4]
