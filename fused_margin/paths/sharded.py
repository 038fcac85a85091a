"""Class-sharded margin loss over ``torch.distributed``: the classifier split across ranks by class.

Where one device cannot hold the classifier (face recognition with millions of identities), each rank
holds the classes ``[class_start, class_start + C_r)`` of ``W`` and the softmax over all ``C`` classes
is computed with collectives (docs/loss.md section 9). Per forward and backward:

1. ``all_reduce(MAX)`` of a few integers per rank: whether the rank's own argument checks failed, its row
   count and shard range, and what all ranks must pass alike (the feature size, the dtype, ``num_classes``,
   the head, each scalar option, an exact fingerprint of each class table's bits, the tables' finiteness),
   so that every rank raises the same error, naming the rank, the option and each rank's value (no rank
   waits forever on a rank that raised alone; only on that error path a second collective gathers the
   messages);
2. ``all_gather`` of the features with the labels packed into their rows (the labels' bytes viewed as
   extra feature columns; no arithmetic touches them), padded to the largest row count;
3. each rank computes the partial statistics of its shard for every gathered row (chunked when the
   shard is large, :class:`fused_margin.paths.lean.ClassBlock`): max and first index of ``z'``, the same off
   the target (ELM's ``c*``), ``z'_y`` where the label is in the shard, the non-target logsumexp and
   the label-smoothing sums;
4. ``all_gather`` of those partials (O(B) numbers per rank); every rank merges them with the
   associative combine of :mod:`fused_margin.core.class_split` (ties to the smaller global class index, as a
   single pass) and finishes the rows: the loss of the whole global batch over all C classes, the same
   on every rank;
5. backward: each rank forms ``dL/dz'`` of its shard from the saved row statistics, writes its shard's
   weight gradient, and one reduction (``reduce_scatter`` with NCCL, ``all_reduce`` and a slice with
   gloo) returns to each rank the gradient of its own input rows.

Memory per rank: the gathered features ``B_g x D``, the shard and its gradient ``C_r x D``, and chunk
buffers ``B_g x chunk`` (at most about 64 MiB by default); no ``B_g x C_r`` matrix. Partial FC's
model-parallel loss (insightface) instead stores ``B_g x C_r`` logits per rank.

Within a step, everything the single-device loss supports for class tables works here (class margins,
DBM instance margin, ELM, logit offset, class weights, label smoothing over the global C,
``ignore_index``, every reduction); tables are the global C-sized ones and are constants (no gradient).
Trainable tables, MARC's ``omega``/``beta``, ``pair_perturbation``, the logits head and a bias are not
supported here and raise.
"""

from __future__ import annotations

import math
import zlib
from typing import Dict, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from fused_margin import backends
from fused_margin.core import options
from fused_margin.core.class_split import Partials, combine, finish
from fused_margin.core.options import as_real
from fused_margin.core.reference import compute_dtype
from fused_margin.core.spec import LossTables, MarginAux, MarginLossSpec
from fused_margin.functional import finite_error
from fused_margin.paths.fused import first_order_backward
from fused_margin.paths.lean import BUDGET_BYTES, ClassBlock, auto_chunk, reduce_rows, row_grads
from fused_margin.paths.sampled import (
    check_class_indices,
    check_generator,
    check_sample_rate,
    check_sparse_grad,
    kept_count,
    remap_labels,
    row_gradient,
    sample_classes,
)

__all__ = ["sharded_margin_cross_entropy", "ShardedCosineClassifier", "even_shards"]

#: the loss's options the sharded loss takes (every one but the logits head's): fused_margin.core.options
_SPEC_OPTIONS = tuple(option.name for option in options.OPTIONS if option.name != "input_is_cosine")
_TABLES = ("class_margins", "logit_offset", "class_weight")
_UNSUPPORTED = ("bias", "pair_perturbation", "omega", "beta", "class_norms", "input_is_cosine")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def even_shards(num_classes: int, world_size: int):
    """``[(class_start, count)]`` per rank: ``num_classes`` split as evenly as possible, the first
    ``num_classes % world_size`` ranks one class more."""
    if num_classes < world_size:
        raise ValueError(
            f"num_classes ({num_classes}) must be at least the world size ({world_size}): every "
            "rank holds one class or more"
        )
    base, extra = divmod(num_classes, world_size)
    starts, out = 0, []
    for rank in range(world_size):
        count = base + (rank < extra)
        out.append((starts, count))
        starts += count
    return out


def _world(group):
    return dist.get_world_size(group), dist.get_rank(group)


class _Call(NamedTuple):
    """One rank's checked call: what every rank must agree on, and what it passes to the loss."""

    input: torch.Tensor
    target: torch.Tensor
    weight_shard: torch.Tensor
    class_start: int
    num_classes: int
    chunk: Optional[int]
    spec: MarginLossSpec
    tables: Dict[str, Optional[torch.Tensor]]
    sampling: Optional[_Sampling]


class _Sampling(NamedTuple):
    """Partial FC's negative-class sampling of a call (fused_margin.paths.sampled)."""

    rate: float
    classes: Optional[torch.Tensor]  # the kept classes given explicitly (global indices), or None
    generator: Optional[torch.Generator]
    sparse: bool  # the weight's gradient: sparse, or dense with zeros off the kept rows


class _BlockView(NamedTuple):
    """What this rank's class block computes on: its whole shard, or the kept classes of it (``kept``, sorted
    global indices; the block then numbers them from 0, its labels are positions among them, its tables
    their entries, and the softmax runs over ``num_classes`` kept classes of all ranks)."""

    weight: torch.Tensor
    tables: LossTables
    y: torch.Tensor  # the block's labels (ignored rows 0)
    start: int
    count: int
    kept: Optional[torch.Tensor]
    num_classes: int


def _block_view(
    spec,
    labels,
    kept_rows,
    weight_shard,
    tables: LossTables,
    class_start,
    num_classes,
    sampling,
    starts,
    counts,
    kept=None,
) -> _BlockView:
    """The block of this rank (see :class:`_BlockView`); with sampling, ``kept`` is drawn here unless given
    (the backward's, saved by the forward)."""
    zero = torch.zeros_like(labels)
    if sampling is None:
        y = torch.where(kept_rows, labels, zero)
        return _BlockView(weight_shard, tables, y, class_start, weight_shard.shape[0], None, num_classes)
    ignore, count = spec.ignore_index, weight_shard.shape[0]
    if kept is None:
        kept = sample_classes(
            labels,
            class_start,
            count,
            sampling.rate,
            ignore_index=ignore,
            sampled_classes=sampling.classes,
            generator=sampling.generator,
        )
    total = sum(
        kept_count(labels, s, c, sampling.rate, ignore_index=ignore, sampled_classes=sampling.classes)
        for s, c in zip(starts, counts)
    )
    y = torch.where(kept_rows, remap_labels(labels, kept, class_start, ignore, outside=kept.numel()), zero)
    m = tables.class_margins
    used = LossTables(
        class_margins=m if m is None or m.dim() == 0 else m.index_select(0, kept),
        logit_offset=None if tables.logit_offset is None else tables.logit_offset.index_select(0, kept),
        class_weight=None if tables.class_weight is None else tables.class_weight.index_select(0, kept),
    )
    weight = weight_shard.index_select(0, kept - class_start)
    return _BlockView(weight, used, y, 0, kept.numel(), kept, total)


def _weight_sum(spec: MarginLossSpec, merged: Partials, view: _BlockView, class_weight) -> Optional[torch.Tensor]:
    """The class weights summed over the kept classes of every rank but the row's label (per row), from which
    the backward of a sampled block forms ``W`` with label smoothing and class weights; None otherwise."""
    if view.kept is None or class_weight is None or spec.label_smoothing == 0.0:
        return None
    return merged.weight


def _class_indices(partials: Partials, kept: torch.Tensor, spec: MarginLossSpec, tables: LossTables) -> Partials:
    """A sampled block's partials with their argmax positions as class indices (the wrong-class ones where
    they are tracked)."""
    partials = partials._replace(z_arg=kept[partials.z_arg])
    if tables.class_margins is not None and spec.lambda_elm != 0.0:
        partials = partials._replace(wrong_arg=kept[partials.wrong_arg])
    return partials


_FINGERPRINT_MODULUS = (1 << 61) - 1  # a prime; keeps a fingerprint and its negation inside int64


def _option_fingerprint(value) -> int:
    """An exact fingerprint of a scalar option (``repr`` round-trips floats)."""
    return zlib.crc32(repr(value).encode())


def _table_fingerprint(table: Optional[torch.Tensor]) -> torch.Tensor:
    """An exact fingerprint of a table's bits, on its device (no host sync): the sum of each entry's bits
    times an odd multiplier of its position, in wrapping int64 arithmetic (exact in any summation order),
    folded under :data:`_FINGERPRINT_MODULUS`; -1 for an absent table."""
    if table is None:
        return torch.tensor(-1, dtype=torch.int64)
    flat = table.detach().contiguous().view(-1)
    bits = flat.view(torch.int64 if flat.element_size() == 8 else torch.int32).to(torch.int64)
    positions = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
    mixed = (bits * (positions * 2654435761 | 1)).sum() + bits.numel()
    return torch.remainder(mixed, _FINGERPRINT_MODULUS)


def _agreement_items(call: _Call):
    """``[(name, value)]``: what every rank must pass alike, as int64 (0-d tensors for the tables, computed on
    their device), in a fixed order."""
    items = [
        ("the feature size D", call.input.shape[1]),
        ("num_classes", call.num_classes),
        ("the dtype", _DTYPES.index(call.input.dtype)),
        ("head", _option_fingerprint(call.spec.head)),
    ]
    items += [(name, _option_fingerprint(getattr(call.spec, name))) for name in _SPEC_OPTIONS]
    items += [(name, _table_fingerprint(call.tables.get(name))) for name in _TABLES]
    sampling = call.sampling or _Sampling(1.0, None, None, True)
    items += [
        ("sample_rate", _option_fingerprint(sampling.rate)),
        ("sampled_classes", _table_fingerprint(sampling.classes)),
    ]
    items += [
        (
            f"{name} finite",
            (torch.isfinite(call.tables[name]).all() if call.tables.get(name) is not None else torch.tensor(True)).to(
                torch.int64
            ),
        )
        for name in _TABLES
    ]
    return items


def _agreement_count() -> int:
    """How many items :func:`_agreement_items` gives (a rank whose checks failed sends that many zeros)."""
    return 4 + len(_SPEC_OPTIONS) + len(_TABLES) + 2 + len(_TABLES)


def _describe(call: Optional[_Call], name: str) -> str:
    """This rank's value of agreement item ``name``, for a message."""
    if call is None:
        return "-"
    if name == "the feature size D":
        return str(call.input.shape[1])
    if name == "num_classes":
        return str(call.num_classes)
    if name == "the dtype":
        return str(call.input.dtype)
    if name in _TABLES or name == "sampled_classes":
        table = call.tables.get(name) if name in _TABLES else (call.sampling.classes if call.sampling else None)
        return "not given" if table is None else f"a table with fingerprint {int(_table_fingerprint(table))}"
    if name == "sample_rate":
        return repr(call.sampling.rate if call.sampling else 1.0)
    return repr(getattr(call.spec, name))


def _collective_device(call: Optional[_Call], group) -> torch.device:
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    return call.input.device if call is not None else torch.device("cuda", torch.cuda.current_device())


def _agree(call: Optional[_Call], error: Optional[Exception], group):
    """The first collective of every call, one ``all_reduce(MAX)``: every rank learns whether any rank's
    local checks failed (``error``), every rank's row count and shard range, and whether the ranks agree on
    the feature size, the dtype, ``num_classes``, the head, each scalar option and each class table (an
    exact fingerprint of its bits), and whether the tables are finite. Where any of that fails, every rank
    raises the same error, naming the rank, the option and each rank's value (a second collective, only
    then, gathers the messages). Returns ``(rows, starts, counts)`` per rank."""
    world, rank = _world(group)
    device = _collective_device(call, group)
    ok = call is not None
    per_rank = torch.full((4, world), -1, dtype=torch.int64)
    per_rank[:, rank] = torch.tensor(
        [
            int(not ok),
            call.input.shape[0] if ok else 0,
            call.class_start if ok else 0,
            call.weight_shard.shape[0] if ok else 0,
        ]
    )
    names, agree = [], torch.zeros(_agreement_count(), dtype=torch.int64, device=device)
    if ok:
        items = _agreement_items(call)
        names = [name for name, _ in items]
        agree = torch.stack([torch.as_tensor(value, dtype=torch.int64).to(device) for _, value in items])
    meta = torch.cat([agree, -agree, per_rank.flatten().to(device)])
    dist.all_reduce(meta, op=dist.ReduceOp.MAX, group=group)
    meta = meta.cpu()
    k = agree.numel()
    high, low = meta[:k], -meta[k : 2 * k]
    failed, rows, starts, counts = meta[2 * k :].view(4, world).tolist()

    if any(failed):
        gathered = [None] * world
        dist.all_gather_object(gathered, None if ok else (type(error).__name__, str(error)), group=group)
        bad = [(r, kind, message) for r, entry in enumerate(gathered) if entry is not None for kind, message in [entry]]
        kind = {"TypeError": TypeError, "ValueError": ValueError}.get(bad[0][1], RuntimeError)
        text = "; ".join(f"rank {r}: {message}" for r, _, message in bad)
        raise kind(f"sharded_margin_cross_entropy: {text}") from error
    differ = [name for name, hi, lo in zip(names, high.tolist(), low.tolist()) if hi != lo]
    if differ:
        gathered = [None] * world
        dist.all_gather_object(
            gathered, {name: _describe(call, name) for name in differ if not name.endswith(" finite")}, group=group
        )
        parts = []
        for name in differ:
            if name.endswith(" finite"):
                continue  # follows from a table that differs
            values = ", ".join(f"rank {r}: {gathered[r][name]}" for r in range(world))
            parts.append(f"{name} ({values})")
        raise ValueError(f"sharded_margin_cross_entropy: the ranks disagree on {'; '.join(parts)}")
    for name, value in zip(names, high.tolist()):
        if name.endswith(" finite") and value == 0:
            table_name = name[: -len(" finite")]
            raise finite_error(table_name, call.tables[table_name])

    order = sorted(range(world), key=lambda r: starts[r])
    expected = 0
    for r in order:
        if counts[r] < 1 or starts[r] != expected:
            shards = ", ".join(f"rank {q}: [{starts[q]}, {starts[q] + counts[q]})" for q in range(world))
            raise ValueError(
                f"sharded_margin_cross_entropy: the weight shards must tile [0, {call.num_classes}) "
                f"without gaps or overlaps, each with one class or more; got {shards}"
            )
        expected += counts[r]
    if expected != call.num_classes:
        raise ValueError(
            f"sharded_margin_cross_entropy: the shards cover {expected} classes but num_classes is {call.num_classes}"
        )
    return rows, starts, counts


def _gather_rows(input, target, rows, group):
    """``all_gather`` of every rank's rows with their labels packed in: ``(X_g, y_g)`` in rank order."""
    world, _ = _world(group)
    width = 8 // input.element_size()  # an int64 label as that many feature elements (bytes, not values)
    most = max(rows)
    packed = input.new_zeros((most, input.shape[1] + width))
    packed[: input.shape[0], : input.shape[1]] = input
    packed[: input.shape[0], input.shape[1] :] = target.contiguous().view(input.dtype).view(-1, width)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    parts = [g[:n] for g, n in zip(gathered, rows)]
    full = torch.cat(parts)
    features = full[:, : input.shape[1]].contiguous()
    labels = full[:, input.shape[1] :].contiguous().view(torch.int64).view(-1)
    return features, labels


_FLOAT_FIELDS = ("z_max", "wrong_max", "z_y", "l_max", "l_sum", "dev", "weight")
_INT_FIELDS = ("z_arg", "wrong_arg")


def _pack_partials(p: Partials) -> torch.Tensor:
    """The partials as one flat tensor of their float dtype (the int64 indices bit-viewed, exactly)."""
    dtype = p.l_sum.dtype
    floats = [getattr(p, name) for name in _FLOAT_FIELDS] + [p.has_y.to(dtype)]
    ints = [getattr(p, name).contiguous().view(dtype) for name in _INT_FIELDS]
    return torch.cat(floats + ints)


def _unpack_partials(flat: torch.Tensor, rows: int) -> Partials:
    dtype = flat.dtype
    per_int = 8 // flat.element_size()
    fields = {}
    offset = 0
    for name in _FLOAT_FIELDS:
        fields[name] = flat[offset : offset + rows]
        offset += rows
    fields["has_y"] = flat[offset : offset + rows] != 0
    offset += rows
    for name in _INT_FIELDS:
        fields[name] = flat[offset : offset + rows * per_int].contiguous().view(torch.int64)
        offset += rows * per_int
    del dtype
    return Partials(**fields)


def _check_labels(labels, num_classes, ignore_index, rows):
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if labels.device.type != "cpu":
        torch._assert_async(
            ~bad.any(), "sharded_margin_cross_entropy: a label is outside [0, num_classes) and not ignore_index"
        )
        return
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        rank, start = 0, 0
        while i >= start + rows[rank]:
            start += rows[rank]
            rank += 1
        raise ValueError(
            f"sharded_margin_cross_entropy: target[{i - start}] = {int(labels[i])} on rank {rank} is "
            f"out of range: labels must be in [0, {num_classes}) or equal ignore_index ({ignore_index})"
        )


_SHARDED_INPUTS = (
    "spec",
    "group",
    "rows",
    "starts",
    "counts",
    "class_start",
    "num_classes",
    "chunk",
    "kernel",
    "sampling",
    "input_grad_scale",
    "input",
    "target",
    "weight_shard",
    "class_margins",
    "logit_offset",
    "class_weight",
)


def _sharded_first_order_error() -> str:
    return "the class-sharded loss gives first-order gradients only (no create_graph=True, no nested torch.func.grad)"


class _ShardedMarginCE(torch.autograd.Function):
    """``forward`` + ``setup_context`` (what ``torch.func.grad`` and ``vjp`` need); ``forward`` returns, after
    ``(loss, lse, pred, hard)``, the residuals ``backward`` needs (the gathered rows and labels, the rows'
    statistics), which the caller drops."""

    @staticmethod
    def forward(
        spec,
        group,
        rows,
        starts,
        counts,
        class_start,
        num_classes,
        chunk,
        kernel,
        sampling,
        input_grad_scale,
        input,
        target,
        weight_shard,
        class_margins,
        logit_offset,
        class_weight,
    ):
        features, labels = _gather_rows(input, target, rows, group)
        _check_labels(labels, num_classes, spec.ignore_index, rows)
        tables = LossTables(class_margins=class_margins, logit_offset=logit_offset, class_weight=class_weight)
        kept = labels != spec.ignore_index
        y = torch.where(kept, labels, torch.zeros_like(labels))
        view = _block_view(spec, labels, kept, weight_shard, tables, class_start, num_classes, sampling, starts, counts)
        block = ClassBlock(
            spec,
            features,
            view.weight,
            None,
            view.tables,
            start=view.start,
            count=view.count,
            chunk=chunk,
            kernel=kernel,
        )
        local = block.partials(view.y, kept)
        if view.kept is not None:
            local = _class_indices(local, view.kept, spec, view.tables)

        world, rank = _world(group)
        packed = _pack_partials(local)
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed, group=group)
        merged = None
        for r in sorted(range(world), key=lambda q: starts[q]):
            part = _unpack_partials(gathered[r], features.shape[0])
            merged = part if merged is None else combine(merged, part)
        cd = block.cd
        result = finish(
            merged,
            y,
            kept,
            spec,
            view.num_classes,
            class_margins=class_margins,
            logit_offset=logit_offset,
            class_weight=None if class_weight is None else class_weight.to(cd),
        )
        loss, denom = reduce_rows(result.loss, y, kept, class_weight, spec.reduction)
        return (
            loss,
            result.lse,
            result.pred,
            result.hard,
            features,
            labels,
            result.nll,
            result.target_grad,
            denom,
            view.kept,
            _weight_sum(spec, merged, view, class_weight),
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        args = dict(zip(_SHARDED_INPUTS, inputs))
        loss, lse, pred, hard, features, labels, nll, target_grad, denom, kept, weight_sum = output
        ctx.spec, ctx.group, ctx.rows = args["spec"], args["group"], args["rows"]
        ctx.starts, ctx.counts, ctx.sampling = args["starts"], args["counts"], args["sampling"]
        ctx.class_start, ctx.num_classes = args["class_start"], args["num_classes"]
        ctx.chunk, ctx.kernel = args["chunk"], args["kernel"]
        ctx.input_grad_scale, ctx.input_dtype = args["input_grad_scale"], args["input"].dtype
        ctx.save_for_backward(
            features,
            labels,
            args["weight_shard"],
            args["class_margins"],
            args["logit_offset"],
            args["class_weight"],
            lse,
            nll,
            target_grad,
            denom,
            kept,
            weight_sum,
        )
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError(
            "the class-sharded loss does not support torch.func.vmap (its collectives and chunk "
            "kernels have no batching rule); loop over the batch instead"
        )

    @staticmethod
    def backward(ctx, grad_loss, *_grad_outputs):
        return first_order_backward(
            lambda: _ShardedMarginCE._backward(ctx, grad_loss),
            grad_loss,
            _sharded_first_order_error(),
            ctx.saved_tensors,
        )

    @staticmethod
    def _backward(ctx, grad_loss):
        (
            features,
            labels,
            weight_shard,
            class_margins,
            logit_offset,
            class_weight,
            lse,
            nll,
            target_grad,
            denom,
            kept_classes,
            weight_sum,
        ) = ctx.saved_tensors
        spec, group = ctx.spec, ctx.group
        tables = LossTables(class_margins=class_margins, logit_offset=logit_offset, class_weight=class_weight)
        kept = labels != spec.ignore_index
        view = _block_view(
            spec,
            labels,
            kept,
            weight_shard,
            tables,
            ctx.class_start,
            ctx.num_classes,
            ctx.sampling,
            ctx.starts,
            ctx.counts,
            kept=kept_classes,
        )
        block = ClassBlock(
            spec,
            features,
            view.weight,
            None,
            view.tables,
            start=view.start,
            count=view.count,
            chunk=ctx.chunk,
            kernel=ctx.kernel,
        )
        g = row_grads(grad_loss, denom, kept, spec.reduction, labels.shape[0], block.cd)
        need = dict(zip(_SHARDED_INPUTS, ctx.needs_input_grad))
        need_input, need_weight = need["input"], need["weight_shard"]
        wanted = {"input"} | ({"weight"} if need_weight else set())  # every rank takes part in the reduction
        weights = None
        if view.kept is not None and class_weight is not None:  # the label's weight and W over every kept class
            w_y = class_weight.to(block.cd)[torch.where(kept, labels, torch.zeros_like(labels))]
            weights = (w_y, w_y if weight_sum is None else weight_sum + w_y)  # the partials' W leaves out w_y
        grads = block.backward(view.y, kept, g, nll, target_grad, lse, view.num_classes, wanted, weights)

        # dL/dX_g summed over the shards, then each rank's own rows
        world, rank = _world(group)
        rows = ctx.rows
        most = max(rows)
        padded = grads["input"].new_zeros((world * most, features.shape[1]))
        start = 0
        for r, n in enumerate(rows):
            padded[r * most : r * most + n] = grads["input"][start : start + n]
            start += n
        if dist.get_backend(group) == "nccl":
            own = padded.new_empty((most, features.shape[1]))
            dist.reduce_scatter_tensor(own, padded, group=group)
        else:
            dist.all_reduce(padded, group=group)
            own = padded[rank * most : (rank + 1) * most]
        grad_input = None
        if need_input:
            grad_input = own[: rows[rank]]
            if ctx.input_grad_scale != 1.0:
                grad_input = grad_input * ctx.input_grad_scale
            grad_input = grad_input.to(ctx.input_dtype)
        grad_weight = None
        if need_weight:
            grad_weight = grads["weight"].to(weight_shard.dtype)
            if view.kept is not None:  # the kept rows only, sparse or zero-filled (Partial FC's update)
                grad_weight = row_gradient(
                    view.kept - ctx.class_start, grad_weight, weight_shard.shape, ctx.sampling.sparse
                )
        grads_by_name = dict(input=grad_input, weight_shard=grad_weight)
        return tuple(grads_by_name.get(name) for name in _SHARDED_INPUTS)


def sharded_margin_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight_shard: torch.Tensor,
    *,
    class_start: int,
    num_classes: int,
    process_group=None,
    head: str = "cosine",
    class_chunk: Optional[int] = None,
    backbone_ddp: bool = False,
    return_aux: bool = False,
    margin: Optional[float] = None,
    sample_rate: float = 1.0,
    sampled_classes=None,
    generator: Optional[torch.Generator] = None,
    sparse_grad: bool = True,
    **margin_kwargs,
):
    r"""The margin loss of :func:`fused_margin.margin_cross_entropy` with the classifier sharded by class.

    Args:
        input: this rank's rows of the batch, B_r x D (ranks may hold different numbers of rows).
        target: this rank's labels (B_r, int64), global class indices in ``[0, num_classes)`` or
            ``ignore_index``.
        weight_shard: the classes ``[class_start, class_start + C_r)`` of the C x D classifier.
        class_start, num_classes: where this shard starts, and the global C. The shards of all ranks
            must tile ``[0, num_classes)`` (any order of ranks, uneven sizes allowed).
        process_group: the group of ranks sharing the classifier (default: the world).
        head: ``"cosine"`` (default; ``X_i . W_j / (|X_i| |W_j|)``) or ``"linear"`` (no bias).
        class_chunk: classes per chunk inside a shard (default: from a 64 MiB budget).
        backbone_ddp: ``True`` when ``input`` comes from a backbone wrapped in
            ``DistributedDataParallel``: DDP averages the backbone's gradients over the ranks, so the
            input gradient is multiplied by the world size and the average comes out as the gradient of
            the global loss (the weight shard's gradient is left as it is).
        return_aux: also return :class:`fused_margin.MarginAux` for the global batch.
        margin: one margin for every class (ArcFace's and CosFace's ``m``), instead of a C-sized
            ``class_margins`` table (40 MB at 10M classes in fp32).
        sample_rate: Partial FC's negative-class sampling (docs/loss.md section 10): below 1, each rank keeps
            the positive classes of the global batch that fall in its shard and samples other classes of the
            shard up to ``ceil(sample_rate C_r)``; the loss is the margin loss over the kept classes of all
            ranks (``aux.pred`` the argmax over them, as a class index), and ``weight_shard`` gets a sparse
            gradient of its kept rows. 1 (the default) keeps every class: the exact loss. Every rank must pass
            the same rate (it is checked).
        sampled_classes: the kept classes given explicitly (global class indices, the same on every rank; the
            positives are added), for tests and reproducibility. ``generator``: the ``torch.Generator`` of this
            rank's sampling.
        sparse_grad: with sampling, ``weight_shard``'s gradient as a sparse tensor of the kept rows (the
            default; SGD with momentum and SparseAdam take it, weight decay and Adam(W) do not) or, with
            False, dense with zeros on the other rows (Partial FC's update, for any optimizer).
        margin_kwargs: the scalar options and class tables of ``margin_cross_entropy`` (``scale``,
            ``class_margins``, ``margin_type``, ``lambda_inst``, ``hard_mode``, ``lambda_elm``,
            ``angular_fold``, ``margin_grad``, ``logit_offset``, ``class_weight``, ``reduction``,
            ``ignore_index``, ``label_smoothing``); the tables are the global C-sized ones.

    Returns, on every rank, the loss of the whole global batch (rows in rank order) over all C classes,
    equal to ``margin_cross_entropy`` on the concatenated rows and weight; ``backward()`` gives each rank
    the gradients of its own rows and of its own shard.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "sharded_margin_cross_entropy needs torch.distributed to be initialised (dist.init_process_group)"
        )
    group = process_group if process_group is not None else dist.group.WORLD
    try:  # this rank's own checks; their outcome is part of the first collective, so every rank raises alike
        sampling = dict(
            margin=margin,
            sample_rate=sample_rate,
            sampled_classes=sampled_classes,
            generator=generator,
            sparse_grad=sparse_grad,
        )
        call, error = (
            _check_call(
                input, target, weight_shard, class_start, num_classes, head, class_chunk, margin_kwargs, **sampling
            ),
            None,
        )
    except (TypeError, ValueError) as caught:
        call, error = None, caught
    rows, starts, counts = _agree(call, error, group)
    world, _ = _world(group)
    scale = float(world) if backbone_ddp else 1.0
    chunk = call.chunk if call.chunk is not None else auto_chunk(sum(rows), weight_shard.shape[0], BUDGET_BYTES)
    kernel = backends.block_backend(input.device, input.dtype).name
    tables = call.tables
    loss, lse, pred, hard = _ShardedMarginCE.apply(
        call.spec,
        group,
        rows,
        starts,
        counts,
        class_start,
        num_classes,
        chunk,
        kernel,
        call.sampling,
        scale,
        input,
        target,
        weight_shard,
        tables.get("class_margins"),
        tables.get("logit_offset"),
        tables.get("class_weight"),
    )[:4]
    return (loss, MarginAux(lse, pred, hard)) if return_aux else loss


def _check_call(
    input,
    target,
    weight_shard,
    class_start,
    num_classes,
    head,
    class_chunk,
    margin_kwargs,
    *,
    margin=None,
    sample_rate=1.0,
    sampled_classes=None,
    generator=None,
    sparse_grad=True,
) -> _Call:
    """This rank's arguments checked (a ``TypeError``/``ValueError`` naming the bad one) and normalised."""
    margin_kwargs = dict(margin_kwargs)
    for name in _UNSUPPORTED:
        if margin_kwargs.get(name) is not None and margin_kwargs.get(name) is not False:
            raise ValueError(
                f"sharded_margin_cross_entropy does not support {name}; use margin_cross_entropy on one device for it"
            )
        margin_kwargs.pop(name, None)
    margin_kwargs.pop("backend", None)
    unknown = set(margin_kwargs) - set(_SPEC_OPTIONS) - set(_TABLES)
    if unknown:
        raise TypeError(f"sharded_margin_cross_entropy got unexpected keyword argument(s) {sorted(unknown)}")
    if head not in ("cosine", "linear"):
        raise ValueError(f"head must be 'cosine' or 'linear' for the sharded loss, got {head!r}")
    for name, value, dims in (("input", input, 2), ("weight_shard", weight_shard, 2)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != dims:
            raise TypeError(f"{name} must be a {dims}-D floating-point tensor")
        if value.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {value.dtype}; the sharded loss takes {_DTYPES}")
    if weight_shard.dtype != input.dtype or weight_shard.device != input.device:
        raise TypeError(
            f"weight_shard ({weight_shard.dtype}, {weight_shard.device}) must match input "
            f"({input.dtype}, {input.device})"
        )
    if weight_shard.shape[1] != input.shape[1]:
        raise ValueError(
            f"weight_shard must be C_r x D with D = input.shape[1] = {input.shape[1]}, got {tuple(weight_shard.shape)}"
        )
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64 or target.shape != (input.shape[0],):
        got = (
            f"{target.dtype} of shape {tuple(target.shape)}"
            if isinstance(target, torch.Tensor)
            else type(target).__name__
        )
        raise TypeError(f"target must be an int64 tensor of shape ({input.shape[0]},), got {got}")
    for name, value in (("class_start", class_start), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if class_chunk is not None and (
        isinstance(class_chunk, bool) or not isinstance(class_chunk, int) or class_chunk < 1
    ):
        raise ValueError(f"class_chunk must be None or a positive int (classes per chunk), got {class_chunk!r}")
    tables = {}
    for name in _TABLES:
        table = margin_kwargs.pop(name, None)
        if table is not None:
            if not isinstance(table, torch.Tensor) or table.shape != (num_classes,):
                raise ValueError(f"{name} must be the global table of num_classes = {num_classes} entries")
            if table.requires_grad:
                raise ValueError(f"{name} requires grad, but the sharded loss treats class tables as constants")
            tables[name] = table.to(device=input.device, dtype=compute_dtype(input.dtype))
    if margin is not None:  # one margin for every class: a 0-d table
        if "class_margins" in tables:
            raise ValueError("pass margin (one margin for every class) or class_margins (one a class), not both")
        value = as_real("margin", margin)
        if not math.isfinite(value):
            raise ValueError(f"margin must be finite, got {value}")
        tables["class_margins"] = torch.tensor(value, device=input.device, dtype=compute_dtype(input.dtype))
    rate = check_sample_rate(sample_rate)
    check_generator(generator)
    check_sparse_grad(sparse_grad)
    sampling = None
    if rate < 1.0 or sampled_classes is not None:
        if sampled_classes is not None:
            sampled_classes = check_class_indices("sampled_classes", sampled_classes, num_classes, input.device)
        sampling = _Sampling(rate, sampled_classes, generator, sparse_grad)
    spec = MarginLossSpec(head=head, **margin_kwargs)
    return _Call(input, target, weight_shard, class_start, num_classes, class_chunk, spec, tables, sampling)


class ShardedCosineClassifier(nn.Module):
    """This rank's shard of a cosine classifier of ``num_classes`` classes (``in_features`` wide).

    The classes are split evenly over the ranks of ``process_group`` (:func:`even_shards`); the shard
    holds ``[class_start, class_start + num_local)``. ``forward(features, target, **margin_kwargs)``
    returns :func:`sharded_margin_cross_entropy` of the features against the whole classifier, with this
    module's ``sample_rate`` (Partial FC's negative-class sampling; 1 keeps every class) unless the call gives
    one. With ``sample_rate < 1`` the weight gets a sparse gradient of the kept rows (SGD with momentum and
    SparseAdam take it), or with ``sparse_grad=False`` a dense one with zeros elsewhere (any optimizer, weight
    decay included).
    :meth:`full_weight` gathers the C x D classifier (e.g. to save a checkpoint that another world size
    loads) and :meth:`load_full_weight` takes this rank's rows of one.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        process_group=None,
        *,
        device=None,
        dtype=None,
        std: float = 0.01,
        sample_rate: float = 1.0,
        sparse_grad: bool = True,
    ):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedCosineClassifier needs torch.distributed to be initialised")
        self.process_group = process_group
        group = process_group if process_group is not None else dist.group.WORLD
        world, rank = _world(group)
        self.in_features, self.num_classes = int(in_features), int(num_classes)
        self.shards = even_shards(self.num_classes, world)
        self.class_start, self.num_local = self.shards[rank]
        self.weight = nn.Parameter(torch.empty(self.num_local, self.in_features, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=std)
        self.sample_rate = check_sample_rate(sample_rate)
        self.sparse_grad = check_sparse_grad(sparse_grad)

    def forward(self, features: torch.Tensor, target: torch.Tensor, **margin_kwargs):
        margin_kwargs.setdefault("sample_rate", self.sample_rate)
        margin_kwargs.setdefault("sparse_grad", self.sparse_grad)
        return sharded_margin_cross_entropy(
            features,
            target,
            self.weight,
            class_start=self.class_start,
            num_classes=self.num_classes,
            process_group=self.process_group,
            **margin_kwargs,
        )

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The whole C x D classifier, gathered from every rank (every rank gets it)."""
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        world, _ = _world(group)
        most = max(count for _, count in self.shards)
        padded = self.weight.new_zeros((most, self.in_features))
        padded[: self.num_local] = self.weight
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=group)
        return torch.cat([g[:count] for g, (_, count) in zip(gathered, self.shards)])

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Copy this rank's rows of a whole C x D classifier (written by any world size)."""
        if tuple(weight.shape) != (self.num_classes, self.in_features):
            raise ValueError(f"weight must be {self.num_classes} x {self.in_features}, got {tuple(weight.shape)}")
        self.weight.copy_(weight[self.class_start : self.class_start + self.num_local])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"classes=[{self.class_start}, {self.class_start + self.num_local})"
        )
