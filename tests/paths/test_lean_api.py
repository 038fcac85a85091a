"""The memory-lean path through the public API: ``class_chunk`` of margin_cross_entropy and the modules
(auto threshold, forced, off, validation), same results as the row-kernel path, no B x C allocation."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_margin as fm
from fused_margin import functional


def _case(B=12, D=16, C=50, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    w = torch.randn(C, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g)
    y[1] = -100
    counts = torch.randint(1, 100, (C,), generator=g)
    return x, w, y, counts


class _Shapes(TorchDispatchMode):
    """Records the element counts of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel()))
        return out


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("chunk", [7, 50, 1000])
def test_forced_chunk_matches_default_path(backend, chunk):
    if backend == "cpu" and fm.available_backends("cpu")["cpu"] != "ok":
        pytest.skip("C++ extension not built")
    dtype = torch.float64 if backend == "reference" else torch.float32
    x, w, y, counts = _case(dtype=dtype)
    kw = dict(class_counts=counts, variant="bs", lambda_inst=1.0, label_smoothing=0.1)
    outs = []
    for class_chunk in ("off", chunk):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss, aux = fm.dbm_loss(
            xx,
            y,
            ww,
            backend="reference" if class_chunk == "off" else backend,
            class_chunk=class_chunk,
            return_aux=True,
            **kw,
        )
        loss.backward()
        outs.append((loss, aux.lse, aux.pred, aux.hard, xx.grad, ww.grad))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for a, b in zip(*outs):
        if a.is_floating_point():
            torch.testing.assert_close(a.to(dtype), b.to(dtype), **tol)
        else:
            assert torch.equal(a, b)


def test_auto_switches_on_the_threshold(monkeypatch):
    if fm.available_backends("cpu")["cpu"] != "ok":
        pytest.skip("C++ extension not built")
    calls = []
    real = functional.lean_margin_cross_entropy

    def spy(*args, **kwargs):
        calls.append(kwargs.get("chunk"))
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "lean_margin_cross_entropy", spy)
    x, w, y, counts = _case(dtype=torch.float32)
    fm.dbm_loss(x, y, w, class_counts=counts, backend="cpu")
    assert calls == []  # 12 x 50 fp32 is far below 64 MiB
    monkeypatch.setattr(functional, "LEAN_THRESHOLD_BYTES", 12 * 50 * 4 - 1)
    fm.dbm_loss(x, y, w, class_counts=counts, backend="cpu")
    assert calls == [None]  # auto chunk
    fm.dbm_loss(x, y, w, class_counts=counts, backend="cpu", class_chunk="off")
    fm.dbm_loss(x, y, w, class_counts=counts, backend="reference")  # the oracle never switches by itself
    fm.dbm_loss(torch.rand(12, 50) * 2 - 1, y, class_counts=counts, backend="cpu")  # logits head: no switch
    assert calls == [None]
    fm.dbm_loss(x, y, w, class_counts=counts, backend="reference", class_chunk=9)
    assert calls == [None, 9]


def test_module_option_checked_at_construction_and_used():
    x, w, y, counts = _case()
    with pytest.raises(ValueError, match="class_chunk"):
        fm.DBMLoss(counts, class_chunk=0)
    with pytest.raises(ValueError, match="class_chunk"):
        fm.LDAMLoss(counts, class_chunk="on")
    with pytest.raises(ValueError, match="class_chunk"):
        fm.margin_cross_entropy(x, y, w, class_chunk=2.5)
    with pytest.raises(ValueError, match="class_chunk"):
        fm.margin_cross_entropy(x, y, w, class_chunk=True)
    a = fm.LDAMLoss(counts, class_chunk=8, backend="reference")(x, y, w)
    b = fm.LDAMLoss(counts, class_chunk="off", backend="reference")(x, y, w)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_forced_lean_path_allocates_no_b_by_c_tensor():
    B, C = 24, 400
    x, w, y, counts = _case(B=B, C=C, dtype=torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    with _Shapes() as rec:
        loss = fm.dbm_loss(x, y, w, class_counts=counts, variant="bs", backend="reference", class_chunk=64)
        loss.backward()
    big = [(f, n) for f, n in rec.sizes if n >= B * C]
    assert big == []
    # and the default path does allocate them (so the recorder sees what it should)
    with _Shapes() as rec:
        fm.dbm_loss(x, y, w, class_counts=counts, variant="bs", backend="reference", class_chunk="off").backward()
    assert any(n >= B * C for _, n in rec.sizes)


def _lean_paths():
    paths = [dict(backend="reference", class_chunk=7), dict(class_chunk=7)]
    return paths


@pytest.mark.parametrize("kwargs", _lean_paths(), ids=["reference-chunks", "auto-chunks"])
def test_torch_func_grad_and_vjp_through_the_lean_path(kwargs):
    """The memory-lean path under torch.func.grad and vjp gives loss.backward()'s gradients (as the row path
    does); with the default class_chunk='auto' it is taken past the budget, so a growing batch keeps working."""
    x, w, y, counts = _case()
    margins = fm.ldam_margins(counts).double()

    def loss_fn(x, w):
        return fm.margin_cross_entropy(
            x, y, w, scale=8.0, class_margins=margins, lambda_inst=1.0, margin_type="additive_angular", **kwargs
        )

    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss_fn(xr, wr).backward()
    gx, gw = torch.func.grad(loss_fn, argnums=(0, 1))(x, w)
    torch.testing.assert_close(gx, xr.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gw, wr.grad, rtol=1e-12, atol=1e-14)
    value, vjp_fn = torch.func.vjp(loss_fn, x, w)
    vx, vw = vjp_fn(torch.tensor(-0.5, dtype=torch.float64))
    torch.testing.assert_close(vx, -0.5 * xr.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(vw, -0.5 * wr.grad, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="memory-lean path does not support torch.func.vmap"):
        torch.func.vmap(loss_fn, in_dims=(0, None))(x.unsqueeze(0).expand(2, -1, -1), w)
    with pytest.raises(RuntimeError, match="jacrev, jacfwd and vmap over their backward need backend='reference'"):
        torch.func.jacrev(lambda x: fm.margin_cross_entropy(x, y, w, reduction="none", **kwargs))(x)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_jacrev_names_the_backend_that_supports_it(backend):
    """jacrev (a vmap over the backward): a clear error naming backend='reference' on the fused backends,
    and the full Jacobian from the reference itself."""
    x, w, y, _ = _case(B=4, C=6)
    if backend == "cpu":
        if fm.available_backends("cpu", torch.float64)["cpu"] != "ok":
            pytest.skip("C++ extension not built")
        with pytest.raises(RuntimeError, match="backend='reference'"):
            torch.func.jacrev(lambda x: fm.margin_cross_entropy(x, y, w, reduction="none", backend="cpu"))(x)
        return
    jac = torch.func.jacrev(lambda x: fm.margin_cross_entropy(x, y, w, reduction="none", backend="reference"))(x)
    rows = [
        torch.autograd.grad(
            fm.margin_cross_entropy(x.requires_grad_(), y, w, reduction="none", backend="reference")[i], x
        )[0]
        for i in range(4)
    ]
    torch.testing.assert_close(jac, torch.stack(rows))
