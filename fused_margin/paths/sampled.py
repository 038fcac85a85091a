"""Negative-class sampling (Partial FC: An et al., "Partial FC: Training 10 Million Identities on a Single
Machine", ICCVW 2021; insightface's arcface_torch ``partial_fc_v2.py``), on one device and on class shards.

Each step keeps every positive class of the (global) batch and a random sample of the other classes, so the
softmax runs over the kept classes only (docs/loss.md section 10): over a block of ``C_b`` classes (the whole
classifier on one device, a rank's shard otherwise) :func:`sample_classes` keeps
``max(ceil(sample_rate C_b), P_b)`` of them, the ``P_b`` positives in the block and negatives drawn uniformly
without replacement, sorted by class index (ties between kept classes still go to the smaller index). The loss
is then the margin loss over the kept classes, with the labels renumbered: DBM's hard positive and ELM's ``c*``
are argmaxes over the kept classes, label smoothing spreads over them, and the class tables are those of the
kept classes. ``sample_rate=1`` keeps every class and is the exact loss.

Only the kept rows of the classifier get a gradient: :func:`gather_rows` gives ``W``'s gradient as a sparse
tensor of those rows (no dense C x D zero-filled copy), or, with ``sparse=False``, as the dense gradient with
zeros elsewhere (Partial FC's own, which every optimizer and weight decay take). Optimizers read the sparse one
as zero elsewhere: with SGD's momentum the unsampled rows keep moving by their momentum, as in Partial FC.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def check_sample_rate(sample_rate) -> float:
    """``sample_rate`` as a float in ``(0, 1]``; a ``ValueError`` (``TypeError`` for a non-number) naming it."""
    from fused_margin.core.options import as_real

    rate = as_real("sample_rate", sample_rate)
    if not math.isfinite(rate) or not 0.0 < rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1] (the fraction of each block's classes kept), got {rate}")
    return rate


def check_generator(generator) -> None:
    """A ``TypeError`` unless ``generator`` is None or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def check_sparse_grad(sparse_grad) -> bool:
    """A ``TypeError`` unless ``sparse_grad`` is a bool."""
    if not isinstance(sparse_grad, bool):
        raise TypeError(f"sparse_grad must be a bool, got {sparse_grad!r}")
    return sparse_grad


def check_class_indices(name: str, values, num_classes: int, device) -> torch.Tensor:
    """``values`` as a 1-D int64 tensor of class indices in ``[0, num_classes)`` on ``device``; a
    ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    indices = torch.as_tensor(values, device=device)
    if indices.dim() != 1 or indices.is_floating_point() or indices.dtype == torch.bool:
        raise TypeError(
            f"{name} must be a 1-D sequence of int class indices, got {indices.dtype} of shape {tuple(indices.shape)}"
        )
    indices = indices.to(torch.int64)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_classes):
        raise ValueError(
            f"{name} must hold class indices in [0, {num_classes}), got values from "
            f"{int(indices.min())} to {int(indices.max())}"
        )
    return indices


def num_sampled(sample_rate: float, num_classes: int) -> int:
    """The classes a block of ``num_classes`` keeps before its positives are counted: ``ceil(rate C_b)``."""
    return min(num_classes, math.ceil(sample_rate * num_classes))


def block_positives(labels: torch.Tensor, start: int, count: int, ignore_index: int) -> torch.Tensor:
    """The distinct labels in ``[start, start + count)`` (sorted, global indices)."""
    mine = (labels != ignore_index) & (labels >= start) & (labels < start + count)
    return torch.unique(labels[mine])


def _with_given(positives: torch.Tensor, sampled_classes: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """The block's positives and the given kept classes that fall in it (sorted, distinct)."""
    chosen = sampled_classes.to(device=positives.device, dtype=torch.int64)
    chosen = chosen[(chosen >= start) & (chosen < start + count)]
    return torch.unique(torch.cat([positives, chosen]))


def sample_classes(
    labels: torch.Tensor,
    start: int,
    count: int,
    sample_rate: float,
    *,
    ignore_index: int = -100,
    sampled_classes: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The kept classes of the block ``[start, start + count)`` (sorted global indices, int64, on ``labels``'
    device): its positives (the labels in it) and, with ``sampled_classes`` (global indices, any order), those of
    them in the block; otherwise ``ceil(sample_rate count) - P`` negatives drawn uniformly without replacement
    (none where the ``P`` positives already fill the sample), with ``generator`` where given."""
    positives = block_positives(labels, start, count, ignore_index)
    if sampled_classes is not None:
        return _with_given(positives, sampled_classes, start, count)
    want = num_sampled(sample_rate, count)
    if positives.numel() >= want:
        return positives
    # a random score per class, the positives above every draw, the top `want` kept (Partial FC's selection)
    device = generator.device if generator is not None else labels.device
    score = torch.rand(count, generator=generator, device=device).to(labels.device)
    score[positives - start] = 2.0
    return torch.sort(torch.topk(score, want, sorted=False).indices + start).values


def kept_count(
    labels: torch.Tensor,
    start: int,
    count: int,
    sample_rate: float,
    *,
    ignore_index: int,
    sampled_classes: Optional[torch.Tensor] = None,
) -> int:
    """How many classes :func:`sample_classes` keeps in the block (known without drawing: every rank can count
    every other rank's kept classes from the global labels)."""
    positives = block_positives(labels, start, count, ignore_index)
    if sampled_classes is not None:
        return int(_with_given(positives, sampled_classes, start, count).numel())
    return max(num_sampled(sample_rate, count), int(positives.numel()))


def remap_labels(labels: torch.Tensor, kept: torch.Tensor, start: int, ignore_index: int, outside: int) -> torch.Tensor:
    """Each label's position among the kept classes ``kept`` (sorted global indices); ``ignore_index`` stays,
    and labels outside the block ``kept`` belongs to become ``outside`` (a value that is neither a position nor
    ``ignore_index``)."""
    position = torch.searchsorted(kept, labels.clamp_min(0))
    found = (labels != ignore_index) & (position < kept.numel())
    found &= kept[position.clamp_max(kept.numel() - 1)] == labels
    out = torch.where(found, position, torch.full_like(labels, outside))
    return torch.where(labels == ignore_index, labels, out)


class _GatherRows(torch.autograd.Function):
    """``weight[index]`` whose gradient is that of the gathered rows (:func:`row_gradient`)."""

    @staticmethod
    def forward(weight, index, sparse):
        return weight.index_select(0, index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, index, sparse = inputs
        ctx.save_for_backward(index)
        ctx.shape, ctx.sparse = weight.shape, sparse

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        if grad is None or not ctx.needs_input_grad[0]:
            return None, None, None
        return row_gradient(index, grad, ctx.shape, ctx.sparse), None, None


def sparse_rows(index: torch.Tensor, rows: torch.Tensor, shape) -> torch.Tensor:
    """A sparse COO tensor of ``shape`` holding ``rows`` at the (distinct) row indices ``index``."""
    return torch.sparse_coo_tensor(index[None], rows, tuple(shape), is_coalesced=True, check_invariants=False)


def row_gradient(index: torch.Tensor, rows: torch.Tensor, shape, sparse: bool) -> torch.Tensor:
    """The gradient of a ``shape`` tensor whose rows ``index`` (distinct) have the gradient ``rows``: sparse
    (:func:`sparse_rows`) or dense with zeros on the other rows."""
    if sparse:
        return sparse_rows(index, rows, shape)
    return rows.new_zeros(tuple(shape)).index_copy_(0, index, rows)


def gather_rows(weight: torch.Tensor, index: torch.Tensor, sparse: bool = True) -> torch.Tensor:
    """``weight[index]`` (``index`` sorted, distinct); ``weight`` gets the gradient of those rows, sparse or
    dense (:func:`row_gradient`)."""
    return _GatherRows.apply(weight, index, sparse)
