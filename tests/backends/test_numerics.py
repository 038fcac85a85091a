"""Numerics every backend must share (docs/loss.md section 8).

* Confident rows: per-row losses from 1e-8 to 1e-2 keep full precision. The loss and the gradient are
  judged against the float64 truth computed from the same (dtype-rounded) inputs, and must err no more
  than twice ``F.cross_entropy``'s own fp32 error on the same final logits (plus 1e-9), and each row's
  loss no more than ``LOSS_RTOL`` relative.
* Non-finite inputs (+inf, -inf, NaN): the same ``lse``, ``pred``, loss and gradient NaN/inf pattern as the
  reference, which itself follows ``torch.logsumexp``, ``torch.argmax`` and ``F.cross_entropy``.
* Every kept target with class weight 0 under ``reduction="mean"``: NaN loss and NaN gradient on every
  backend (``F.cross_entropy``'s 0 / 0), with or without label smoothing.
* fp16 cosine head with feature and class-weight norms from 1e-3 to 1e4: within the reference's own fp16
  error (no overflow of ``x @ w.T``, no under/overflow of ``dL/draw``).
* ``torch.func.grad`` over the fused backends; ``torch.func.vmap`` refused with a message naming the
  reference backend.
* The Triton pieces on the interpreter: the bf16 rounding helper keeps NaN bit patterns, column offsets
  are 64-bit.

The backends: ``reference`` always, ``cpu`` when the C++ extension is built, ``triton`` on a GPU or under
``TRITON_INTERPRET=1``, ``cuda`` (marked ``cuda``) when the extension has its CUDA kernels.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fused_margin as fm
from fused_margin.backends import extension

HAVE_CUDA = torch.cuda.is_available()
TRITON_RUNS = HAVE_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401
except ImportError:
    TRITON_RUNS = False


def _backend_params(include_reference=True):
    params = [pytest.param("reference", "cpu", id="reference")] if include_reference else []
    params.append(
        pytest.param(
            "cpu",
            "cpu",
            id="cpu",
            marks=pytest.mark.skipif(not extension.is_built(), reason="the C++ extension is not built"),
        )
    )
    params.append(
        pytest.param(
            "triton",
            "cuda" if HAVE_CUDA else "cpu",
            id="triton",
            marks=pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs a GPU or TRITON_INTERPRET=1"),
        )
    )
    params.append(
        pytest.param(
            "cuda",
            "cuda",
            id="cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(
                    not extension.cuda_built(), reason="the extension was built without its CUDA kernels"
                ),
            ],
        )
    )
    return params


BACKENDS = _backend_params()
FUSED_BACKENDS = _backend_params(include_reference=False)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# confident rows

LOSS_RTOL = 1e-5  # docs/loss.md section 8's fp32 rule, per row
CONFIDENT_VARIANTS = {
    # plain softmax CE on scaled logits
    "plain": dict(scale=32.0),
    # LDAM-style additive margins with a balanced-softmax offset and class weights
    "additive_offset_weights": dict(
        scale=32.0, input_is_cosine=True, margin_type="additive_cosine", margins=True, offset=True, weights=True
    ),
    # ArcFace-style angular margins (the target logit through fp32 acos/cos)
    "angular": dict(scale=32.0, input_is_cosine=True, margin_type="additive_angular", margins=True),
}


def _psi64(c, m, margin_type):
    if margin_type == "additive_angular":
        return torch.cos(torch.acos(c.clamp(-1 + 1e-7, 1 - 1e-7)) + m)
    return c - m


def confident_case(variant, loss_level, dtype, B=16, C=37, seed=0):
    """Rows whose true loss is ``loss_level`` (times a factor in [0.5, 2]); one ignored row. Returns the
    run's inputs (rounded to ``dtype``), the options, and the float64 final logits of the kept rows."""
    opts = dict(CONFIDENT_VARIANTS[variant])
    g = _gen(seed + int(-math.log10(loss_level)))
    s = opts["scale"]
    z = torch.rand(B, C, generator=g, dtype=torch.float64) * 0.7 - 0.8  # cosines in [-0.8, -0.1]
    y = torch.randint(0, C, (B,), generator=g)
    tables = {}
    m = torch.zeros(C, dtype=torch.float64)
    a = torch.zeros(C, dtype=torch.float64)
    if opts.pop("margins", False):
        m = 0.05 + 0.15 * torch.rand(C, generator=g, dtype=torch.float64)
        tables["class_margins"] = m.float()
        m = m.float().double()
    if opts.pop("offset", False):
        a = torch.log(0.05 + torch.rand(C, generator=g, dtype=torch.float64))
        tables["logit_offset"] = a.float()
        a = a.float().double()
    if opts.pop("weights", False):
        tables["class_weight"] = (0.3 + 2.0 * torch.rand(C, generator=g, dtype=torch.float64)).float()
    margin_type = opts.get("margin_type", "additive_cosine")
    # the target logit t that makes log1p(sum_{j != y} e^{l_j - t}) the wanted loss, then the cosine giving it
    rows = torch.arange(B)
    onehot = F.one_hot(y, C).bool()
    others = torch.logsumexp((s * z + a).masked_fill(onehot, -math.inf), 1)
    level = loss_level * torch.exp2(2 * torch.rand(B, generator=g, dtype=torch.float64) - 1)
    t = others - torch.log(torch.expm1(level))
    psi = (t - a[y]) / s
    if margin_type == "additive_angular":
        z[rows, y] = torch.cos(torch.acos(psi) - m[y])
    else:
        z[rows, y] = psi + m[y]
    assert (z.abs() < 1).all()
    y[3] = -100
    x = z.to(dtype)
    kept = y != -100
    # the final logits of the kept rows, in float64 from the rounded inputs
    zr = x.double()
    logits = s * zr + a
    yk = torch.where(kept, y, torch.zeros_like(y))
    logits[rows, yk] = s * _psi64(zr[rows, yk], m[yk], margin_type) + a[yk]
    return x, y, dict(opts, **tables), logits[kept], y[kept]


def _run(backend, device, x, y, options, reduction="none"):
    leaf = x.to(device).requires_grad_()
    tables = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    loss = fm.margin_cross_entropy(leaf, y.to(device), **tables, reduction=reduction, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach().cpu(), grad.cpu()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", list(CONFIDENT_VARIANTS))
@pytest.mark.parametrize("loss_level", [1e-8, 1e-6, 1e-4, 1e-2])
def test_confident_rows_as_precise_as_cross_entropy(backend, device, dtype, variant, loss_level):
    x, y, options, logits, y_kept = confident_case(variant, loss_level, dtype)
    kept = y != -100
    weight = options.get("class_weight")
    # the truth: the reference in float64 on the same rounded inputs (tables as the run gets them)
    options64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    truth_loss, truth_grad = _run("reference", "cpu", x.double(), y, options64)
    truth_loss = truth_loss[kept]
    # F.cross_entropy in fp32 on the same final logits, its gradient taken to the input through the exact
    # (float64) Jacobian of the logits: s off the target, dt/dz on it
    l32 = logits.float().requires_grad_()
    ce = F.cross_entropy(l32, y_kept, weight=weight, reduction="none")
    (ce_dl,) = torch.autograd.grad(ce.sum(), l32)
    zr = x.double()[kept].requires_grad_()
    s = options["scale"]
    m = options.get("class_margins", torch.zeros(zr.shape[1])).double()
    a = options.get("logit_offset", torch.zeros(zr.shape[1])).double()
    rows = torch.arange(zr.shape[0])
    t = s * _psi64(zr[rows, y_kept], m[y_kept], options.get("margin_type", "additive_cosine")) + a[y_kept]
    (dt_dz,) = torch.autograd.grad(t.sum(), zr)
    jac = torch.full_like(zr, s)
    jac[rows, y_kept] = dt_dz[rows, y_kept]
    ce_grad = ce_dl.double() * jac
    ce_loss_err = (ce.double() - truth_loss).abs().max().item()
    ce_grad_err = (ce_grad - truth_grad[kept]).abs().max().item()

    loss, grad = _run(backend, device, x, y, options)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert torch.equal(grad[~kept], torch.zeros_like(grad[~kept]))
    loss_err = (loss[kept].double() - truth_loss).abs()
    # a bf16 gradient is the fp32 one rounded once more on output: allow that rounding (one bf16 ulp of the
    # element) on top, which F.cross_entropy's fp32 gradient does not pay
    output_rounding = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    grad_err = ((grad[kept].double() - truth_grad[kept]).abs() - output_rounding * truth_grad[kept].abs()).max().item()
    assert loss_err.max().item() <= 2 * ce_loss_err + 1e-9, (
        f"loss error {loss_err.max().item():.3g} > 2 x F.cross_entropy's {ce_loss_err:.3g}"
    )
    assert grad_err <= 2 * ce_grad_err + 1e-9, (
        f"gradient error {grad_err:.3g} > 2 x F.cross_entropy's {ce_grad_err:.3g}"
    )
    worst = (loss_err / truth_loss).max().item()
    assert worst <= LOSS_RTOL, f"a row's loss is {worst:.3g} off relative (truth {truth_loss.min().item():.3g}...)"


# ---------------------------------------------------------------------------------------------------
# non-finite inputs

NAN, INF = float("nan"), float("inf")
NONFINITE_ROWS = [  # (row, target)
    ([0.5, INF, 0.1, 0.2, -0.3], 0),  # +inf off the target: lse +inf, loss +inf
    ([0.5, INF, 0.1, 0.2, -0.3], 1),  # +inf target: loss NaN (inf - inf), as F.cross_entropy
    ([INF, INF, 0.1, 0.2, -0.3], 2),  # two +inf
    ([0.5, -INF, 0.1, 0.2, -0.3], 0),  # -inf off the target: ordinary
    ([0.5, -INF, 0.1, 0.2, -0.3], 1),  # -inf target: loss +inf, gradient -1 there
    ([-INF, -INF, -INF, -INF, -INF], 3),  # every logit -inf: lse -inf, pred 0, loss NaN
    ([0.5, NAN, 0.1, 0.2, -0.3], 0),  # NaN off the target
    ([0.5, 0.1, NAN, 0.2, NAN], 2),  # NaN target; pred the first NaN
    ([0.9, 0.1, 0.2, -0.3, 0.25], 0),  # an ordinary row
    ([0.9, INF, 0.2, -0.3, NAN], -100),  # ignored: loss 0, gradient 0, lse and pred still reported
]
NONFINITE_OPTIONS = {
    "plain": dict(),
    "margins_smoothing_weights": dict(scale=4.0, input_is_cosine=True, margins=True, label_smoothing=0.1, weights=True),
}


def _nonfinite_case(name):
    x = torch.tensor([r for r, _ in NONFINITE_ROWS])
    y = torch.tensor([t for _, t in NONFINITE_ROWS])
    opts = dict(NONFINITE_OPTIONS[name])
    g = _gen(5)
    if opts.pop("margins", False):
        opts["class_margins"] = 0.1 + 0.2 * torch.rand(x.shape[1], generator=g)
    if opts.pop("weights", False):
        opts["class_weight"] = 0.5 + torch.rand(x.shape[1], generator=g)
    return x, y, opts


def _run_aux(backend, device, x, y, options, dtype=torch.float32):
    leaf = x.to(dtype).to(device).requires_grad_()
    tables = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    loss, aux = fm.margin_cross_entropy(
        leaf, y.to(device), **tables, reduction="none", backend=backend, return_aux=True
    )
    (grad,) = torch.autograd.grad(loss, leaf, torch.linspace(0.5, 1.5, loss.shape[0]).to(device))
    return loss.detach().cpu(), aux.lse.cpu(), aux.pred.cpu(), grad.float().cpu()


def _same_pattern(name, got, want, rtol=1e-5):
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaNs differ\n{got}\n{want}"
    infinite = torch.isinf(want)
    assert torch.equal(torch.isinf(got), infinite) and torch.equal(got[infinite], want[infinite]), (
        f"{name}: infinities differ\n{got}\n{want}"
    )
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite], want[finite], rtol=rtol, atol=1e-6), f"{name}\n{got}\n{want}"


def test_reference_non_finite_follows_torch():
    """Without margins the reference is F.cross_entropy on every row free of +inf (the same loss and
    gradient, NaN and inf included); lse is torch.logsumexp's and pred torch.argmax's (the first NaN).
    Where a logit is +inf, ``F.cross_entropy``'s log_softmax turns the whole row into NaN; the reference
    keeps ``loss = lse - l_y`` (+inf off the target, NaN on it) and the softmax gradient
    ``p_j - [j = y]`` with ``p_j = exp(l_j - lse)``: NaN exactly at the +inf logits, 0 elsewhere."""
    x, y, _ = _nonfinite_case("plain")
    loss, lse, pred, grad = _run_aux("reference", "cpu", x, y, {})
    upstream = torch.linspace(0.5, 1.5, x.shape[0])
    leaf = x.clone().requires_grad_()
    ce = F.cross_entropy(leaf, y, reduction="none")
    (ce_grad,) = torch.autograd.grad(ce, leaf, upstream)
    _same_pattern("lse", lse, torch.logsumexp(x, 1))
    assert torch.equal(pred, x.argmax(1))
    kept = y != -100
    plus_inf = (x == INF).any(1) & kept
    ordinary = ~plus_inf & kept  # F.cross_entropy's ignored row has a NaN gradient (0 x NaN); SPEC: 0
    _same_pattern("loss", loss[~plus_inf], ce.detach()[~plus_inf])
    _same_pattern("grad", grad[ordinary], ce_grad[ordinary])
    rows = plus_inf.nonzero().squeeze(1)
    assert len(rows) == 3
    _same_pattern("loss (+inf rows)", loss[rows], torch.logsumexp(x[rows], 1) - x[rows, y[rows]])
    want = torch.exp(x[rows] - torch.logsumexp(x[rows], 1, keepdim=True))  # NaN at +inf, 0 elsewhere
    want[torch.arange(len(rows)), y[rows]] -= 1.0
    _same_pattern("grad (+inf rows)", grad[rows], want * upstream[rows, None])
    assert torch.equal(grad[~kept], torch.zeros_like(grad[~kept]))


@pytest.mark.parametrize("backend,device", FUSED_BACKENDS)
@pytest.mark.parametrize("name", list(NONFINITE_OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_inputs_match_the_reference(backend, device, name, dtype):
    x, y, options = _nonfinite_case(name)
    want = _run_aux("reference", "cpu", x, y, options, dtype)
    if backend == "triton":
        from fused_margin.backends.triton import max_block

        context = max_block(2)  # the online max and sum merged across column blocks
    else:
        context = _nullcontext()
    with context:
        got = _run_aux(backend, device, x, y, options, dtype)
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    for label, a, b in zip(("loss", "lse", "pred", "grad"), got, want):
        if label == "pred":
            assert torch.equal(a, b), f"pred {a} != {b}"
        else:
            _same_pattern(label, a, b, rtol)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------------
# every kept target weighs 0 under reduction="mean"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("head", ["cosine", "logits"])
def test_zero_weight_denominator_is_nan_everywhere(backend, device, label_smoothing, head):
    """sum_i w_{y_i} = 0 over the kept rows: F.cross_entropy gives NaN (its nll part is 0 / 0), and so
    must every backend, loss and gradient alike (ignored rows keep a zero gradient)."""
    g = _gen(3)
    C = 6
    y = torch.tensor([1, 4, -100, 1, 4])
    weight = 0.5 + torch.rand(C, generator=g)
    weight[1] = weight[4] = 0.0
    logits = torch.randn(5, C, generator=g)
    ce = F.cross_entropy(logits, y, weight=weight, label_smoothing=label_smoothing)
    assert ce.isnan()
    if head == "logits":
        leaves = [logits.clone().to(device).requires_grad_()]
        kwargs = {}
    else:
        leaves = [
            torch.randn(5, 3, generator=g).to(device).requires_grad_(),
            torch.randn(C, 3, generator=g).to(device).requires_grad_(),
        ]
        kwargs = dict(head="cosine", scale=10.0, class_margins=torch.full((C,), 0.2).to(device))
    loss = fm.margin_cross_entropy(
        leaves[0],
        y.to(device),
        *leaves[1:],
        class_weight=weight.to(device),
        label_smoothing=label_smoothing,
        backend=backend,
        **kwargs,
    )
    grads = torch.autograd.grad(loss, leaves)
    assert loss.isnan()
    kept = y != -100
    assert grads[0][kept.to(device)].isnan().all()
    assert torch.equal(grads[0][~kept.to(device)], torch.zeros_like(grads[0][~kept.to(device)]))
    if len(grads) > 1:
        assert grads[1].isnan().all()


# ---------------------------------------------------------------------------------------------------
# fp16 cosine head: feature and class-weight norms from 1e-3 to 1e4


@pytest.mark.parametrize("backend,device", FUSED_BACKENDS)
@pytest.mark.parametrize(
    "x_norm,w_norm",
    [(2000.0, 40.0), (1000.0, 30.0), (1e-3, 1e-3), (1e4, 1e4), (1e-3, 1e4), (1e4, 1e-3), (3000.0, 1.0), (1.0, 1.0)],
)
def test_fp16_cosine_head_stays_in_range(backend, device, x_norm, w_norm):
    """``x @ w.T`` in fp16 overflows past 65504 (``|x| |w| cos``) and ``dL/draw = G / (|x| |w|)``
    under/overflows: the fused backends rescale the operands by powers of two. Judged as the kernel
    tests judge fp16 (no further from the float64 truth than twice the reference run in fp16, plus 2e-5
    of the largest |truth|), with one row aligned with its class."""
    g = _gen(int(math.log10(x_norm) * 10 + math.log10(w_norm)) % 1000)
    B, C, D = 32, 11, 16
    x = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    w = F.normalize(torch.randn(C, D, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, C, (B,), generator=g)
    x[0] = w[y[0]]  # aligned: x . w = |x| |w|
    x = x * x_norm * (0.8 + 0.4 * torch.rand(B, 1, generator=g, dtype=torch.float64))
    w = w * w_norm * (0.8 + 0.4 * torch.rand(C, 1, generator=g, dtype=torch.float64))
    margins = 0.1 + 0.3 * torch.rand(C, generator=g)
    options = dict(head="cosine", scale=30.0, margin_type="additive_angular", lambda_inst=1.0, reduction="none")

    def run(name, dev, dtype):
        leaves = [x.to(dtype).to(dev).requires_grad_(), w.to(dtype).to(dev).requires_grad_()]
        if dtype == torch.float64:  # the truth on the same fp16-rounded inputs
            leaves = [v.detach().to(torch.float16).double().requires_grad_() for v in leaves]
        mt = margins.double() if dtype == torch.float64 else margins
        loss = fm.margin_cross_entropy(
            leaves[0], y.to(dev), leaves[1], class_margins=mt.to(dev), backend=name, **options
        )
        grads = torch.autograd.grad(loss, leaves, torch.linspace(0.5, 1.5, B, dtype=loss.dtype).to(dev))
        return [loss.detach().cpu()] + [v.cpu() for v in grads]

    truth = run("reference", "cpu", torch.float64)
    ref = run("reference", "cpu", torch.float16)
    got = run(backend, device, torch.float16)
    for label, a, r, t in zip(("loss", "grad_x", "grad_w"), got, ref, truth):
        assert torch.isfinite(a).all(), f"{label}: non-finite where the truth is {t}"
        err = (a.double() - t).abs().max().item()
        ref_err = (r.double() - t).abs().max().item()
        size = t.abs().max().item()
        assert err <= 2 * ref_err + 2e-5 * size + 1e-30, (
            f"{label}: error {err:.3g} > 2 x the reference's fp16 error {ref_err:.3g} + 2e-5 x {size:.3g}"
        )


def test_fp16_rescaling_does_not_touch_fp32_and_bf16():
    """Only fp16 is rescaled: fp32 and bf16 give bit-identical results to the unscaled GEMM path (through the
    eager row kernel, whose raw must be exactly x @ w.T)."""
    import row_torch

    from fused_margin.paths import fused

    kernel = row_torch.ROW_KERNEL
    g = _gen(9)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 8, generator=g).to(dtype) * 300
        w = torch.randn(5, 8, generator=g).to(dtype) * 40
        operands = fused._cosine_operands(kernel, x, w)
        assert operands[0] is x and operands[1] is w and operands[8] is None and operands[9] is None
    x = torch.randn(4, 8, generator=g).half() * 3000
    w = torch.randn(5, 8, generator=g).half() * 40
    xs, ws, x_norm, w_norm, row_scale, col_scale, row_proj, col_proj, x_pow, w_pow = fused._cosine_operands(
        kernel, x, w
    )
    assert torch.equal(xs.float(), x.float() * x_pow[:, None]) and torch.equal(ws.float(), w.float() * w_pow[:, None])
    assert (torch.log2(x_pow) == torch.round(torch.log2(x_pow))).all()
    assert ((x_norm * x_pow) < 1.5).all() and ((x_norm * x_pow) >= 0.7).all()
    # the scalings and projection factors are those of the rescaled operands
    torch.testing.assert_close(row_scale, 1.0 / torch.linalg.vector_norm(xs.float(), dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(col_proj, torch.linalg.vector_norm(ws.float(), dim=1) ** -2, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------------
# torch.func


@pytest.mark.parametrize("backend,device", FUSED_BACKENDS)
@pytest.mark.parametrize("head", ["cosine", "logits"])
def test_torch_func_grad_over_fused_backends(backend, device, head):
    g = _gen(2)
    C = 7
    y = torch.tensor([0, 3, -100, 6]).to(device)
    margins = (0.1 + 0.3 * torch.rand(C, generator=g)).to(device)
    weight = torch.randn(C, 5, generator=g).to(device)
    x = torch.randn(4, 5 if head == "cosine" else C, generator=g).to(device)
    if head == "logits":
        x = torch.tanh(x)

    def loss_of(name):
        def f(inp, w):
            return fm.margin_cross_entropy(
                inp,
                y,
                w if head == "cosine" else None,
                class_margins=margins,
                scale=16.0,
                margin_type="additive_angular",
                lambda_inst=1.0,
                input_is_cosine=True,
                label_smoothing=0.1,
                backend=name,
            )

        return f

    want = torch.func.grad(loss_of("reference"), argnums=(0, 1) if head == "cosine" else 0)(x, weight)
    got = torch.func.grad(loss_of(backend), argnums=(0, 1) if head == "cosine" else 0)(x, weight)
    for a, b in zip(got if head == "cosine" else (got,), want if head == "cosine" else (want,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", FUSED_BACKENDS)
def test_nested_torch_func_grad_refuses_second_order(backend, device):
    """torch.func.grad asks the backward for a graph; the fused backends give first-order gradients only,
    so differentiating them again raises with a message naming backend='reference'."""
    x = torch.randn(3, 4, generator=_gen(1)).to(device)
    y = torch.tensor([0, 1, 2]).to(device)

    def f(inp):
        return fm.margin_cross_entropy(inp, y, backend=backend)

    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.func.grad(lambda v: torch.func.grad(f)(v).sum())(x)


@pytest.mark.parametrize("backend,device", FUSED_BACKENDS)
def test_vmap_over_fused_backends_names_the_reference(backend, device):
    x = torch.randn(2, 3, 4, generator=_gen(1)).to(device)
    y = torch.tensor([0, 1, 2]).to(device)
    with pytest.raises(RuntimeError, match="vmap.*backend='reference'"):
        torch.func.vmap(lambda v: fm.margin_cross_entropy(v, y, backend=backend))(x)
    expected = torch.stack([fm.margin_cross_entropy(v, y, backend="reference") for v in x])
    torch.testing.assert_close(
        torch.func.vmap(lambda v: fm.margin_cross_entropy(v, y, backend="reference"))(x), expected
    )


# ---------------------------------------------------------------------------------------------------
# Triton pieces on the interpreter (compiled on a GPU)

if TRITON_RUNS:
    import triton
    import triton.language as tl

    from fused_margin.backends.triton._common import round_to

    @triton.jit
    def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, round_to(tl.load(x_ptr + offs, mask=mask), y_ptr.dtype.element_ty), mask=mask)


@pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_triton_bf16_rounding_keeps_nan_bit_patterns():
    """``round_to`` rounds on the fp32 bits; a NaN whose bits are 0x7FFFFFFF or 0xFFFFFFFF must not carry
    into +-0, nor 0x7F800001 truncate to inf."""
    device = "cuda" if HAVE_CUDA else "cpu"
    patterns = [
        0x7FFFFFFF,
        0xFFFFFFFF,
        0x7F800001,
        0xFF800001,
        0x7FC00000,
        0xFFC00000,
        0x7FBFFFFF,
        0x7F8000FF,
        0x3F800000,
        0x7F7FFFFF,
        0x7F800000,
        0xFF800000,
    ]
    bits = torch.tensor([p - (1 << 32) if p >= 1 << 31 else p for p in patterns], dtype=torch.int32)
    x = bits.view(torch.float32).to(device)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
    _round_kernel[(1,)](x, y, x.numel(), BLOCK=16)
    want = x.to(torch.bfloat16)
    assert torch.equal(y.isnan(), x.isnan()), (y, x)
    assert torch.equal(y[~want.isnan()], want[~want.isnan()])


@pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_triton_column_offsets_are_64_bit():
    """A transposed view whose column stride times the column index passes 2^31 elements: ``cols * stride``
    in int32 would wrap and read elsewhere. The storage is 4 GiB of address space, of which the test
    touches a few pages."""
    device = "cuda" if HAVE_CUDA else "cpu"
    stride = 1 << 30
    C = 3
    try:
        storage = torch.empty(stride * (C - 1) + 2, dtype=torch.bfloat16, device=device)
    except (RuntimeError, MemoryError) as error:
        pytest.skip(f"cannot reserve the address space: {error}")
    values = torch.tensor([[0.3, -0.2, 0.9], [0.1, 0.5, -0.4]], dtype=torch.bfloat16)
    raw = storage.as_strided((2, C), (1, stride))
    with torch.no_grad():
        for i in range(2):
            for j in range(C):
                storage[i + j * stride] = values[i, j]
    assert torch.equal(raw.cpu(), values)
    y = torch.tensor([2, 1], device=device)
    pair = torch.zeros(2, C, device=device)
    loss, aux = fm.margin_cross_entropy(
        raw, y, scale=3.0, pair_perturbation=pair, reduction="none", backend="triton", return_aux=True
    )
    want, want_aux = fm.margin_cross_entropy(
        values.to(device), y, scale=3.0, pair_perturbation=pair, reduction="none", backend="reference", return_aux=True
    )
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(aux.lse, want_aux.lse, rtol=1e-6, atol=1e-6)
