"""The harness shared by the fused-kernel tests (``test_triton.py``, ``test_extension.py``).

A *case* is a set of float64 master tensors, labels and loss options (:func:`make_case`, the named
``CASES``). :func:`compare` runs it through the public API (``margin_cross_entropy``) on a fused backend
and judges it against the float64 reference run on the same rounded inputs (docs/loss.md section 8):

- fp32: every output (loss, lse, gradients) within ``FP32_RTOL`` x its largest |truth| (inf-norm);
- bf16/fp16: no further from the truth than the reference run in that dtype (twice that for the cosine
  and linear heads, which round the GEMM output and dL/draw where the reference rounds elsewhere), plus
  a floor of 2e-5 x the largest |truth|;
- ``pred``/``hard`` equal to the truth's wherever the top two base scores are not tied at the dtype's
  resolution, and ``hard`` consistent with ``pred`` and the hard mode.

Where the two backends' tests differ, the harness takes a parameter: the ``device`` to run on and a
``context`` entered around each run (the Triton tests force a small column block with
``fused_margin.backends.triton.max_block``).

tests/conftest.py puts this directory on ``sys.path`` and registers this module for assertion rewriting, so the
test modules import it as ``kernel_cases``.
"""

import contextlib
import zlib

import torch

import fused_margin as fm
from fused_margin.config import CONFIG
from fused_margin.core import reference
from fused_margin.core.options import vectors
from fused_margin.core.spec import LossTables, MarginLossSpec, row_tables

LOW_PRECISION = (torch.bfloat16, torch.float16)
MODEL_TENSORS = ("input", "weight", "bias")  # take the run's dtype; the tables stay fp32 (fp64 for the truth)
FP32_RTOL = 1e-5


# ---------------------------------------------------------------------------------------------------
# cases: fp64 master tensors, labels, options and the names that get gradients


def _seed(name, modulus):
    """A named case's seed: crc32 of its name mod ``modulus``. The Triton tests have drawn their data with
    ``modulus`` 1000, the extension's with 10000; each keeps its own so that each runs the data it always
    has."""
    return zlib.crc32(name.encode()) % modulus


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _uniform(shape, lo, hi, g):
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)


def make_case(
    head="cosine",
    *,
    B=6,
    C=37,
    D=8,
    seed=0,
    scale=30.0,
    margins=None,
    offset=False,
    pair=False,
    weights=False,
    bias=False,
    marc=False,
    ignored=(),
    grads=(),
    **options,
):
    """A case: ``head`` cosine/linear (features and class weights) or logits (``input_is_cosine`` when
    ``options`` says so); ``margins`` a (lo, hi) range of class margins; ``grads`` the extra leaves
    (beyond the input and weight) that require grad."""
    g = _gen(seed)
    tensors = {}
    if head == "logits":
        if options.get("input_is_cosine"):
            tensors["input"] = _uniform((B, C), -0.95, 0.95, g)
        else:
            tensors["input"] = 3.0 * torch.randn(B, C, generator=g, dtype=torch.float64)
    else:
        tensors["input"] = torch.randn(B, D, generator=g, dtype=torch.float64)
        tensors["weight"] = torch.randn(C, D, generator=g, dtype=torch.float64) * _uniform((C, 1), 0.5, 2.0, g)
        options["head"] = head
    if bias:
        tensors["bias"] = 0.3 * torch.randn(C, generator=g, dtype=torch.float64)
    if margins is not None:
        tensors["class_margins"] = _uniform(C, *margins, g)
    if offset:
        tensors["logit_offset"] = torch.log(_uniform(C, 0.01, 1.0, g))
    if pair:
        tensors["pair_perturbation"] = 0.5 * torch.randn(B, C, generator=g, dtype=torch.float64)
    if weights:
        tensors["class_weight"] = _uniform(C, 0.2, 3.0, g)
    if marc:
        tensors["omega"] = _uniform(C, 0.5, 1.5, g)
        tensors["beta"] = 0.2 * torch.randn(C, generator=g, dtype=torch.float64)
        if head == "logits":
            tensors["class_norms"] = _uniform(C, 0.5, 2.0, g)
    target = torch.randint(0, C, (B,), generator=g)
    for row in ignored:
        target[row] = options.get("ignore_index", -100)
    names = ["input"] + (["weight"] if "weight" in tensors else []) + list(grads)
    return {"tensors": tensors, "target": target, "options": dict(scale=scale, **options), "grads": names}


def forward_args(raw, target, tables=None, **values):
    """A row op's forward arguments ``(raw, target, tables, floats, ints)`` from named tables (a dict; absent
    ones None) and the kernels' option values by their kernel names (``scale=3.0, margin_type=1, ...``;
    fused_margin.core.options.vectors)."""
    floats, ints = vectors(**values)
    return raw, target, row_tables(**(tables or {})), floats, ints


def backward_args(
    raw,
    target,
    tables,
    lse,
    nll,
    target_grad,
    grad_rows,
    denom,
    *,
    scale_grad=True,
    row_proj=None,
    col_proj=None,
    col_stats=False,
    **values,
):
    """A row op's backward arguments (the contract's order) from named tables (``class_margins`` is
    ignored) and the kernels' option values."""
    floats, ints = vectors(**values)
    tables = {k: v for k, v in (tables or {}).items() if k != "class_margins"}
    return (
        raw,
        target,
        row_tables(**tables),
        lse,
        nll,
        target_grad,
        grad_rows,
        denom,
        floats,
        ints,
        scale_grad,
        row_proj,
        col_proj,
        col_stats,
    )


def check_upstream_gradient(backend, dtype, head, monkeypatch, device="cpu", context=contextlib.nullcontext):
    """``loss * k`` (k = 1, 2.5, -0.125) on ``backend`` with the gradient formed in the forward
    (``the grad_in_forward switch``: formed for an upstream 1, given k in the backward) against the separate row
    backward (k in the kernel): fp32 within 1e-6, bf16 within 2^-7 of the largest gradient. A fixed draw
    (B = 12, D = 16, C = 37, one ignored row; the cosine head with angular margins at scale 30, the linear
    head with cosine margins at scale 1), its gradients taken twice over one graph: equal bit for bit (a
    saved dL/draw is read, not consumed). ``context()`` holds each run."""

    g = _gen(5)
    x0, w0 = torch.randn(12, 16, generator=g), torch.randn(37, 16, generator=g)
    y = torch.randint(0, 37, (12,), generator=g)
    y[4] = -100
    options = dict(
        head=head,
        scale=30.0 if head == "cosine" else 1.0,
        backend=backend,
        class_margins=torch.linspace(0.1, 0.5, 37).to(device),
        margin_type="additive_angular" if head == "cosine" else "additive_cosine",
    )
    for upstream in (1.0, 2.5, -0.125):
        grads = {}
        for flag in (True, False):
            monkeypatch.setattr(CONFIG, "grad_in_forward", flag)
            x = x0.to(dtype).to(device).requires_grad_()
            w = w0.to(dtype).to(device).requires_grad_()
            with context():
                loss = fm.margin_cross_entropy(x, y.to(device), w, **options)
                first = torch.autograd.grad(loss * upstream, (x, w), retain_graph=True)
                second = torch.autograd.grad(loss * upstream, (x, w))
            for a, b in zip(first, second):
                assert torch.equal(a, b)
            grads[flag] = first
        for a, b in zip(grads[True], grads[False]):
            scale = b.float().abs().max().item()
            tol = 1e-6 if dtype == torch.float32 else 2**-7
            assert (a.float() - b.float()).abs().max().item() <= tol * scale, (upstream, head, dtype)


def _upstream(rows):
    return torch.rand(rows, generator=_gen(1234), dtype=torch.float64) + 0.5


def evaluate(case, backend, dtype, device="cpu", run_dtype=None, context=contextlib.nullcontext):
    """Loss, lse, pred, hard and the gradients of ``case`` on ``backend`` and ``device``: its model tensors
    rounded to ``run_dtype`` (by default ``dtype``) and its tables to fp32, then run as they are or, with
    ``dtype`` float64 (the truth, which also returns the base scores ``z``), upcast to float64. The run
    and its backward happen inside ``context()``."""
    run_dtype = dtype if run_dtype is None else run_dtype
    leaves = {}
    for name, master in case["tensors"].items():
        value = master.to(run_dtype) if name in MODEL_TENSORS else master.float()
        if dtype == torch.float64:
            value = value.double()
        leaves[name] = value.to(device).requires_grad_(name in case["grads"])
    kwargs = dict(leaves)
    input_, weight = kwargs.pop("input"), kwargs.pop("weight", None)
    target = case["target"].to(device)
    with context():
        loss, aux = fm.margin_cross_entropy(
            input_, target, weight, **kwargs, **case["options"], backend=backend, return_aux=True
        )
        upstream = torch.ones_like(loss) if loss.dim() == 0 else _upstream(loss.shape[0]).to(loss)
        grads = torch.autograd.grad(loss, [leaves[n] for n in case["grads"]], upstream)
    out = {"loss": loss.detach(), "lse": aux.lse, "pred": aux.pred, "hard": aux.hard}
    out.update({f"grad_{n}": g for n, g in zip(case["grads"], grads)})
    if dtype == torch.float64:
        out["z"] = _base_scores(case, leaves)
    return out


def _base_scores(case, leaves):
    opts = case["options"]
    spec = MarginLossSpec(head=opts.get("head", "logits"), input_is_cosine=opts.get("input_is_cosine", False))
    tables = LossTables(omega=leaves.get("omega"), beta=leaves.get("beta"), class_norms=leaves.get("class_norms"))
    with torch.no_grad():
        return reference.base_scores(leaves["input"], leaves.get("weight"), leaves.get("bias"), spec, tables)


# ---------------------------------------------------------------------------------------------------
# comparisons


def _finite_parts(name, actual, truth):
    actual, truth = actual.detach().double().cpu(), truth.detach().double().cpu()
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.equal(actual.isnan(), truth.isnan()), f"{name}: NaNs differ\n{actual}\n{truth}"
    keep = ~truth.isnan()
    return actual[keep], truth[keep]


def _max_err(actual, truth):
    """(max |actual - truth|, max |truth|) over the finite elements of ``truth``; the infinite ones must
    be equal."""
    infinite = ~torch.isfinite(truth)
    assert torch.equal(actual[infinite], truth[infinite]), f"infinities differ: {actual} vs {truth}"
    diff = (actual - truth)[~infinite].abs()
    if diff.numel() == 0:
        return 0.0, 0.0
    return diff.max().item(), truth[~infinite].abs().max().item()


def assert_fp32_close(name, actual, truth, rtol=FP32_RTOL):
    actual, truth = _finite_parts(name, actual, truth)
    err, size = _max_err(actual, truth)
    assert err <= rtol * size + 1e-30, f"{name}: max error {err:.3g} > {rtol:g} x max |truth| {size:.3g}"


def assert_within_reference_error(name, actual, ref_same_dtype, truth, factor=1.0, floor=2e-5, size_at_least=0.0):
    """docs/loss.md section 8: no larger than ``factor`` x the reference's error in the same dtype (inf-norm),
    plus ``floor`` x max |truth| (or x ``size_at_least`` where larger: the magnitude of an intermediate the
    result is computed from, e.g. the cosine head's gradient before its projection)."""
    actual, truth_a = _finite_parts(name, actual, truth)
    ref, truth_r = _finite_parts(name + " (reference)", ref_same_dtype, truth)
    err, size = _max_err(actual, truth_a)
    ref_err, _ = _max_err(ref, truth_r)
    size = max(size, size_at_least)
    assert err <= factor * ref_err + floor * size + 1e-30, (
        f"{name}: error {err:.3g} > {factor:g} x the reference's own error {ref_err:.3g} + {floor:g} x {size:.3g}"
    )


def assert_pred_hard(got, truth, case, gap):
    """``pred`` equal to the truth's on rows whose top-two base scores differ by more than ``gap``
    (relative to the row's largest |z'|), ``hard`` consistent with ``pred`` and the mode."""
    z = truth["z"].cpu()
    top2 = z.topk(2, dim=1).values
    untied = (top2[:, 0] - top2[:, 1]) > gap * z.abs().amax(1).clamp_min(1.0)
    pred, hard = got["pred"].cpu(), got["hard"].cpu()
    assert pred.dtype == torch.int64 and hard.dtype == torch.bool
    assert torch.equal(pred[untied], truth["pred"].cpu()[untied]), f"pred {pred} != {truth['pred']}"
    target = case["target"]
    kept = target != case["options"].get("ignore_index", -100)
    expected_hard = kept if case["options"].get("hard_mode") == "all" else kept & (pred != target)
    assert torch.equal(hard, expected_hard)
    assert torch.equal(hard[untied], truth["hard"].cpu()[untied])


def compare(case, backend, dtype=torch.float32, device="cpu", context=contextlib.nullcontext):
    """Run ``case`` on ``backend`` with its model tensors in ``dtype`` and judge it against the float64
    truth (docs/loss.md section 8, as the module docstring states); returns ``(got, truth)``."""
    truth = evaluate(case, "reference", torch.float64, device, run_dtype=dtype, context=context)
    got = evaluate(case, backend, dtype, device, context=context)
    assert got["loss"].dtype == torch.float32 and got["lse"].dtype == torch.float32
    checked = [k for k in truth if k.startswith("grad_") or k in ("loss", "lse")]
    if dtype == torch.float32:
        for key in checked:
            assert_fp32_close(key, got[key], truth[key])
        assert_pred_hard(got, truth, case, gap=1e-5)
    else:
        # The logits head upcasts its input exactly and rounds its gradient once, as the reference does:
        # the same errors. The cosine and linear heads round elsewhere than the reference (the GEMM of
        # the raw inputs, dL/draw in the input dtype before the backward GEMMs and the bias sum): errors
        # of the same size on other elements, so there the kernel may err up to twice the reference.
        factor = 1.0 if case["options"].get("head", "logits") == "logits" else 2.0
        ref = evaluate(case, "reference", dtype, device, context=context)
        for key in checked:
            assert got[key].dtype == ref[key].dtype, key
            assert_within_reference_error(key, got[key], ref[key], truth[key], factor)
        assert_pred_hard(got, truth, case, gap=4 * torch.finfo(dtype).eps)
    return got, truth


# ---------------------------------------------------------------------------------------------------
# every option: the named cases (a case's name also seeds its data, see _seed)

DBM_MARGINS = (0.05, 0.4)
CASES = {
    "arcface": dict(margins=(0.5, 0.5), scale=64.0, margin_type="additive_angular"),
    "dbm_hard": dict(margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0),
    "dbm_all": dict(margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0, hard_mode="all"),
    "dbm_fold_threshold": dict(
        margins=(0.8, 2.6), margin_type="additive_angular", lambda_inst=0.7, angular_fold="threshold", hard_mode="all"
    ),
    "dbm_fold_easy": dict(margins=(0.2, 0.6), margin_type="additive_angular", lambda_inst=1.0, angular_fold="easy"),
    "dbm_straight_through": dict(
        margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0, margin_grad="straight_through"
    ),
    "dbm_bs_drw": dict(margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0, offset=True, weights=True),
    "ldam": dict(margins=(0.1, 0.5)),
    "elm": dict(margins=(0.1, 0.5), lambda_elm=1.0),
    "elm_angular_instance": dict(margins=(0.1, 0.5), margin_type="additive_angular", lambda_inst=1.0, lambda_elm=0.5),
    # the same options under two names (CosFace without class margins, the angular branch with M = 0):
    # each file's tests have run one of them, and the name seeds the data
    "cosface_no_margins_angular": dict(margin_type="additive_angular"),
    "no_margins_angular": dict(margin_type="additive_angular"),
    "smoothing": dict(margins=(0.1, 0.3), label_smoothing=0.2),
    "smoothing_weighted_ignored": dict(
        margins=DBM_MARGINS,
        margin_type="additive_angular",
        lambda_inst=1.0,
        label_smoothing=0.1,
        weights=True,
        offset=True,
        ignored=(1, 4),
    ),
    "marc_grads": dict(
        margins=DBM_MARGINS, margin_type="additive_angular", marc=True, weights=True, grads=("omega", "beta")
    ),
    "offset_pair_grads": dict(
        margins=(0.1, 0.3), offset=True, pair=True, ignored=(2,), grads=("logit_offset", "pair_perturbation")
    ),
    "ignore_index_is_a_class": dict(margins=(0.1, 0.3), ignore_index=3, ignored=(0, 5), weights=True),
    "reduction_sum": dict(
        margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0, reduction="sum", ignored=(3,)
    ),
    "reduction_none": dict(
        margins=DBM_MARGINS,
        margin_type="additive_angular",
        lambda_inst=1.0,
        reduction="none",
        ignored=(3,),
        label_smoothing=0.05,
        weights=True,
    ),
    "linear_bias_offset": dict(head="linear", scale=1.0, bias=True, offset=True, grads=("bias",)),
    "linear_marc": dict(head="linear", scale=1.0, bias=True, marc=True, grads=("bias", "omega", "beta")),
    "linear_margins_elm_smoothing": dict(
        head="linear", scale=1.0, margins=(0.2, 1.0), lambda_elm=1.0, label_smoothing=0.1, reduction="none"
    ),
    "logits_plain": dict(head="logits", scale=1.0, offset=True, weights=True, label_smoothing=0.1, ignored=(0,)),
    "logits_cosine_dbm": dict(
        head="logits",
        input_is_cosine=True,
        margins=(0.1, 1.2),
        margin_type="additive_angular",
        lambda_inst=1.0,
        angular_fold="threshold",
        pair=True,
        grads=("pair_perturbation",),
    ),
    "logits_marc": dict(
        head="logits",
        input_is_cosine=True,
        margins=DBM_MARGINS,
        margin_type="additive_angular",
        marc=True,
        grads=("omega", "beta"),
    ),
    "logits_offset_grad": dict(
        head="logits", scale=2.0, margins=(0.1, 0.5), offset=True, grads=("logit_offset",), reduction="sum"
    ),
    "two_classes_one_row": dict(
        B=1,
        C=2,
        margins=DBM_MARGINS,
        margin_type="additive_angular",
        lambda_inst=1.0,
        lambda_elm=0.5,
        label_smoothing=0.1,
        weights=True,
    ),
    "two_classes": dict(B=5, C=2, margins=(0.1, 0.3), lambda_elm=1.0),
    # C = 32: a whole number of the Triton tests' forced 8-column blocks, of the CPU kernels' vectors
    # (the same options under each file's name, as above)
    "classes_multiple_of_block": dict(
        C=32, margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0, label_smoothing=0.1
    ),
    "vector_width_multiple": dict(
        C=32, margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0, label_smoothing=0.1
    ),
    # rows longer than the C++ kernels' 1024-column chunk (and than many Triton column blocks)
    "longer_than_a_chunk": dict(
        B=4,
        C=2085,
        margins=DBM_MARGINS,
        margin_type="additive_angular",
        lambda_inst=1.0,
        lambda_elm=0.5,
        offset=True,
        weights=True,
        label_smoothing=0.1,
        ignored=(1,),
    ),
}

# bf16/fp16, run with reduction="none" over 24 rows
LOW_PRECISION_CASES = (
    "dbm_hard",
    "dbm_bs_drw",
    "elm",
    "smoothing_weighted_ignored",
    "marc_grads",
    "linear_bias_offset",
    "linear_marc",
    "logits_plain",
    "logits_cosine_dbm",
    "logits_marc",
)


# ---------------------------------------------------------------------------------------------------
# the loss modules


def _counts(C):
    return fm.long_tailed_counts(num_classes=C, n_max=500, imbalance=50)


MODULES = {
    "dbm_ce": lambda C, backend: fm.DBMLoss(_counts(C), variant="ce", K=0.3, backend=backend),
    "dbm_bs": lambda C, backend: fm.DBMLoss(_counts(C), variant="bs", K=0.3, backend=backend),
    "dbm_cb_all": lambda C, backend: fm.DBMLoss(_counts(C), variant="cb", K=0.3, hard_mode="all", backend=backend),
    "dbm_drw": lambda C, backend: fm.DBMLoss(
        _counts(C), variant="drw", K=0.3, drw_step=1, reduction="sum", backend=backend
    ),
    "ldam": lambda C, backend: fm.LDAMLoss(_counts(C), label_smoothing=0.1, backend=backend),
    "elm": lambda C, backend: fm.ELMLoss(_counts(C), lambda_elm=0.5, backend=backend),
    "arcface_threshold": lambda C, backend: fm.ArcFaceLoss(
        margin=0.5, scale=64.0, angular_fold="threshold", backend=backend
    ),
    "cosface": lambda C, backend: fm.CosFaceLoss(backend=backend),
    "balanced_softmax_linear": lambda C, backend: fm.BalancedSoftmaxLoss(_counts(C), backend=backend),
}


def compare_module(name, backend, device="cpu", context=contextlib.nullcontext):
    """``MODULES[name]`` on ``backend`` in fp32 against the float64 reference module: loss and the
    gradients of the features and class weights within ``FP32_RTOL`` (the run inside ``context()``)."""
    B, C, D = 6, 29, 8
    g = _gen(11)
    features = torch.randn(B, D, generator=g, dtype=torch.float64)
    weight = torch.randn(C, D, generator=g, dtype=torch.float64)
    target = torch.randint(0, C, (B,), generator=g).to(device)
    results = {}
    for name_, dtype in (("reference", torch.float64), (backend, torch.float32)):
        loss_fn = MODULES[name](C, name_)
        if name == "dbm_drw":
            loss_fn.set_epoch(1)
        loss_fn.to(device)
        x = features.float().to(dtype).to(device).requires_grad_()
        w = weight.float().to(dtype).to(device).requires_grad_()
        with context():
            loss = loss_fn(x, target, weight=w)
            grads = torch.autograd.grad(loss, [x, w])
        results[name_] = (loss, *grads)
    for label, got, truth in zip(("loss", "grad_features", "grad_weight"), results[backend], results["reference"]):
        assert_fp32_close(label, got, truth)
