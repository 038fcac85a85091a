"""The C++ extension (``fused_margin._C``: CPU kernels, CUDA kernels when built) against the reference.

Through the public API (``margin_cross_entropy``, the loss modules) with ``backend="cpu"`` (and
``backend="cuda"`` in the tests marked ``cuda``), every option is compared with the float64 reference
run on the same rounded inputs (SPEC.md section 8): fp32 to 1e-5 of the largest |truth| (inf-norm, per
output); bf16/fp16 no further from the truth than the reference run in that dtype (twice that for the
cosine and linear heads, which round the GEMM output and dL/draw where the reference rounds elsewhere),
plus a small floor. ``pred``/``hard`` must match wherever the top two base scores are not tied at the
dtype's resolution. The ops themselves are checked against the eager row-kernel contract
(``row_torch``) on odd shapes (one row, two classes, widths that are no multiple of the vector width,
rows longer than the kernels' 1024-column chunk), NaN/inf rows, with ``torch.library.opcheck``, and
under every instruction set the CPU kernels are compiled for.
"""
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

import fused_margin as fm
from fused_margin import backends, reference, row_torch
from fused_margin import cuda as extension

if not extension.is_built():
    pytest.skip(f"the fused_margin C++ extension is not built ({extension.BUILD_ERROR}); build it with "
                "pip install --no-build-isolation --no-deps -e . (scripts/setup_env.sh does)",
                allow_module_level=True)

OPS = torch.ops.fused_margin
LOW_PRECISION = (torch.bfloat16, torch.float16)
MODEL_TENSORS = ("input", "weight", "bias")  # take the run's dtype; the tables stay fp32
FP32_RTOL = 1e-5
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def _backend(device):
    if device == "cuda" and not extension.cuda_built():
        pytest.skip("the extension was built without its CUDA kernels")
    return device


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _seed(name):
    return zlib.crc32(name.encode()) % 10000


def _uniform(shape, lo, hi, g):
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
# cases through the public API

def make_case(head="cosine", *, B=6, C=37, D=8, seed=0, scale=30.0, margins=None, offset=False, pair=False,
              weights=False, bias=False, marc=False, ignored=(), grads=(), **options):
    """float64 master tensors, labels and options; ``grads`` the leaves beyond input/weight needing grad."""
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


def _upstream(rows):
    return torch.rand(rows, generator=_gen(1234), dtype=torch.float64) + 0.5


def evaluate(case, backend, dtype, device, run_dtype=None):
    """Loss, lse, pred, hard and gradients of ``case`` with the model tensors in ``dtype`` (tables fp32);
    float64 means the truth, computed from the values rounded to ``run_dtype``."""
    leaves = {}
    for name, master in case["tensors"].items():
        if name in MODEL_TENSORS:
            value = master.to(run_dtype).double() if dtype == torch.float64 else master.to(dtype)
        else:
            value = master.float().to(dtype if dtype == torch.float64 else torch.float32)
        leaves[name] = value.to(device).requires_grad_(name in case["grads"])
    kwargs = dict(leaves)
    input_, weight = kwargs.pop("input"), kwargs.pop("weight", None)
    loss, aux = fm.margin_cross_entropy(input_, case["target"].to(device), weight, **kwargs, **case["options"],
                                        backend=backend, return_aux=True)
    upstream = torch.ones_like(loss) if loss.dim() == 0 else _upstream(loss.shape[0]).to(loss)
    grads = torch.autograd.grad(loss, [leaves[n] for n in case["grads"]], upstream)
    out = {"loss": loss.detach(), "lse": aux.lse, "pred": aux.pred, "hard": aux.hard}
    out.update({f"grad_{n}": g for n, g in zip(case["grads"], grads)})
    if dtype == torch.float64:
        out["z"] = _base_scores(case, leaves)
    return out


def _base_scores(case, leaves):
    opts = case["options"]
    spec = fm.MarginLossSpec(head=opts.get("head", "logits"), input_is_cosine=opts.get("input_is_cosine", False))
    tables = fm.LossTables(omega=leaves.get("omega"), beta=leaves.get("beta"),
                           class_norms=leaves.get("class_norms"))
    with torch.no_grad():
        return reference.base_scores(leaves["input"], leaves.get("weight"), leaves.get("bias"), spec, tables)


def _finite_parts(name, actual, truth):
    actual, truth = actual.detach().double().cpu(), truth.detach().double().cpu()
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.equal(actual.isnan(), truth.isnan()), f"{name}: NaNs differ\n{actual}\n{truth}"
    keep = ~truth.isnan()
    return actual[keep], truth[keep]


def _max_err(actual, truth):
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


def assert_within_reference_error(name, actual, ref_same_dtype, truth, factor, floor=2e-5):
    """SPEC.md section 8: at most ``factor`` x the reference's own error in that dtype (inf-norm), plus
    ``floor`` x max |truth|."""
    actual, truth_a = _finite_parts(name, actual, truth)
    ref, truth_r = _finite_parts(name + " (reference)", ref_same_dtype, truth)
    err, size = _max_err(actual, truth_a)
    ref_err, _ = _max_err(ref, truth_r)
    assert err <= factor * ref_err + floor * size + 1e-30, \
        f"{name}: error {err:.3g} > {factor:g} x the reference's own error {ref_err:.3g} + {floor:g} x {size:.3g}"


def assert_pred_hard(got, truth, case, gap):
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


def compare(case, backend, dtype=torch.float32):
    truth = evaluate(case, "reference", torch.float64, backend, run_dtype=dtype)
    got = evaluate(case, backend, dtype, backend)
    assert got["loss"].dtype == torch.float32 and got["lse"].dtype == torch.float32
    checked = [k for k in truth if k.startswith("grad_") or k in ("loss", "lse")]
    if dtype == torch.float32:
        for key in checked:
            assert_fp32_close(key, got[key], truth[key])
        assert_pred_hard(got, truth, case, gap=1e-5)
    else:
        # the logits head rounds where the reference does; the cosine and linear heads round the GEMM
        # output and dL/draw instead (errors of the same size on other elements)
        factor = 1.0 if case["options"].get("head", "logits") == "logits" else 2.0
        ref = evaluate(case, "reference", dtype, backend)
        for key in checked:
            assert got[key].dtype == ref[key].dtype, key
            assert_within_reference_error(key, got[key], ref[key], truth[key], factor)
        assert_pred_hard(got, truth, case, gap=4 * torch.finfo(dtype).eps)
    return got


DBM_MARGINS = (0.05, 0.4)
CASES = {
    "arcface": dict(margins=(0.5, 0.5), scale=64.0, margin_type="additive_angular"),
    "dbm_hard": dict(margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0),
    "dbm_all": dict(margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0, hard_mode="all"),
    "dbm_fold_threshold": dict(margins=(0.8, 2.6), margin_type="additive_angular", lambda_inst=0.7,
                               angular_fold="threshold", hard_mode="all"),
    "dbm_fold_easy": dict(margins=(0.2, 0.6), margin_type="additive_angular", lambda_inst=1.0,
                          angular_fold="easy"),
    "dbm_straight_through": dict(margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0,
                                 margin_grad="straight_through"),
    "dbm_bs_drw": dict(margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0, offset=True,
                       weights=True),
    "ldam": dict(margins=(0.1, 0.5)),
    "elm": dict(margins=(0.1, 0.5), lambda_elm=1.0),
    "elm_angular_instance": dict(margins=(0.1, 0.5), margin_type="additive_angular", lambda_inst=1.0,
                                 lambda_elm=0.5),
    "no_margins_angular": dict(margin_type="additive_angular"),
    "smoothing": dict(margins=(0.1, 0.3), label_smoothing=0.2),
    "smoothing_weighted_ignored": dict(margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0,
                                       label_smoothing=0.1, weights=True, offset=True, ignored=(1, 4)),
    "marc_grads": dict(margins=DBM_MARGINS, margin_type="additive_angular", marc=True, weights=True,
                       grads=("omega", "beta")),
    "offset_pair_grads": dict(margins=(0.1, 0.3), offset=True, pair=True, ignored=(2,),
                              grads=("logit_offset", "pair_perturbation")),
    "ignore_index_is_a_class": dict(margins=(0.1, 0.3), ignore_index=3, ignored=(0, 5), weights=True),
    "reduction_sum": dict(margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0,
                          reduction="sum", ignored=(3,)),
    "reduction_none": dict(margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0,
                           reduction="none", ignored=(3,), label_smoothing=0.05, weights=True),
    "linear_bias_offset": dict(head="linear", scale=1.0, bias=True, offset=True, grads=("bias",)),
    "linear_marc": dict(head="linear", scale=1.0, bias=True, marc=True, grads=("bias", "omega", "beta")),
    "linear_margins_elm_smoothing": dict(head="linear", scale=1.0, margins=(0.2, 1.0), lambda_elm=1.0,
                                         label_smoothing=0.1, reduction="none"),
    "logits_plain": dict(head="logits", scale=1.0, offset=True, weights=True, label_smoothing=0.1,
                         ignored=(0,)),
    "logits_cosine_dbm": dict(head="logits", input_is_cosine=True, margins=(0.1, 1.2),
                              margin_type="additive_angular", lambda_inst=1.0, angular_fold="threshold",
                              pair=True, grads=("pair_perturbation",)),
    "logits_marc": dict(head="logits", input_is_cosine=True, margins=DBM_MARGINS,
                        margin_type="additive_angular", marc=True, grads=("omega", "beta")),
    "logits_offset_grad": dict(head="logits", scale=2.0, margins=(0.1, 0.5), offset=True,
                               grads=("logit_offset",), reduction="sum"),
    "two_classes_one_row": dict(B=1, C=2, margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0,
                                lambda_elm=0.5, label_smoothing=0.1, weights=True),
    "two_classes": dict(B=5, C=2, margins=(0.1, 0.3), lambda_elm=1.0),
    "vector_width_multiple": dict(C=32, margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0,
                                  label_smoothing=0.1),
    "longer_than_a_chunk": dict(B=4, C=2085, margins=DBM_MARGINS, margin_type="additive_angular",
                                lambda_inst=1.0, lambda_elm=0.5, offset=True, weights=True, label_smoothing=0.1,
                                ignored=(1,)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp32(name, device):
    options = dict(CASES[name])
    head = options.pop("head", "cosine")
    compare(make_case(head, seed=_seed(name), **options), _backend(device))


LOW_PRECISION_CASES = ("dbm_hard", "dbm_bs_drw", "elm", "smoothing_weighted_ignored", "marc_grads",
                       "linear_bias_offset", "logits_plain", "logits_cosine_dbm", "logits_marc")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", LOW_PRECISION_CASES)
def test_matches_reference_low_precision(name, dtype, device):
    """Per-row losses over 24 rows, so the inf-norm errors compared are maxima of many roundings."""
    options = dict(CASES[name], reduction="none")
    head = options.pop("head", "cosine")
    got = compare(make_case(head, B=24, seed=_seed(name) + 1, **options), _backend(device), dtype=dtype)
    for key in ("grad_input", "grad_weight", "grad_bias"):
        if key in got:
            assert got[key].dtype == dtype, key


def _counts(C):
    return fm.long_tailed_counts(num_classes=C, n_max=500, imbalance=50)


MODULES = {
    "dbm_ce": lambda C, backend: fm.DBMLoss(_counts(C), variant="ce", K=0.3, backend=backend),
    "dbm_bs": lambda C, backend: fm.DBMLoss(_counts(C), variant="bs", K=0.3, backend=backend),
    "dbm_cb_all": lambda C, backend: fm.DBMLoss(_counts(C), variant="cb", K=0.3, hard_mode="all",
                                                backend=backend),
    "dbm_drw": lambda C, backend: fm.DBMLoss(_counts(C), variant="drw", K=0.3, drw_step=1, reduction="sum",
                                             backend=backend),
    "ldam": lambda C, backend: fm.LDAMLoss(_counts(C), label_smoothing=0.1, backend=backend),
    "elm": lambda C, backend: fm.ELMLoss(_counts(C), lambda_elm=0.5, backend=backend),
    "arcface_threshold": lambda C, backend: fm.ArcFaceLoss(margin=0.5, scale=64.0, angular_fold="threshold",
                                                           backend=backend),
    "cosface": lambda C, backend: fm.CosFaceLoss(backend=backend),
    "balanced_softmax_linear": lambda C, backend: fm.BalancedSoftmaxLoss(_counts(C), backend=backend),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODULES))
def test_modules_match_reference(name, device):
    backend = _backend(device)
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
        loss = loss_fn(x, target, weight=w)
        results[name_] = (loss, *torch.autograd.grad(loss, [x, w]))
    for label, got, truth in zip(("loss", "grad_features", "grad_weight"), results[backend],
                                 results["reference"]):
        assert_fp32_close(label, got, truth)


# ---------------------------------------------------------------------------------------------------
# the ops against the eager contract (row_torch): shapes, dtypes, NaN and inf

def _op_inputs(B, C, dtype, seed, full=True, ignored=True, device="cpu"):
    g = _gen(seed)
    raw = (1.6 * torch.rand(B, C, generator=g) - 0.8).to(dtype)
    target = torch.randint(0, C, (B,), generator=g)
    if ignored and B > 1:
        target[1] = -100
    tables = dict(row_scale=None, col_scale=None, col_shift=None, class_margins=0.5 * torch.rand(C, generator=g),
                  logit_offset=None, pair_perturbation=None, class_weight=None)
    if full:
        tables.update(row_scale=0.5 + torch.rand(B, generator=g), col_scale=0.5 + torch.rand(C, generator=g),
                      col_shift=0.1 * torch.randn(C, generator=g), logit_offset=torch.randn(C, generator=g),
                      pair_perturbation=0.3 * torch.randn(B, C, generator=g),
                      class_weight=0.2 + torch.rand(C, generator=g))
    tables = {k: None if v is None else v.to(device) for k, v in tables.items()}
    return raw.to(device), target.to(device), tables


FORWARD_OPTIONS = {  # (margin_type, lambda_inst, hard_all, lambda_elm, fold, straight_through, smoothing)
    "cosine_elm_smoothing": (0, 0.0, False, 1.0, 0, False, 0.1),
    "angular_instance_hard": (1, 1.0, False, 0.0, 0, False, 0.0),
    "angular_all_threshold": (1, 0.7, True, 0.5, 1, False, 0.2),
    "angular_easy_straight": (1, 1.0, False, 0.0, 2, True, 0.0),
}
OUTPUTS = ("loss", "lse", "pred", "hard", "target_logit", "target_grad")


def _forward_args(raw, target, tables, options, scale=30.0, ignore_index=-100):
    margin_type, lambda_inst, hard_all, lambda_elm, fold, straight, smoothing = options
    return (raw, target, tables["row_scale"], tables["col_scale"], tables["col_shift"], tables["class_margins"],
            tables["logit_offset"], tables["pair_perturbation"], tables["class_weight"], scale, margin_type,
            lambda_inst, hard_all, lambda_elm, fold, straight, smoothing, ignore_index)


def _backward_args(raw, target, tables, forward_out, grad_rows, smoothing, scale_grad, scale=30.0):
    _, lse, _, _, target_logit, target_grad = forward_out
    return (raw, target, tables["row_scale"], tables["col_scale"], tables["col_shift"], tables["logit_offset"],
            tables["pair_perturbation"], tables["class_weight"], lse, target_logit, target_grad, grad_rows, scale,
            smoothing, -100, scale_grad)


def _close(name, got, want, rtol):
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype)
    if not got.dtype.is_floating_point:
        assert torch.equal(got, want), f"{name}: {got} != {want}"
        return
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaNs differ"
    keep = torch.isfinite(want)
    assert torch.equal(got[~keep & ~want.isnan()], want[~keep & ~want.isnan()]), f"{name}: infinities differ"
    scale = want[keep].abs().max().item() if keep.any() else 0.0
    err = (got[keep] - want[keep]).abs().max().item() if keep.any() else 0.0
    assert err <= rtol * scale + 1e-30, f"{name}: max error {err:.3g} > {rtol:g} x {scale:.3g}"


def check_ops_against_contract(B, C, dtype, options, full, device="cpu", seed=0):
    raw, target, tables = _op_inputs(B, C, dtype, seed, full=full, device=device)
    args = _forward_args(raw, target, tables, options)
    got = OPS.row_forward(*args)
    want = row_torch.row_forward(*args)
    for name, a, b in zip(OUTPUTS, got, want):
        _close(name, a, b, 2e-6)
    grad_rows = torch.rand(B, generator=_gen(seed + 1)).to(device)
    for scale_grad in (True, False):
        bargs = _backward_args(raw, target, tables, want, grad_rows, options[-1], scale_grad)
        rtol = 2e-6 if (dtype == torch.float32 or not scale_grad) else 2 * torch.finfo(dtype).eps
        _close(f"grad (scale_grad={scale_grad})", OPS.row_backward(*bargs), row_torch.row_backward(*bargs), rtol)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("shape", [(1, 2), (5, 2), (3, 37), (4, 1024), (3, 2085), (2, 5000)], ids=str)
def test_ops_match_the_row_contract(shape, dtype):
    for i, (name, options) in enumerate(FORWARD_OPTIONS.items()):
        check_ops_against_contract(*shape, dtype, options, full=i % 2 == 0, seed=i)


def test_ops_argmax_nan_inf_and_ties_follow_torch():
    """pred is torch.argmax's (first NaN, else first max; 0 for an all -inf row), c* the first non-target
    max; NaN and inf flow into lse and the loss as in the reference."""
    nan, inf = float("nan"), float("inf")
    C = 40
    raw = torch.rand(7, C)
    raw[0, 7] = raw[0, 30] = nan               # NaN wins, the first one (in a later vector than the max)
    raw[1, :] = -inf                           # argmax 0
    raw[2, 5] = inf                            # lse inf
    raw[3, 3] = raw[3, 19] = raw[3, 33] = 2.0  # ties across vectors: the first
    raw[4, 0] = nan                            # the target column is NaN
    raw[5, 10] = raw[5, 26] = 1.5              # c* ties (target 26 excluded)
    raw[5, 2] = 1.5
    target = torch.tensor([1, 2, 3, 19, 0, 26, 4])
    margins = torch.rand(C) * 0.3
    offset = torch.zeros(C)
    offset[11] = -inf                          # a class masked out by its offset
    for options, off in (((1, 1.0, False, 1.0, 0, False, 0.0), None), ((0, 0.0, False, 1.0, 0, False, 0.1), offset)):
        tables = dict(row_scale=None, col_scale=None, col_shift=None, class_margins=margins, logit_offset=off,
                      pair_perturbation=None, class_weight=None)
        got = OPS.row_forward(*_forward_args(raw, target, tables, options))
        assert torch.equal(got[2], raw.argmax(1)), (got[2], raw.argmax(1))
        want = fm.margin_cross_entropy(raw.double(), target, class_margins=margins.double(),
                                       logit_offset=None if off is None else off.double(), scale=30.0,
                                       margin_type=("additive_cosine", "additive_angular")[options[0]],
                                       input_is_cosine=True, lambda_inst=options[1], lambda_elm=options[3],
                                       label_smoothing=options[6], reduction="none", backend="reference",
                                       return_aux=True)
        _close("loss", got[0].double(), want[0], 1e-5)
        _close("lse", got[1].double(), want[1].lse, 1e-5)
        assert torch.equal(got[3], want[1].hard)
    # row 5's c* is class 2 (the first of the tied non-target maxima): its target logit uses m_2
    tables = dict(row_scale=None, col_scale=None, col_shift=None, class_margins=margins, logit_offset=None,
                  pair_perturbation=None, class_weight=None)
    out = OPS.row_forward(*_forward_args(raw, target, tables, (0, 0.0, False, 1.0, 0, False, 0.0)))
    expected = 30.0 * (1.5 - margins[26] + margins[2])
    assert abs(out[4][5].item() - expected.item()) < 1e-4


def test_ops_reject_bad_arguments():
    raw, target, tables = _op_inputs(3, 10, torch.float32, 0)
    options = FORWARD_OPTIONS["cosine_elm_smoothing"]
    with pytest.raises(RuntimeError, match="raw must be float32, bfloat16 or float16"):
        OPS.row_forward(*_forward_args(raw.double(), target, tables, options))
    bad = target.clone()
    bad[0] = 10
    with pytest.raises(RuntimeError, match=r"target\[0\] = 10 is out of range"):
        OPS.row_forward(*_forward_args(raw, bad, tables, options))
    with pytest.raises(RuntimeError, match="col_scale must have shape"):
        OPS.row_forward(*_forward_args(raw, target, dict(tables, col_scale=torch.ones(9)), options))
    with pytest.raises(RuntimeError, match="target must be int64"):
        OPS.row_forward(*_forward_args(raw, target.int(), tables, options))
    with pytest.raises(RuntimeError, match="margin_type must be 0"):
        OPS.row_forward(*_forward_args(raw, target, tables, (2,) + options[1:]))


def test_ops_take_noncontiguous_raw_and_float64_tables():
    raw, target, tables = _op_inputs(4, 45, torch.float32, 3)
    wide = torch.zeros(4, 90)
    wide[:, ::2] = raw
    tables64 = {k: None if v is None else v.double() for k, v in tables.items()}
    options = FORWARD_OPTIONS["angular_all_threshold"]
    got = OPS.row_forward(*_forward_args(wide[:, ::2], target, tables64, options))
    want = OPS.row_forward(*_forward_args(raw, target, tables, options))
    for name, a, b in zip(OUTPUTS, got, want):
        assert torch.equal(a, b), name


def test_opcheck():
    for dtype, full in ((torch.float32, True), (torch.bfloat16, False)):
        raw, target, tables = _op_inputs(4, 37, dtype, 5, full=full)
        options = FORWARD_OPTIONS["angular_all_threshold"]
        args = _forward_args(raw, target, tables, options)
        torch.library.opcheck(OPS.row_forward.default, args)
        out = OPS.row_forward(*args)
        for scale_grad in (True, False):
            bargs = _backward_args(raw, target, tables, out, torch.rand(4), options[-1], scale_grad)
            torch.library.opcheck(OPS.row_backward.default, bargs)


# ---------------------------------------------------------------------------------------------------
# discovery, compile, instruction sets

def test_auto_picks_the_cpu_kernel():
    kernel = backends.resolve_backend("auto", torch.device("cpu"), torch.float32)
    assert kernel is not None and kernel.name == "cpu"
    assert kernel.forward is OPS.row_forward and kernel.backward is OPS.row_backward
    assert extension.row_kernel("cpu") is kernel
    status = fm.available_backends("cpu", torch.bfloat16)
    assert status["cpu"] == "ok"
    assert extension.cpu_kernel_isa() in ("AVX512", "AVX2", "DEFAULT")
    assert (extension.row_kernel("cuda") is None) == (not extension.cuda_built())


def test_compiles_without_graph_breaks():
    """The fake kernels let torch.compile trace the fused loss (forward and backward) in one graph."""
    case = make_case("cosine", B=6, C=19, seed=3, margins=DBM_MARGINS, margin_type="additive_angular",
                     lambda_inst=1.0, offset=True)
    x = case["tensors"]["input"].float().requires_grad_()
    w = case["tensors"]["weight"].float().requires_grad_()
    tables = {k: v.float() for k, v in case["tensors"].items() if k not in MODEL_TENSORS}

    def loss_fn(x, w):
        return fm.margin_cross_entropy(x, case["target"], w, **tables, **case["options"], backend="cpu")

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    loss = compiled(x, w)
    grads = torch.autograd.grad(loss, [x, w])
    eager = loss_fn(x, w)
    eager_grads = torch.autograd.grad(eager, [x, w])
    assert torch.allclose(loss, eager)
    for a, b in zip(grads, eager_grads):
        assert torch.allclose(a, b)


_ISA_SCRIPT = textwrap.dedent("""
    import torch
    # a Python custom op in the same namespace, registered before the extension loads (as the Triton
    # backend's fused_margin::triton_* ops may be)
    @torch.library.custom_op("fused_margin::_probe_before_extension", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        return x + 1
    from fused_margin import cuda as extension
    import test_extension as t
    if extension.cpu_kernel_isa() != {isa!r}:
        print("isa-mismatch", extension.cpu_kernel_isa())
        raise SystemExit(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for i, options in enumerate(t.FORWARD_OPTIONS.values()):
            t.check_ops_against_contract(3, 1030 + 7 * i, dtype, options, full=i % 2 == 0, seed=i)
    assert torch.equal(torch.ops.fused_margin._probe_before_extension(torch.zeros(2)), torch.ones(2))
    print("ok")
""")


@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2", "AVX512"])
def test_every_instruction_set_matches_the_contract(isa):
    """Each compiled instruction set (ATEN_CPU_CAPABILITY picks it, as it picks torch's own kernels) in a
    fresh process that also registers a Python op in the fused_margin namespace first."""
    if isa != "DEFAULT" and torch.backends.cpu.get_cpu_capability() not in (isa, "AVX512"):
        pytest.skip(f"this CPU does not run {isa} code")
    if isa == extension.cpu_kernel_isa():
        pytest.skip(f"{isa} is this process's kernel set, tested by the other tests")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa.lower(),
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.format(isa=isa)], env=env, capture_output=True,
                            text=True, timeout=120)
    if result.stdout.startswith("isa-mismatch"):
        pytest.skip(f"the extension was built without {isa} kernels ({result.stdout.strip()})")
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_python_op_in_the_same_namespace_after_the_extension():
    @torch.library.custom_op("fused_margin::_probe_after_extension", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    assert torch.equal(torch.ops.fused_margin._probe_after_extension(torch.ones(2)), torch.full((2,), 2.0))
    raw, target, tables = _op_inputs(2, 11, torch.float32, 0)
    OPS.row_forward(*_forward_args(raw, target, tables, FORWARD_OPTIONS["cosine_elm_smoothing"]))


@pytest.mark.cuda
def test_cuda_ops_match_the_row_contract():
    if not extension.cuda_built():
        pytest.skip("the extension was built without its CUDA kernels")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in ((1, 2), (5, 37), (3, 2085), (4, 8142), (2, 40000)):
            for i, options in enumerate(FORWARD_OPTIONS.values()):
                check_ops_against_contract(*shape, dtype, options, full=i % 2 == 0, device="cuda", seed=i)
