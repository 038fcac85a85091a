"""Drop-in behaviour in real training loops: autocast, learnable tables, double backward.

* Autocast: under ``torch.autocast`` the cosine and linear heads cast ``input``/``weight``/``bias`` to the
  autocast dtype as ``F.linear`` does; the loss and gradients equal an explicit run on the cast tensors,
  and each gradient comes back in its tensor's own dtype.
* ``class_margins``, ``class_weight``, ``class_norms`` that require grad: the reference (``"auto"``, with
  a one-time warning), or a ``ValueError`` naming the table on a fused backend / the lean path.
* ``double_backward=True``: the reference (correct second derivatives, gradgradcheck in fp64), a
  ``ValueError`` before any work on a fused backend; the fused backward's error names the option.
"""

import warnings

import pytest
import torch

import fused_margin as fm
from fused_margin import functional

C, D, B = 7, 12, 6


def _backends():
    status = fm.available_backends("cpu", torch.bfloat16)
    return [
        pytest.param(name, marks=pytest.mark.skipif(status[name] != "ok", reason=status[name]))
        for name in ("reference", "cpu", "triton")
    ]


def _data(seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype).to(device)
    w = torch.randn(C, D, generator=g, dtype=dtype).to(device)
    b = torch.randn(C, generator=g, dtype=dtype).to(device)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    return x, w, b, y


def _margins(device="cpu"):
    return torch.linspace(0.1, 0.4, C, device=device)


def _run(x, w, b, y, head, backend, cast=None, **kw):
    """Loss and gradients of (x, w, b) (the leaves); ``cast`` casts them differentiably first (the
    explicit run that autocast must match)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    xs, ws, bs = leaves if cast is None else [t.to(cast) for t in leaves]
    loss = fm.margin_cross_entropy(
        xs,
        y,
        ws,
        bias=bs if head == "linear" else None,
        head=head,
        scale=8.0,
        class_margins=_margins(x.device),
        backend=backend,
        **kw,
    )
    grads = torch.autograd.grad(loss, leaves[:2] + (leaves[2:] if head == "linear" else []))
    return loss, grads


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("head", ["cosine", "linear"])
@pytest.mark.parametrize("class_chunk", ["off", 3])
def test_cpu_autocast_bf16_matches_an_explicit_bf16_run(backend, head, class_chunk):
    """fp32 features and weight under CPU autocast: the GEMMs in bf16 (the same numbers as casting by
    hand), the gradients fp32 (each leaf's own dtype); the lean path too."""
    x, w, b, y = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _run(x, w, b, y, head, backend, class_chunk=class_chunk)
    ref_loss, ref_grads = _run(x, w, b, y, head, backend, cast=torch.bfloat16, class_chunk=class_chunk)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and it is a bf16 computation: not the fp32 loss
    fp32_loss, _ = _run(x, w, b, y, head, backend, class_chunk=class_chunk)
    assert not torch.equal(loss, fp32_loss)


@pytest.mark.parametrize("backend", _backends())
def test_autocast_bf16_features_with_fp32_weight(backend):
    """What a training loop hits: the backbone's features come out bf16 under autocast while
    ``head.weight`` stays fp32; the module accepts them and the weight's gradient is fp32."""
    x, w, _, y = _data()
    head = fm.CosineClassifier(D, C)
    loss_fn = fm.DBMLoss([50, 40, 30, 20, 10, 5, 2], backend=backend)
    xb = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = torch.nn.functional.linear(xb, torch.eye(D))  # bf16 under autocast
        assert features.dtype == torch.bfloat16
        loss = loss_fn(features, y, weight=head.weight)
    loss.backward()
    assert head.weight.grad.dtype == torch.float32 and xb.grad.dtype == torch.float32
    assert torch.isfinite(head.weight.grad).all() and torch.isfinite(xb.grad).all()
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but input has torch.bfloat16"):
        loss_fn(features.detach(), y, weight=head.weight)  # outside autocast: the clear error


def test_autocast_leaves_the_logits_head_and_float64_alone():
    x, w, _, y = _data()
    logits = (x @ w.t()).requires_grad_()
    plain = fm.margin_cross_entropy(logits, y, scale=2.0, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fm.margin_cross_entropy(logits, y, scale=2.0, backend="reference")
        with pytest.raises(TypeError, match="weight has dtype torch.float64 but input has torch.bfloat16"):
            fm.margin_cross_entropy(x, y, w.double(), backend="reference")  # float64 is not cast (F.linear)
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda", "reference"])
@pytest.mark.parametrize("head", ["cosine", "linear"])
def test_cuda_autocast_matches_an_explicit_run(dtype, backend, head):
    status = fm.available_backends("cuda", dtype).get(backend, "ok")
    if status != "ok":
        pytest.skip(status)
    x, w, b, y = _data(device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        loss, grads = _run(x, w, b, y, head, backend)
    ref_loss, ref_grads = _run(x, w, b, y, head, backend, cast=dtype)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----- learnable tables -----------------------------------------------------------------------------------
def _table_case(name):
    """(input, weight, kwargs) with table ``name`` learnable."""
    x, w, _, y = _data()
    table = torch.linspace(0.5, 1.5, C).requires_grad_()
    if name == "class_norms":
        return x @ w.t(), None, y, dict(beta=torch.full((C,), 0.1), class_norms=table, head="logits")
    if name == "class_margins":
        return x, w, y, dict(class_margins=(table * 0.2).detach().requires_grad_(), scale=8.0)
    return x, w, y, dict(class_weight=table, scale=8.0, label_smoothing=0.1)


@pytest.mark.parametrize("name", functional.REFERENCE_ONLY_GRADS)
def test_learnable_table_on_a_fused_backend_is_refused_at_forward(name):
    x, w, y, kw = _table_case(name)
    for backend in ("cpu", "triton", "cuda"):
        with pytest.raises(ValueError, match=f"{name} requires grad.*backend='reference' computes its gradient"):
            fm.margin_cross_entropy(x, y, w, backend=backend, **kw)
    with pytest.raises(ValueError, match=f"{name} requires grad.*class_chunk='off'"):
        fm.margin_cross_entropy(x, y, w, class_chunk=3, **kw)  # the lean path (even on the reference)
    with torch.no_grad():  # no gradient asked for: the fused path as usual
        fm.margin_cross_entropy(x, y, w, class_chunk=3, **kw)


@pytest.mark.parametrize("name", functional.REFERENCE_ONLY_GRADS)
def test_learnable_table_on_auto_runs_the_reference_with_one_warning(name, monkeypatch):
    monkeypatch.setattr(functional, "_warned_learnable", set())
    x, w, y, kw = _table_case(name)
    table = kw[name]
    with pytest.warns(RuntimeWarning, match=f"{name} requires grad.*backend='auto' runs the reference"):
        loss = fm.margin_cross_entropy(x, y, w, **kw)
    (grad,) = torch.autograd.grad(loss, table)
    ref = fm.margin_cross_entropy(x, y, w, backend="reference", **kw)
    (want,) = torch.autograd.grad(ref, table)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, want, rtol=0, atol=0)
    assert grad.abs().sum() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        fm.margin_cross_entropy(x, y, w, **kw)


# ----- double backward ------------------------------------------------------------------------------------
def test_double_backward_on_a_fused_backend_fails_before_any_work(monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("apply_loss ran")

    monkeypatch.setattr(functional, "apply_loss", no_work)
    x, w, _, y = _data()
    for backend in ("cpu", "triton", "cuda"):
        with pytest.raises(ValueError, match="double_backward=True.*pass backend='reference'"):
            fm.margin_cross_entropy(x, y, w, backend=backend, double_backward=True)
    with pytest.raises(ValueError, match="double_backward=True.*class_chunk='off'"):
        fm.margin_cross_entropy(x, y, w, class_chunk=2, double_backward=True)
    with pytest.raises(TypeError, match="double_backward must be a bool"):
        fm.margin_cross_entropy(x, y, w, double_backward="yes")


@pytest.mark.parametrize("path", ["cpu", "lean", "reference-lean"])
def test_fused_create_graph_error_names_the_option(path):
    """A create_graph backward gives the first-order gradients (torch.func.vjp asks for one); differentiating
    them again raises, naming the option that gives second derivatives."""
    kwargs = {
        "cpu": dict(backend="cpu"),
        "lean": dict(class_chunk=2),
        "reference-lean": dict(backend="reference", class_chunk=2),
    }[path]
    if path == "cpu" and fm.available_backends("cpu", torch.float32)["cpu"] != "ok":
        pytest.skip("no cpu backend")
    x, w, _, y = _data()
    x.requires_grad_()
    w.requires_grad_()
    loss = fm.margin_cross_entropy(x, y, w, **kwargs)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    (first,) = torch.autograd.grad(fm.margin_cross_entropy(x, y, w, **kwargs), x)
    torch.testing.assert_close(gx.detach(), first)
    expected = (
        "pass double_backward=True"
        if path == "cpu"
        else (
            "memory-lean path .*first-order gradients only.*double_backward=True.*class_chunk='off' with "
            "backend='reference'"
        )
    )
    with pytest.raises(RuntimeError, match=expected):
        torch.autograd.grad(gx.sum(), w)
    with pytest.raises(RuntimeError, match=expected):
        gx.sum().backward()


@pytest.mark.parametrize("head", ["cosine", "linear", "logits"])
def test_double_backward_gives_correct_second_derivatives(head):
    """gradcheck and gradgradcheck in fp64 through ``double_backward=True`` with ``backend="auto"``
    (and an input that would take the fused path in fp32: the option routes it to the reference)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 4])
    P = (0.1 * torch.randn(3, 5, generator=g, dtype=torch.float64)).requires_grad_()
    margins = torch.linspace(0.05, 0.2, 5, dtype=torch.float64)

    def loss(x, w, P):
        if head == "logits":
            return fm.margin_cross_entropy(x @ w.t(), y, scale=2.0, pair_perturbation=P, double_backward=True)
        return fm.margin_cross_entropy(
            x,
            y,
            w,
            head=head,
            scale=4.0,
            class_margins=margins,
            margin_type="additive_angular" if head == "cosine" else "additive_cosine",
            pair_perturbation=P,
            double_backward=True,
        )

    assert torch.autograd.gradcheck(loss, (x, w, P))
    assert torch.autograd.gradgradcheck(loss, (x, w, P))
    # fp32 through the option (fused backends available or not): second derivatives exist and match fp64
    x32, w32, P32 = (t.detach().float().requires_grad_() for t in (x, w, P))
    (gx,) = torch.autograd.grad(
        loss(x32, w32, P32)
        if head == "logits"
        else fm.margin_cross_entropy(
            x32,
            y,
            w32,
            head=head,
            scale=4.0,
            class_margins=margins.float(),
            pair_perturbation=P32,
            margin_type="additive_angular" if head == "cosine" else "additive_cosine",
            double_backward=True,
        ),
        x32,
        create_graph=True,
    )
    assert gx.requires_grad
    (hw,) = torch.autograd.grad(gx.sum(), w32)
    (gx64,) = torch.autograd.grad(loss(x, w, P), x, create_graph=True)
    (hw64,) = torch.autograd.grad(gx64.sum(), w)
    torch.testing.assert_close(hw.double(), hw64, rtol=1e-4, atol=1e-5)


def test_module_option_and_metalad_virtual_step_on_a_fused_backend():
    """``double_backward`` is a module option (checked at construction like the others), and MetaLAD's
    virtual step passes it, so a MetaLAD whose backend is fused still differentiates its virtual step."""
    x, w, _, y = _data()
    x.requires_grad_()
    loss = fm.ArcFaceLoss(scale=8.0, double_backward=True)(x, y, w)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    assert gx.requires_grad
    with pytest.raises(ValueError, match="double_backward=True"):
        fm.ArcFaceLoss(scale=8.0, double_backward=True, backend="cpu")(x, y, w)
    if fm.available_backends("cpu", torch.float32)["cpu"] != "ok":
        return

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(D, 5)
            self.head = fm.CosineClassifier(5, C)

        def forward(self, v):
            return self.body(v)

    torch.manual_seed(0)
    net = Net()
    lad = fm.MetaLAD([40, 30, 20, 10, 8, 4, 2], 5, scale=8.0, backend="cpu")
    with torch.no_grad():
        lad.update_statistics(net(x), y)
    lam = lad.lam.detach().clone().requires_grad_()
    meta = lad.virtual_meta_loss(net, x.detach(), y, x.detach().flip(0), y.flip(0), 0.3, lam=lam)
    (grad,) = torch.autograd.grad(meta, lam)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_module_double_backward_checked_at_construction():
    with pytest.raises(TypeError, match="double_backward must be a bool"):
        fm.CosFaceLoss(double_backward=1)
    assert fm.LDAMLoss([5, 3, 2], double_backward=True).options["double_backward"] is True
