"""The class-sharded loss (``fused_margin.distributed``) on CPU with gloo: spawned processes (world sizes
2 and 3, uneven shards and rows) against the single-process reference on the full classifier.

Every check runs inside the spawned ranks; a failed assertion on any rank fails the test with that
rank's traceback (``torch.multiprocessing.spawn`` re-raises it).
"""

import datetime
import gc
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_margin as fm
from fused_margin import distributed as fmd

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)


def _spawn(worker, world, *args):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, os.path.join(tmp, "store"), *args), nprocs=world, join=True)


#: every collective of these tests gives up after this long, so a rank left waiting fails the test instead of
#: hanging CI for gloo's default half hour
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def _init(rank, world, store):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )


def _finish():
    """Leave together, with no reference to the group left: the exceptions the tests catch keep frames (and
    through them the process group) alive in reference cycles, and a gloo group destroyed only at interpreter
    exit aborts the process (std::terminate, SIGABRT)."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


class _Counter:
    """Counts the collectives ``fused_margin.distributed`` issues (they are looked up on ``dist``)."""

    NAMES = (
        "all_gather",
        "all_reduce",
        "reduce_scatter_tensor",
        "all_gather_into_tensor",
        "broadcast",
        "reduce",
        "all_to_all",
    )

    def __init__(self):
        self.counts = {}
        self._saved = {}

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(dist, name)
            self._saved[name] = original

            def wrapped(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] = self.counts.get(_name, 0) + 1
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def _case_data(seed, B, C, D, ties=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, D, generator=g, dtype=torch.float64)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    if ties:
        # exact ties whatever the GEMM's summation order: the tied classes are multiples of one basis
        # vector, so each cosine is one exact product. Row 0: the best score on both sides of a shard
        # boundary (classes 6 and 7); row 1: label 6 (the last class of a shard in world 3) tied with 7
        # and 12 (ELM's c*: 7 over 12 across the shards); labels on the last classes of other shards.
        basis = torch.zeros(D, dtype=torch.float64)
        basis[0] = 1.0
        W[6], W[7], W[12] = basis, 0.5 * basis, 2.0 * basis
        X[0, 0] = X[1, 0] = 8.0
        y[1], y[3], y[4] = 6, 12, C - 1
    return X, W, y, g


CASES = {
    "dbm_bs": dict(
        scale=30.0, margin_type="additive_angular", lambda_inst=1.0, tables=("class_margins", "logit_offset")
    ),
    "elm_smoothing_weighted": dict(
        scale=16.0, lambda_elm=1.0, label_smoothing=0.1, tables=("class_margins", "class_weight")
    ),
    "arcface_threshold_sum": dict(
        scale=64.0, margin_type="additive_angular", angular_fold="threshold", reduction="sum", tables=("class_margins",)
    ),
    "ldam_none_ignored": dict(scale=30.0, reduction="none", ignored=True, tables=("class_margins", "class_weight")),
    "linear_head": dict(head="linear", scale=1.0, label_smoothing=0.05, tables=("logit_offset",)),
    "dbm_all_hard_mode": dict(
        scale=30.0,
        margin_type="additive_angular",
        lambda_inst=1.0,
        hard_mode="all",
        ignored=True,
        tables=("class_margins",),
    ),
}


def _run_case(rank, world, name, shards, rows, dtype, chunk):
    opts = dict(CASES[name])
    table_names = opts.pop("tables")
    ignored = opts.pop("ignored", False)
    head = opts.pop("head", "cosine")
    B, C, D = sum(rows), sum(n for _, n in shards), 6
    X, W, y, g = _case_data(len(name) + world, B, C, D, ties=True)
    if ignored:
        y[2] = -100
        y[B - 1] = -100
    tables = {
        "class_margins": 0.05 + 0.3 * torch.rand(C, generator=g, dtype=torch.float64),
        "logit_offset": torch.log(torch.rand(C, generator=g, dtype=torch.float64) + 0.01),
        "class_weight": 0.2 + 2.0 * torch.rand(C, generator=g, dtype=torch.float64),
    }
    tables = {k: v for k, v in tables.items() if k in table_names}

    # the single-process truth (float64 reference on the full classifier)
    Xr, Wr = X.clone().requires_grad_(), W.clone().requires_grad_()
    loss_r, aux_r = fm.margin_cross_entropy(
        Xr, y, Wr, head=head, backend="reference", return_aux=True, **tables, **opts
    )
    upstream = torch.ones_like(loss_r) if loss_r.dim() == 0 else torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    gX, gW = torch.autograd.grad(loss_r, [Xr, Wr], upstream)

    start_row = sum(rows[:rank])
    class_start, count = shards[rank]
    x = X[start_row : start_row + rows[rank]].to(dtype).requires_grad_()
    w = W[class_start : class_start + count].to(dtype).requires_grad_()
    with _Counter() as counter:
        loss, aux = fmd.sharded_margin_cross_entropy(
            x,
            y[start_row : start_row + rows[rank]],
            w,
            class_start=class_start,
            num_classes=C,
            head=head,
            class_chunk=chunk,
            return_aux=True,
            **{k: v.to(dtype) for k, v in tables.items()},
            **opts,
        )
        forward_counts = dict(counter.counts)
        loss.backward(upstream.to(loss.dtype))
    backward_counts = {k: counter.counts[k] - forward_counts.get(k, 0) for k in counter.counts}
    assert forward_counts == {"all_reduce": 1, "all_gather": 2}, forward_counts
    assert {k: v for k, v in backward_counts.items() if v} == {"all_reduce": 1}, backward_counts

    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(loss.double(), loss_r.detach(), **tol, msg=f"{name}: loss")
    torch.testing.assert_close(aux.lse.double(), aux_r.lse, **tol, msg=f"{name}: lse")
    assert torch.equal(aux.pred, aux_r.pred), (name, aux.pred, aux_r.pred)
    assert torch.equal(aux.hard, aux_r.hard), name
    scale = max(gX.abs().max().item(), 1e-30)
    torch.testing.assert_close(
        x.grad.double(),
        gX[start_row : start_row + rows[rank]],
        rtol=tol["rtol"],
        atol=tol["atol"] * scale * 10,
        msg=f"{name}: grad of this rank's rows",
    )
    scale = max(gW.abs().max().item(), 1e-30)
    torch.testing.assert_close(
        w.grad.double(),
        gW[class_start : class_start + count],
        rtol=tol["rtol"],
        atol=tol["atol"] * scale * 10,
        msg=f"{name}: grad of this rank's shard",
    )
    if name == "dbm_bs":
        # the boundary ties: row 0 picks class 6 over 7 across the shards; row 1 (label 6, tied with 12)
        assert aux.pred[0].item() == aux_r.pred[0].item() == 6


def _parity_worker(rank, world, store, shards, rows):
    _init(rank, world, store)
    try:
        for dtype in (torch.float64, torch.float32):
            for name in CASES:
                for chunk in (None, 3):
                    _run_case(rank, world, name, shards, rows, dtype, chunk)
    finally:
        _finish()


@pytest.mark.slow
def test_world_2_uneven_shards_and_rows_match_the_single_process_loss():
    # ranks hold classes [13, 20) and [0, 13): out of rank order, uneven; 7 and 5 rows
    _spawn(_parity_worker, 2, [(13, 7), (0, 13)], [7, 5])


@pytest.mark.slow
def test_world_3_uneven_shards_match_the_single_process_loss():
    # shards [0, 7), [7, 8), [8, 19): the boundary at 7 splits the tie of row 0; a one-class shard
    _spawn(_parity_worker, 3, [(0, 7), (7, 1), (8, 11)], [4, 4, 5])


def _sampled_case(rank, world, shards, rows, dtype, chunk):
    """With the kept classes fixed (the same list on every rank; the positives are added), the sharded loss
    equals the single-process margin loss on those columns: loss, lse, pred (as a class index), hard, the
    gradient of this rank's rows, and a sparse gradient holding just this shard's kept rows. Classes 6, 7 and
    12 (tied, on shard boundaries in world 3) are kept; so is every label's class."""
    opts = dict(CASES["dbm_bs"])
    opts.pop("tables")
    opts.update(lambda_elm=0.5, label_smoothing=0.1)
    B, C, D = sum(rows), sum(n for _, n in shards), 6
    X, W, y, g = _case_data(7 + world, B, C, D, ties=True)
    y[2] = -100
    margins = 0.05 + 0.3 * torch.rand(C, generator=g, dtype=torch.float64)
    weights = 0.2 + 2.0 * torch.rand(C, generator=g, dtype=torch.float64)
    chosen = torch.tensor([0, 6, 7, 12, C - 2])
    kept = torch.unique(torch.cat([chosen, y[y >= 0]]))
    position = {c: i for i, c in enumerate(kept.tolist())}
    y_kept = torch.tensor([position[v] if v >= 0 else v for v in y.tolist()])
    Xr, Wr = X.clone().requires_grad_(), W[kept].clone().requires_grad_()
    loss_r, aux_r = fm.margin_cross_entropy(
        Xr,
        y_kept,
        Wr,
        class_margins=margins[kept],
        class_weight=weights[kept],
        backend="reference",
        return_aux=True,
        **opts,
    )
    loss_r.backward()

    start_row = sum(rows[:rank])
    class_start, count = shards[rank]
    x = X[start_row : start_row + rows[rank]].to(dtype).requires_grad_()
    w = W[class_start : class_start + count].to(dtype).requires_grad_()
    loss, aux = fmd.sharded_margin_cross_entropy(
        x,
        y[start_row : start_row + rows[rank]],
        w,
        class_start=class_start,
        num_classes=C,
        class_chunk=chunk,
        class_margins=margins.to(dtype),
        class_weight=weights.to(dtype),
        sampled_classes=chosen,
        return_aux=True,
        **opts,
    )
    loss.backward()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(loss.double(), loss_r.detach(), **tol)
    torch.testing.assert_close(aux.lse.double(), aux_r.lse, **tol)
    assert torch.equal(aux.pred, kept[aux_r.pred]) and torch.equal(aux.hard, aux_r.hard)
    torch.testing.assert_close(x.grad.double(), Xr.grad[start_row : start_row + rows[rank]], **tol)
    mine = (kept >= class_start) & (kept < class_start + count)
    grad_w = w.grad.coalesce()
    assert w.grad.is_sparse and torch.equal(grad_w.indices()[0], kept[mine] - class_start)
    torch.testing.assert_close(grad_w.values().double(), Wr.grad[mine], **tol)


def _sampled_worker(rank, world, store, shards, rows):
    _init(rank, world, store)
    try:
        for dtype in (torch.float64, torch.float32):
            for chunk in (None, 2):
                _sampled_case(rank, world, shards, rows, dtype, chunk)
        # a random sample: reproducible with a seeded generator, every rank's gradient of its kept rows only,
        # the scalar margin the same as a table of it; rate 1 the exact loss
        B, C, D = sum(rows), sum(n for _, n in shards), 6
        X, W, y, _ = _case_data(11, B, C, D)
        start_row, (class_start, count) = sum(rows[:rank]), shards[rank]
        x, t = X[start_row : start_row + rows[rank]], y[start_row : start_row + rows[rank]]
        w = W[class_start : class_start + count].clone().requires_grad_()

        def run(**kwargs):
            return fmd.sharded_margin_cross_entropy(
                x, t, w, class_start=class_start, num_classes=C, scale=16.0, **kwargs
            )

        draw = lambda: run(margin=0.3, sample_rate=0.4, generator=torch.Generator().manual_seed(rank))  # noqa: E731
        assert torch.equal(draw(), draw())
        loss = draw()
        loss.backward()
        positives = torch.unique(y[(y >= class_start) & (y < class_start + count)])
        rows_kept = w.grad.coalesce().indices()[0] + class_start
        assert torch.isin(positives, rows_kept).all()
        assert rows_kept.numel() == max(math.ceil(0.4 * count), positives.numel())
        table = torch.full((C,), 0.3, dtype=torch.float64)
        torch.testing.assert_close(run(margin=0.3), run(class_margins=table), rtol=1e-14, atol=0)
        # sparse_grad=False: the same gradient, dense with zeros off the kept rows
        sparse_grad = w.grad.coalesce()
        w.grad = None
        run(margin=0.3, sample_rate=0.4, sparse_grad=False, generator=torch.Generator().manual_seed(rank)).backward()
        assert not w.grad.is_sparse and torch.equal(w.grad, sparse_grad.to_dense())
        assert torch.equal(run(margin=0.3, sample_rate=1.0), run(margin=0.3))
    finally:
        _finish()


@pytest.mark.slow
def test_sampled_classes_world_2_match_the_single_process_loss_on_them():
    _spawn(_sampled_worker, 2, [(13, 7), (0, 13)], [7, 5])


@pytest.mark.slow
def test_sampled_classes_world_3_uneven_shards_and_boundary_ties():
    _spawn(_sampled_worker, 3, [(0, 7), (7, 1), (8, 11)], [4, 4, 5])


def _errors_worker(rank, world, store):
    _init(rank, world, store)
    try:
        D = 4
        x = torch.randn(3, D, dtype=torch.float64)
        w = torch.randn(5, D, dtype=torch.float64)
        y = torch.tensor([0, 1, 2])

        def expect(message, **kwargs):
            call = dict(input=x, target=y, weight_shard=w, class_start=5 * rank, num_classes=10)
            call.update(kwargs)
            with pytest.raises(ValueError, match=message):
                fmd.sharded_margin_cross_entropy(
                    call.pop("input"), call.pop("target"), call.pop("weight_shard"), **call
                )

        expect("tile", class_start=3 * rank)  # overlapping shards
        expect("tile", class_start=6 * rank)  # a gap
        expect(r"disagree on num_classes \(rank 0: 10, rank 1: 11\)", num_classes=10 + rank)
        expect(r"disagree on scale \(rank 0: 30.0, rank 1: 31.0\)", scale=30.0 + rank)
        bad = y.clone()
        bad[2] = 10 if rank == 1 else 2
        expect(r"target\[2\] = 10 on rank 1 is out of range", target=bad)
        with pytest.raises(ValueError, match="does not support pair_perturbation"):
            fmd.sharded_margin_cross_entropy(
                x, y, w, class_start=5 * rank, num_classes=10, pair_perturbation=torch.zeros(3, 10)
            )
        # after the errors the group still works: a valid call on every rank
        loss = fmd.sharded_margin_cross_entropy(x, y, w, class_start=5 * rank, num_classes=10, scale=2.0)
        assert torch.isfinite(loss)
    finally:
        _finish()


@pytest.mark.slow
def test_bad_input_raises_the_same_error_on_every_rank():
    _spawn(_errors_worker, 2)


def _same_error_on_every_rank(kind, pattern, call):
    """``call()`` raises ``kind`` matching ``pattern`` on this rank, and every rank raised the same message."""
    with pytest.raises(kind, match=pattern) as caught:
        call()
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, str(caught.value))
    assert len(set(messages)) == 1, messages
    return messages[0]


def _faults_worker(rank, world, store):
    """An argument error on one rank only: every rank raises it (its checks are part of the first
    collective), naming the rank; tables that differ between ranks or hold a NaN: the same error on every
    rank. Under the tests' short collective timeout, a rank left waiting would fail the test."""
    _init(rank, world, store)
    try:
        C, D = 10, 4
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, D, generator=g, dtype=torch.float64)
        w = torch.randn(5, D, generator=g, dtype=torch.float64)
        y = torch.tensor([0, 4, 7])
        margins = torch.full((C,), 0.2, dtype=torch.float64)
        one = rank == 1

        def run(**kwargs):
            call = dict(input=x, target=y, weight_shard=w, class_start=5 * rank, num_classes=C, scale=30.0)
            call.update(kwargs)
            return fmd.sharded_margin_cross_entropy(
                call.pop("input"), call.pop("target"), call.pop("weight_shard"), **call
            )

        _same_error_on_every_rank(
            ValueError, r"rank 1: scale must be > 0, got -1.0", lambda: run(scale=30.0 if not one else -1.0)
        )
        _same_error_on_every_rank(
            TypeError,
            r"rank 1: target must be an int64 tensor of shape \(3,\), got "
            r"torch.int32",
            lambda: run(target=y.int() if one else y),
        )
        _same_error_on_every_rank(
            ValueError,
            "rank 1: sharded_margin_cross_entropy does not support pair_perturbation",
            lambda: run(pair_perturbation=torch.zeros(3, C) if one else None),
        )
        _same_error_on_every_rank(
            TypeError,
            r"rank 1: .*unexpected keyword argument\(s\) \['lable_smoothing'\]",
            lambda: run(**({"lable_smoothing": 0.1} if one else {})),
        )
        _same_error_on_every_rank(
            TypeError,
            r"rank 0: input must be a 2-D floating-point tensor; rank 1: weight_shard",
            lambda: run(input=x[0]) if not one else run(weight_shard=w[0]),
        )
        # tables: present on one rank only, different values (DRW weights of different epochs), NaN
        message = _same_error_on_every_rank(
            ValueError,
            r"the ranks disagree on class_margins \(rank 0: a table with fingerprint \d+, rank 1: "
            r"not given\)",
            lambda: run(class_margins=None if one else margins),
        )
        assert "logit_offset" not in message
        weights = fm.drw_weights(
            torch.tensor([50, 30, 20, 10, 8, 5, 4, 3, 2, 1]), epoch=0 if one else 200, step=160
        ).double()
        _same_error_on_every_rank(
            ValueError,
            r"the ranks disagree on class_weight \(rank 0: a table with "
            r"fingerprint \d+, rank 1: a table with fingerprint \d+\)",
            lambda: run(class_weight=weights),
        )
        nan_margins = margins.clone()
        nan_margins[6] = float("nan")
        _same_error_on_every_rank(
            ValueError,
            r"class_margins must be finite, got class_margins\[6\] = nan",
            lambda: run(class_margins=nan_margins),
        )
        inf_offset = torch.zeros(C, dtype=torch.float64)
        inf_offset[2] = float("inf")
        _same_error_on_every_rank(
            ValueError,
            r"logit_offset must be finite, got logit_offset\[2\] = inf",
            lambda: run(logit_offset=inf_offset),
        )
        # hyperparameters and dtypes by name, with each rank's value
        _same_error_on_every_rank(
            ValueError,
            r"the ranks disagree on margin_type \(rank 0: 'additive_cosine', "
            r"rank 1: 'additive_angular'\)",
            lambda: run(margin_type="additive_angular" if one else "additive_cosine"),
        )
        _same_error_on_every_rank(
            ValueError,
            r"the ranks disagree on the dtype \(rank 0: torch.float64, rank 1: "
            r"torch.float32\)",
            lambda: run(input=x.float() if one else x, weight_shard=w.float() if one else w),
        )
        # the sampling: a bad rate on one rank, rates or kept classes that differ between ranks
        _same_error_on_every_rank(
            ValueError, r"rank 1: sample_rate must be in \(0, 1\]", lambda: run(sample_rate=0.0 if one else 0.5)
        )
        _same_error_on_every_rank(
            ValueError,
            r"the ranks disagree on sample_rate \(rank 0: 0.5, rank 1: 0.25\)",
            lambda: run(sample_rate=0.25 if one else 0.5),
        )
        _same_error_on_every_rank(
            ValueError,
            r"the ranks disagree on sampled_classes",
            lambda: run(sampled_classes=[1, 2] if one else [1, 3]),
        )
        _same_error_on_every_rank(
            ValueError, "pass margin .* or class_margins .*, not both", lambda: run(margin=0.2, class_margins=margins)
        )
        # equal tables, passed as different tensors (and dtypes): no error, and the group still works
        loss = run(class_margins=margins.clone() if one else margins, class_weight=weights if False else None)
        assert torch.isfinite(loss)
        losses = [None] * world
        dist.all_gather_object(losses, float(loss))
        assert losses[0] == losses[1]
    finally:
        _finish()


@pytest.mark.slow
def test_faults_on_one_rank_raise_the_same_error_on_every_rank():
    _spawn(_faults_worker, 2)


def _transforms_worker(rank, world, store):
    """torch.func.grad and vjp through the sharded loss give what loss.backward() gives."""
    _init(rank, world, store)
    try:
        C, D = 9, 5
        g = torch.Generator().manual_seed(3)
        X = torch.randn(8, D, generator=g, dtype=torch.float64)
        W = torch.randn(C, D, generator=g, dtype=torch.float64)
        Y = torch.randint(0, C, (8,), generator=g)
        shards = fmd.even_shards(C, world)
        start, count = shards[rank]
        x, y, w = X[4 * rank : 4 * rank + 4], Y[4 * rank : 4 * rank + 4], W[start : start + count]
        margins = torch.linspace(0.1, 0.4, C, dtype=torch.float64)

        def loss_fn(x, w):
            return fmd.sharded_margin_cross_entropy(
                x,
                y,
                w,
                class_start=start,
                num_classes=C,
                scale=8.0,
                class_margins=margins,
                lambda_inst=1.0,
                margin_type="additive_angular",
            )

        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = loss_fn(xr, wr)
        loss.backward()
        gx, gw = torch.func.grad(loss_fn, argnums=(0, 1))(x, w)
        torch.testing.assert_close(gx, xr.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gw, wr.grad, rtol=1e-12, atol=1e-14)
        value, vjp_fn = torch.func.vjp(loss_fn, x, w)
        torch.testing.assert_close(value, loss.detach())
        vx, vw = vjp_fn(torch.tensor(2.0, dtype=torch.float64))
        torch.testing.assert_close(vx, 2 * xr.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(vw, 2 * wr.grad, rtol=1e-12, atol=1e-14)
        with pytest.raises(RuntimeError, match="does not support torch.func.vmap"):
            torch.func.vmap(loss_fn, in_dims=(0, None))(x.unsqueeze(0).expand(2, -1, -1), w)
        (gx_graph,) = torch.autograd.grad(loss_fn(xr, wr), xr, create_graph=True)
        with pytest.raises(RuntimeError, match="first-order gradients only"):
            torch.autograd.grad(gx_graph.sum(), wr)
        # the group is still in step after the refusals
        assert torch.isfinite(loss_fn(x, w))
    finally:
        _finish()


@pytest.mark.slow
def test_torch_func_grad_and_vjp_through_the_sharded_loss():
    _spawn(_transforms_worker, 2)


def _classifier_and_ddp_worker(rank, world, store):
    _init(rank, world, store)
    try:
        C, D, B_r = 11, 5, 4
        g = torch.Generator().manual_seed(0)
        full = torch.randn(C, D, generator=g, dtype=torch.float64)
        head = fmd.ShardedCosineClassifier(D, C, dtype=torch.float64)
        assert (head.class_start, head.num_local) == fmd.even_shards(C, world)[rank]
        head.load_full_weight(full)
        assert torch.equal(head.full_weight(), full)

        # DDP recipe: the backbone under DistributedDataParallel, the sharded head outside it
        torch.manual_seed(1)
        backbone = torch.nn.Linear(7, D).double()
        reference_backbone = torch.nn.Linear(7, D).double()
        reference_backbone.load_state_dict(backbone.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(backbone)
        inputs = torch.randn(world * B_r, 7, generator=g, dtype=torch.float64)
        labels = torch.randint(0, C, (world * B_r,), generator=g)
        mine = slice(rank * B_r, (rank + 1) * B_r)
        loss = head(
            ddp(inputs[mine]),
            labels[mine],
            scale=16.0,
            class_margins=torch.full((C,), 0.2, dtype=torch.float64),
            backbone_ddp=True,
        )
        loss.backward()

        W = full.clone().requires_grad_()
        loss_r = fm.margin_cross_entropy(
            reference_backbone(inputs),
            labels,
            W,
            scale=16.0,
            class_margins=torch.full((C,), 0.2, dtype=torch.float64),
            backend="reference",
        )
        loss_r.backward()
        torch.testing.assert_close(loss, loss_r.detach(), rtol=1e-12, atol=1e-14)
        for p, p_ref in zip(backbone.parameters(), reference_backbone.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            head.weight.grad, W.grad[head.class_start : head.class_start + head.num_local], rtol=1e-10, atol=1e-12
        )
    finally:
        _finish()


@pytest.mark.slow
def test_sharded_classifier_checkpoint_and_ddp_recipe():
    _spawn(_classifier_and_ddp_worker, 3)


def test_even_shards():
    assert fmd.even_shards(10, 3) == [(0, 4), (4, 3), (7, 3)]
    assert fmd.even_shards(4, 4) == [(0, 1), (1, 1), (2, 1), (3, 1)]
    with pytest.raises(ValueError, match="at least the world size"):
        fmd.even_shards(2, 3)


def test_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        fmd.sharded_margin_cross_entropy(
            torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 3), class_start=0, num_classes=2
        )


def test_a_failed_rank_sends_as_many_agreement_items_as_a_good_one():
    """A rank whose local checks fail sends zeros in place of the agreement items: the same count, or the
    ranks' all_reduce would not match."""
    from fused_margin.paths import sharded

    x, w = torch.randn(3, 4), torch.randn(5, 4)
    for sampling in (dict(), dict(sample_rate=0.5), dict(sampled_classes=[1, 2])):
        call = sharded._check_call(
            x, torch.tensor([0, 1, 2]), w, 0, 10, "cosine", None, dict(class_weight=torch.ones(10)), **sampling
        )
        assert len(sharded._agreement_items(call)) == sharded._agreement_count()
