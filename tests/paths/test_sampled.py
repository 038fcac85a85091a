"""Partial FC's negative-class sampling on one device (fused_margin.paths.sampled, ``sample_rate`` /
``sampled_classes`` of margin_cross_entropy and the modules): the exact loss at rate 1, the margin loss over the
kept columns otherwise, every positive kept, a sparse gradient of the kept rows, bad arguments named."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_margin as fm
from fused_margin.paths import sampled

B, C, D = 9, 41, 6
OPTIONS = dict(scale=8.0, margin_type="additive_angular", lambda_inst=1.0, lambda_elm=0.5, label_smoothing=0.1)


def _data(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    w = torch.randn(C, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g)
    y[2] = -100
    y[5] = y[4]  # a class positive twice
    tables = dict(
        class_margins=(0.05 + 0.3 * torch.rand(C, generator=g, dtype=torch.float64)).to(dtype),
        logit_offset=torch.log(torch.rand(C, generator=g, dtype=torch.float64) + 0.1).to(dtype),
        class_weight=(0.2 + torch.rand(C, generator=g, dtype=torch.float64)).to(dtype),
    )
    return x, w, y, tables


def _backends():
    out = ["reference"]
    if fm.available_backends("cpu", torch.float32)["cpu"] == "ok":
        out.append("cpu")
    if fm.available_backends("cpu", torch.float32)["triton"] == "ok":
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", _backends())
def test_rate_one_is_the_exact_loss(backend):
    dtype = torch.float64 if backend == "reference" else torch.float32
    x, w, y, tables = _data(dtype)
    a = fm.margin_cross_entropy(x, y, w, **tables, **OPTIONS, backend=backend, sample_rate=1.0)
    b = fm.margin_cross_entropy(x, y, w, **tables, **OPTIONS, backend=backend)
    assert torch.equal(a, b)


def _kept_reference(x, w, y, tables, kept, **options):
    """The margin loss on the kept columns only, labels renumbered, in float64 on the reference."""
    position = {c: i for i, c in enumerate(kept.tolist())}
    y_kept = torch.tensor([position[v] if v >= 0 else v for v in y.tolist()])
    xr, wr = x.detach().double().requires_grad_(), w.detach().double()[kept].requires_grad_()
    offset = tables["logit_offset"].double()[kept].requires_grad_()
    loss, aux = fm.margin_cross_entropy(
        xr,
        y_kept,
        wr,
        class_margins=tables["class_margins"].double()[kept],
        logit_offset=offset,
        class_weight=tables["class_weight"].double()[kept],
        return_aux=True,
        backend="reference",
        **options,
    )
    loss.backward()
    return loss.detach(), kept[aux.pred], aux.hard, xr.grad, wr.grad, offset.grad


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("class_chunk", ["off", 4])
def test_fixed_sampled_classes_equal_the_loss_on_those_columns(backend, class_chunk):
    """The loss, pred, hard and every gradient of a call with sampled_classes are those of the margin loss on
    the kept columns (the given classes and the batch's positives), labels renumbered; W's gradient is sparse
    and holds just the kept rows."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    x, w, y, tables = _data(dtype)
    chosen = torch.tensor([0, 7, 13, 40, 22])
    kept = torch.unique(torch.cat([chosen, y[y >= 0]]))
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    offset = tables["logit_offset"].clone().requires_grad_()
    loss, aux = fm.margin_cross_entropy(
        xs,
        y,
        ws,
        **dict(tables, logit_offset=offset),
        **OPTIONS,
        sampled_classes=chosen,
        return_aux=True,
        backend=backend,
        class_chunk=class_chunk,
    )
    loss.backward()
    want, pred, hard, gx, gw, goffset = _kept_reference(x, w, y, tables, kept, **OPTIONS)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(loss.double(), want, **tol)
    assert torch.equal(aux.pred, pred) and torch.equal(aux.hard, hard)
    torch.testing.assert_close(xs.grad.double(), gx, **tol)
    assert ws.grad.is_sparse
    grad_w = ws.grad.coalesce()
    assert torch.equal(grad_w.indices()[0], kept)  # the kept rows and no other
    torch.testing.assert_close(grad_w.values().double(), gw, **tol)
    assert torch.equal(offset.grad[~torch.isin(torch.arange(C), kept)], torch.zeros(C - kept.numel(), dtype=dtype))
    torch.testing.assert_close(offset.grad[kept].double(), goffset, **tol)


def test_the_logits_head_keeps_its_columns():
    x, w, y, tables = _data()
    logits = (x @ w.t()).requires_grad_()
    chosen = torch.tensor([3, 30])
    kept = torch.unique(torch.cat([chosen, y[y >= 0]]))
    loss = fm.margin_cross_entropy(logits, y, scale=2.0, sampled_classes=chosen)
    loss.backward()
    position = {c: i for i, c in enumerate(kept.tolist())}
    y_kept = torch.tensor([position[v] if v >= 0 else v for v in y.tolist()])
    ref_logits = logits.detach()[:, kept].requires_grad_()
    want = fm.margin_cross_entropy(ref_logits, y_kept, scale=2.0)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    assert torch.equal(logits.grad[:, kept], ref_logits.grad)
    assert not logits.grad[:, ~torch.isin(torch.arange(C), kept)].any()


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5, 0.99, 1.0])
def test_every_positive_is_kept_and_the_sample_has_its_size(rate):
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        count = 300
        labels = torch.randint(100, 100 + count, (64,), generator=g)
        labels[:5] = -100
        labels[5:8] = 7  # outside the block
        kept = sampled.sample_classes(labels, 100, count, rate, generator=g)
        positives = torch.unique(labels[(labels >= 100)])
        assert torch.isin(positives, kept).all()
        assert kept.numel() == max(math.ceil(rate * count), positives.numel())
        assert torch.equal(kept, torch.unique(kept)) and int(kept.min()) >= 100 and int(kept.max()) < 100 + count
        assert kept.numel() == sampled.kept_count(labels, 100, count, rate, ignore_index=-100)


def test_the_generator_makes_the_sample_reproducible():
    labels = torch.tensor([1, 5])
    draw = lambda seed: sampled.sample_classes(labels, 0, 1000, 0.05, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
    x, w, y, _ = _data()
    a = fm.margin_cross_entropy(x, y, w, scale=4.0, sample_rate=0.3, generator=torch.Generator().manual_seed(1))
    b = fm.margin_cross_entropy(x, y, w, scale=4.0, sample_rate=0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "rate, error",
    [
        (0.0, ValueError),
        (-0.5, ValueError),
        (1.5, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("0.5", TypeError),
        (True, TypeError),
    ],
)
def test_bad_rates_are_named(rate, error):
    x, w, y, _ = _data()
    with pytest.raises(error, match="sample_rate"):
        fm.margin_cross_entropy(x, y, w, sample_rate=rate)
    with pytest.raises(error, match="sample_rate"):
        fm.LDAMLoss([10, 5, 3], sample_rate=rate)


def test_bad_sampled_classes_and_generator_are_named():
    x, w, y, _ = _data()
    with pytest.raises(ValueError, match=r"sampled_classes must hold class indices in \[0, 41\)"):
        fm.margin_cross_entropy(x, y, w, sampled_classes=[0, 41])
    with pytest.raises(TypeError, match="sampled_classes must be a 1-D sequence of int class indices"):
        fm.margin_cross_entropy(x, y, w, sampled_classes=[0.5])
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        fm.margin_cross_entropy(x, y, w, sample_rate=0.5, generator=3)


class _Sizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_sparse:
                self.numels.append((str(func), t.numel()))
        return out


def test_no_dense_classifier_sized_gradient_is_formed():
    """The step at rate 0.25 allocates no dense C x D tensor (the gradient is sparse), and an SGD step with
    momentum takes the sparse gradient."""
    g = torch.Generator().manual_seed(0)
    big_c = 2000
    x = torch.randn(16, D, generator=g)
    weight = torch.nn.Parameter(torch.randn(big_c, D, generator=g))
    y = torch.randint(0, big_c, (16,), generator=g)
    with _Sizes() as sizes:
        loss = fm.margin_cross_entropy(x, y, weight, scale=8.0, sample_rate=0.25)
        loss.backward()
    assert not [name for name, n in sizes.numels if n >= big_c * D], sizes.numels
    assert weight.grad.is_sparse and weight.grad.coalesce().indices().shape[1] == math.ceil(0.25 * big_c)
    before = weight.detach().clone()
    torch.optim.SGD([weight], lr=0.1, momentum=0.9).step()
    moved = (weight.detach() != before).any(1)
    assert torch.equal(moved, torch.isin(torch.arange(big_c), weight.grad.coalesce().indices()[0]))


def test_modules_take_the_rate():
    counts = [40, 30, 20, 10, 8, 6, 4, 2]
    x = torch.randn(6, 5, dtype=torch.float64)
    w = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 7, 7, 3])
    loss = fm.DBMLoss(counts, variant="bs", sample_rate=0.5)(x, y, w, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and w.grad.is_sparse
    full = fm.DBMLoss(counts, variant="bs")(x, y, w)
    assert torch.equal(fm.DBMLoss(counts, variant="bs", sample_rate=1.0)(x, y, w), full)


def test_sgd_momentum_on_the_sparse_gradient_matches_the_dense_zero_filled_one():
    """Two SGD steps with momentum on the sparse gradient equal the steps on the dense gradient with zeros on
    the unsampled rows (Partial FC's update): rows kept in the first step only keep moving by their momentum."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (8,), generator=g)
    start = torch.randn(C, D, generator=g, dtype=torch.float64)
    sparse_w, dense_w = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opts = [torch.optim.SGD([p], lr=0.5, momentum=0.9) for p in (sparse_w, dense_w)]
    for step in range(2):
        draw = torch.Generator().manual_seed(step)
        for p, opt in zip((sparse_w, dense_w), opts):
            opt.zero_grad()
            fm.margin_cross_entropy(x, y, p, scale=8.0, sample_rate=0.3, generator=draw.clone_state()).backward()
            if p is dense_w:
                p.grad = p.grad.to_dense()
            opt.step()
        torch.testing.assert_close(sparse_w.detach(), dense_w.detach(), rtol=1e-14, atol=1e-14)
    second = sparse_w.grad.coalesce().indices()[0]
    first_only = ~torch.isin(torch.arange(C), second)
    assert (sparse_w.detach()[first_only] != start[first_only]).any()


def test_sparse_grad_false_gives_the_zero_filled_dense_gradient_for_any_optimizer():
    """``sparse_grad=False``: the dense gradient with zeros off the kept rows, equal to the sparse one made
    dense, which SGD with weight decay and AdamW take (they raise on the sparse one)."""
    x, w, y, tables = _data()
    grads = {}
    for sparse in (True, False):
        p = w.clone().requires_grad_()
        fm.margin_cross_entropy(
            x, y, p, sample_rate=0.3, sparse_grad=sparse, generator=torch.Generator().manual_seed(5), **OPTIONS
        ).backward()
        grads[sparse] = p.grad
    assert grads[True].is_sparse and not grads[False].is_sparse
    assert torch.equal(grads[True].to_dense(), grads[False])
    for opt in (torch.optim.SGD, torch.optim.AdamW):
        p = torch.nn.Parameter(w.clone())
        p.grad = grads[False].clone()
        opt([p], lr=0.1, weight_decay=0.01).step()
    with pytest.raises(TypeError, match="sparse_grad must be a bool"):
        fm.margin_cross_entropy(x, y, w, sample_rate=0.3, sparse_grad=1)
    with pytest.raises(TypeError, match="sparse_grad must be a bool"):
        fm.ArcFaceLoss(sample_rate=0.3, sparse_grad="no")
