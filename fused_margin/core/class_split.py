"""The loss of a row computed over blocks of classes: partial statistics, an associative combine, a finish.

A row's loss (docs/loss.md sections 2-4) depends on its classes only through reductions, so the
classes can be split into blocks ``[c0, c1)`` (chunks on one device, or shards on several ranks) and
each block summarised by :class:`Partials`, O(B) numbers per block:

* ``z_max`` / ``z_arg``: the max of ``z'`` over the block and its first global index, in
  ``torch.argmax``'s order (the first NaN wins, ties go to the lower index);
* ``wrong_max`` / ``wrong_arg``: the same over ``j != y`` (ELM's strongest wrong class ``c*``);
* ``z_y``: ``z'_iy`` when ``y`` falls in the block (0 elsewhere), ``has_y`` says where;
* ``l_max``, ``l_sum``: an online logsumexp of the non-target logits ``l_j = s z'_j + a_j + P_j``,
  ``l_sum = sum_j exp(l_j - shift(l_max))`` with ``shift(m) = m`` for finite ``m``, else 0 (the rule of
  ``torch.logsumexp``, so rows with ``+-inf`` or NaN come out as torch's);
* ``dev``, ``weight``: for label smoothing, ``sum_j w_j (shift(l_max) - l_j)`` and ``sum_j w_j`` over the
  non-target classes (every term of ``dev`` is >= 0, so it carries no cancellation).

:func:`combine` merges two partials (associative and, given the global indices, independent of the
order, so the same merge serves chunks and class shards), and :func:`finish` turns the merged
partials of a row into ``pred``, ``hard``, the margin, the target logit, ``lse``, ``nll`` and the loss
row, from O(B) data. ``nll = lse - t`` is formed relative to the larger of the target logit and the
other logits' max (``log1p`` when the target is the max), so confident rows keep full precision
(docs/loss.md section 8).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fused_margin.core import rowmath
from fused_margin.core.spec import MarginLossSpec


class Partials(NamedTuple):
    """Per-row statistics of one block of classes (every field has shape ``(B,)``)."""

    z_max: torch.Tensor
    z_arg: torch.Tensor
    wrong_max: torch.Tensor
    wrong_arg: torch.Tensor
    z_y: torch.Tensor
    has_y: torch.Tensor
    l_max: torch.Tensor
    l_sum: torch.Tensor
    dev: torch.Tensor
    weight: torch.Tensor


class RowResult(NamedTuple):
    """What :func:`finish` gives per row: the loss row (before the reduction; 0 on ignored rows),
    ``lse``, ``nll = lse - t``, ``pred``, ``hard``, the final target logit ``t`` and ``dt/dz'_y``."""

    loss: torch.Tensor
    lse: torch.Tensor
    nll: torch.Tensor
    pred: torch.Tensor
    hard: torch.Tensor
    target_logit: torch.Tensor
    target_grad: torch.Tensor


def empty_partials(rows: int, device, dtype: torch.dtype, flag_dtype: torch.dtype = torch.bool) -> Partials:
    """Uninitialised :class:`Partials` of ``rows`` rows: the running buffers the chunk kernels merge into
    (values in ``dtype``, the argmax indices int64, ``has_y`` in ``flag_dtype``: bool for the C++ ops,
    int8 for Triton's stores)."""
    values = dict(dtype=dtype, device=device)
    index = dict(dtype=torch.int64, device=device)
    return Partials(
        z_max=torch.empty(rows, **values),
        z_arg=torch.empty(rows, **index),
        wrong_max=torch.empty(rows, **values),
        wrong_arg=torch.empty(rows, **index),
        z_y=torch.empty(rows, **values),
        has_y=torch.empty(rows, dtype=flag_dtype, device=device),
        l_max=torch.empty(rows, **values),
        l_sum=torch.empty(rows, **values),
        dev=torch.empty(rows, **values),
        weight=torch.empty(rows, **values),
    )


def lse_shift(m: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp``'s shift: ``m`` where finite, else 0."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def block_partials(
    z: torch.Tensor,
    c0: int,
    target: torch.Tensor,
    kept: torch.Tensor,
    spec: MarginLossSpec,
    *,
    offset: Optional[torch.Tensor] = None,
    pair: Optional[torch.Tensor] = None,
    class_weight: Optional[torch.Tensor] = None,
    track_wrong: bool = False,
) -> Partials:
    """The :class:`Partials` of the block of classes ``[c0, c0 + z.shape[1])``.

    ``z``: ``z'`` of the block (B x k, compute dtype); ``target``: the rows' labels with ignored rows
    set to 0 (as the reference does); ``kept``: rows whose label is not ``ignore_index``;
    ``offset``/``class_weight``: the block's slices of ``a`` and ``w``; ``pair``: the block's columns of
    ``P`` (B x k)."""
    rows, width = z.shape
    local_y = target - c0
    has_y = (local_y >= 0) & (local_y < width)
    own = has_y & kept  # rows whose (kept) target column is in the block
    index = local_y.clamp(0, width - 1)[:, None]
    neg_inf = torch.full_like(z[:, 0], float("-inf"))

    z_arg = z.argmax(1)
    z_max = z.gather(1, z_arg[:, None]).squeeze(1)
    z_at = z.gather(1, index).squeeze(1)
    if track_wrong:
        masked = z.scatter(1, index, torch.where(has_y, neg_inf, z_at)[:, None])
        wrong_arg = masked.argmax(1)
        wrong_max = masked.gather(1, wrong_arg[:, None]).squeeze(1)
        wrong_arg = wrong_arg + c0
    else:
        wrong_arg, wrong_max = z_arg + c0, z_max
    z_y = torch.where(has_y, z_at, torch.zeros_like(z_max))

    logits = z * spec.scale
    if offset is not None:
        logits += offset[None, :]
    if pair is not None:
        logits += pair
    logits.scatter_(1, index, torch.where(own, neg_inf, logits.gather(1, index).squeeze(1))[:, None])
    l_max = logits.amax(1)
    shift = lse_shift(l_max)
    if spec.label_smoothing != 0.0:
        centred = shift[:, None] - logits  # + inf at the target column: zeroed next
        centred.scatter_(
            1, index, torch.where(own, torch.zeros_like(shift), centred.gather(1, index).squeeze(1))[:, None]
        )
        if class_weight is not None:
            dev = centred @ class_weight
            weight = class_weight.sum() - torch.where(own, class_weight[index.squeeze(1)], torch.zeros_like(shift))
        else:
            dev = centred.sum(1)
            weight = width - own.to(shift.dtype)
        del centred
    else:
        dev = weight = None
    l_sum = logits.sub_(shift[:, None]).exp_().sum(1)  # the logits are spent here
    if dev is None:
        dev = weight = torch.zeros_like(l_sum)
    return Partials(z_max, z_arg + c0, wrong_max, wrong_arg, z_y, has_y, l_max, l_sum, dev, weight)


def _argmax_take(a_val, a_idx, b_val, b_idx):
    """Where ``(b_val, b_idx)`` beats ``(a_val, a_idx)`` in ``torch.argmax``'s order: NaN above
    everything (the first NaN wins), then larger values, ties to the lower index."""
    a_nan, b_nan = torch.isnan(a_val), torch.isnan(b_val)
    lower = b_idx < a_idx
    either_nan = b_nan & (~a_nan | lower)
    ordered = (b_val > a_val) | ((b_val == a_val) & lower)
    return torch.where(a_nan | b_nan, either_nan, ordered)


def combine(a: Partials, b: Partials) -> Partials:
    """Merge the partials of two disjoint blocks of classes (associative; ties by global index)."""
    take = _argmax_take(a.z_max, a.z_arg, b.z_max, b.z_arg)
    z_max, z_arg = torch.where(take, b.z_max, a.z_max), torch.where(take, b.z_arg, a.z_arg)
    take_w = _argmax_take(a.wrong_max, a.wrong_arg, b.wrong_max, b.wrong_arg)
    wrong_max = torch.where(take_w, b.wrong_max, a.wrong_max)
    wrong_arg = torch.where(take_w, b.wrong_arg, a.wrong_arg)
    z_y = torch.where(b.has_y, b.z_y, a.z_y)

    nan = torch.isnan(a.l_max) | torch.isnan(b.l_max)
    l_max = torch.maximum(a.l_max, b.l_max)  # propagates NaN
    shift, shift_a, shift_b = lse_shift(l_max), lse_shift(a.l_max), lse_shift(b.l_max)
    zero = torch.zeros_like(l_max)
    l_sum = torch.where(a.l_sum == 0, zero, a.l_sum * torch.exp(shift_a - shift)) + torch.where(
        b.l_sum == 0, zero, b.l_sum * torch.exp(shift_b - shift)
    )
    l_sum = torch.where(nan, l_max, l_sum)
    dev = (
        a.dev
        + torch.where(a.weight == 0, zero, a.weight * (shift - shift_a))
        + b.dev
        + torch.where(b.weight == 0, zero, b.weight * (shift - shift_b))
    )
    return Partials(z_max, z_arg, wrong_max, wrong_arg, z_y, a.has_y | b.has_y, l_max, l_sum, dev, a.weight + b.weight)


def finish(
    p: Partials,
    target: torch.Tensor,
    kept: torch.Tensor,
    spec: MarginLossSpec,
    num_classes: int,
    *,
    class_margins: Optional[torch.Tensor] = None,
    logit_offset: Optional[torch.Tensor] = None,
    class_weight: Optional[torch.Tensor] = None,
) -> RowResult:
    """The rows' results from the partials merged over all ``num_classes`` classes (docs/loss.md
    sections 2-4); ``target`` has ignored rows set to 0, the tables are the full C-sized ones.

    ``lse = log(e^t + sum_{j != y} e^{l_j})`` and ``nll = lse - t``: with ``M`` the other logits' max and
    ``S = sum_{j != y} e^{l_j - M}``, ``nll = log1p(S e^{M - t})`` when ``t >= M`` and
    ``(M - t) + log(S + e^{t - M})`` otherwise (then ``nll >= log 2``), both free of cancellation;
    the loss row is ``(1 - eps) w_y nll + eps / C sum_j w_j (lse - l_j)``."""
    cd = p.l_sum.dtype
    pred = p.z_arg
    hard = kept.clone() if spec.hard_mode == "all" else kept & (pred != target)
    c = p.z_y
    zero = torch.zeros_like(c)
    margin, dmargin_dc = rowmath.target_margin(class_margins, target, hard, c, spec, p.wrong_arg)
    t, t_grad = rowmath.target_logit(c, margin, dmargin_dc, spec)
    if logit_offset is not None:
        t = t + logit_offset.to(cd)[target]

    # lse over {the non-target logits, t}, torch's shift rule (as combine)
    big = torch.maximum(p.l_max, t)
    shift, shift_nt = lse_shift(big), lse_shift(p.l_max)
    total = torch.where(p.l_sum == 0, zero, p.l_sum * torch.exp(shift_nt - shift)) + torch.exp(t - shift)
    total = torch.where(torch.isnan(big), big, total)
    lse_kept = torch.log(total) + shift
    lse = torch.where(kept, lse_kept, torch.log(p.l_sum) + shift_nt)

    nll = rowmath.nll_from_others(t, p.l_max, p.l_sum, lse_kept - t)

    w_y = class_weight.to(cd)[target] if class_weight is not None else torch.ones_like(c)
    eps = spec.label_smoothing
    loss = (1.0 - eps) * w_y * nll
    if eps != 0.0:
        smooth = torch.where(p.weight == 0, p.dev, p.weight * (lse_kept - shift_nt) + p.dev) + w_y * nll
        loss = loss + eps / num_classes * smooth
    return RowResult(
        torch.where(kept, loss, zero),
        lse,
        torch.where(kept, nll, zero),
        pred,
        hard,
        torch.where(kept, t, zero),
        torch.where(kept, t_grad, zero),
    )
