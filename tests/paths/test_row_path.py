"""The autograd plumbing shared by the fused backends (``fused.fused_margin_cross_entropy``), driven by the
eager row kernel of ``row_torch`` (the row-kernel contract in torch), against the reference.

Every option combination, every head and reduction; float64 tight, float32 to 1e-5 relative of the
float64 truth; loss, lse, pred, hard and every gradient (input, weight, bias, logit_offset,
pair_perturbation, omega, beta), with every subset of trainable tensors that picks a different backward
path; plus float64 gradcheck through the plumbing.
"""

import math

import pytest
import row_torch
import torch
import torch.nn.functional as F

from fused_margin.core import reference
from fused_margin.core.spec import LossTables, MarginLossSpec
from fused_margin.paths import fused

KERNEL = row_torch.ROW_KERNEL
F64 = torch.float64
B, D, C = 6, 5, 7
TARGET = [2, 0, 6, 3, 1, 4]
IGNORED_ROW = 3
TRAINABLE = ("logit_offset", "pair_perturbation", "omega", "beta")


def make_inputs(head, tables_on, seed=0, ignore=True, angular=False):
    """float64 leaves; row 0's target cosine near -1 (past the threshold fold), row 1 along its class (easy).
    MARC's omega and beta are kept small enough that every base score stays inside (-1, 1): outside, the acos
    clamp at 1 - 1e-7 (which float32 rounds to 1 - 1.2e-7) makes float32 and float64 differ by ~1e-5 by design."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.tensor(TARGET)
    if ignore:
        target[IGNORED_ROW] = -100
    weight = bias = None
    if head == "logits":
        x = 0.8 * torch.tanh(torch.randn(B, C, generator=gen, dtype=F64))
        x[0, TARGET[0]] = -0.96
        x[1, TARGET[1]] = 0.93
    else:
        weight = torch.randn(C, D, generator=gen, dtype=F64)
        if head == "linear":
            weight = F.normalize(weight, dim=1) * (1.0 + 0.2 * torch.rand(C, 1, generator=gen, dtype=F64))
        x = torch.randn(B, D, generator=gen, dtype=F64)
        x[0] = -weight[TARGET[0]] + 0.2 * torch.randn(D, generator=gen, dtype=F64)
        x[1] = 2.0 * weight[TARGET[1]] + 0.3 * torch.randn(D, generator=gen, dtype=F64)
        if head == "linear":
            bias = 0.3 * torch.randn(C, generator=gen, dtype=F64)
    tables = {}
    if "class_margins" in tables_on:
        tables["class_margins"] = 0.1 + 0.4 * torch.rand(C, generator=gen, dtype=F64)
        tables["class_margins"][TARGET[0]] = 0.5  # a wide margin, so that row 0 is past the threshold fold
    if "logit_offset" in tables_on:
        tables["logit_offset"] = torch.randn(C, generator=gen, dtype=F64)
    if "pair_perturbation" in tables_on:
        tables["pair_perturbation"] = 0.3 * torch.randn(B, C, generator=gen, dtype=F64)
    if "class_weight" in tables_on:
        tables["class_weight"] = 0.5 + torch.rand(C, generator=gen, dtype=F64)
    if "omega" in tables_on:
        tables["omega"] = 0.85 + 0.1 * torch.rand(C, generator=gen, dtype=F64)
    if "beta" in tables_on:
        tables["beta"] = 0.02 * torch.randn(C, generator=gen, dtype=F64)
        if head == "logits":
            tables["class_norms"] = 0.5 + torch.rand(C, generator=gen, dtype=F64)
    return x, target, weight, bias, tables


def run(kernel, x, target, weight, bias, tables, spec, requires, grad_out):
    """(loss, lse, pred, hard, {name: grad}) with ``requires`` the names of the leaves that need grad."""
    leaves = {"input": x, "weight": weight, "bias": bias, **{k: tables.get(k) for k in TRAINABLE}}
    leaves = {k: v.detach().clone().requires_grad_(k in requires) for k, v in leaves.items() if v is not None}
    tabs = LossTables(**{k: leaves.get(k, v) for k, v in tables.items()})
    if kernel is None:
        loss, (lse, pred, hard) = reference.margin_cross_entropy_reference(
            leaves["input"], target, leaves.get("weight"), leaves.get("bias"), spec, tabs
        )
    else:
        loss, lse, pred, hard = fused.fused_margin_cross_entropy(
            kernel, leaves["input"], target, leaves.get("weight"), leaves.get("bias"), spec, tabs
        )
    names = [k for k in leaves if k in requires]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], grad_out.to(loss.dtype)) if names else ()
    return loss.detach(), lse, pred, hard, dict(zip(names, grads))


def cast(x, target, weight, bias, tables, dtype):
    c = lambda t: None if t is None else t.to(dtype)
    return c(x), target, c(weight), c(bias), {k: c(v) for k, v in tables.items()}


def max_err(actual, expected):
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_rel(actual, expected, rel, what, floor=0.0):
    """max |a - e| <= max(rel * max |e|, floor) (rel of 1e-6 for all-zero tensors)."""
    assert actual.shape == expected.shape, what
    err = max_err(actual, expected)
    bound = max(rel * max(expected.double().abs().max().item() if expected.numel() else 0.0, 1e-6), floor)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def base_scores(x, weight, bias, head, tables):
    spec = MarginLossSpec(head=head)
    return reference.base_scores(x, weight, bias, spec, LossTables(**tables)).detach()


def check_no_near_ties(z, gap=1e-4):
    s = z.sort(dim=1).values
    assert (s[:, 1:] - s[:, :-1]).min() > gap, "near-tie in the base scores: pick another seed"


def compare(head, spec_kwargs, tables_on, requires, dtype, seed=0):
    x, target, weight, bias, tables = make_inputs(head, tables_on, seed=seed, ignore="ignore" in tables_on)
    spec = MarginLossSpec(head=head, input_is_cosine=head == "logits", **spec_kwargs)
    z = base_scores(x, weight, bias, head, tables)
    check_no_near_ties(z)
    if spec.margin_type == "additive_angular":
        assert (z.abs() < 1 - 1e-3).all(), "keep the cosines inside the acos clamp (see make_inputs)"
    grad_out = torch.linspace(0.5, 1.5, B, dtype=F64) if spec.reduction == "none" else torch.tensor(1.5, dtype=F64)
    truth = run(None, x, target, weight, bias, tables, spec, requires, grad_out)
    narrow = cast(x, target, weight, bias, tables, dtype)
    got = run(KERNEL, *narrow, spec, requires, grad_out)
    loss, lse, pred, hard, grads = got
    assert loss.dtype == (F64 if dtype == F64 else torch.float32)
    assert torch.equal(pred, truth[2]) and torch.equal(hard, truth[3])
    if dtype == F64:
        floors = {}
        rel = 1e-10
    else:
        # float32: 1e-5 of the float64 truth, or, where the float32 reference itself strays further (the
        # acos near +-1 amplifies the rounding of the cosine), no more than twice the reference's error
        rel = 1e-5
        ref = run(None, *narrow, spec, requires, grad_out)
        floors = {
            "loss": max_err(ref[0], truth[0]),
            "lse": max_err(ref[1], truth[1]),
            **{name: max_err(g, truth[4][name]) for name, g in ref[4].items()},
        }
    assert_rel(loss, truth[0], rel, "loss", 2 * floors.get("loss", 0.0))
    assert_rel(lse, truth[1], rel, "lse", 2 * floors.get("lse", 0.0))
    assert set(grads) == set(truth[4])
    for name, g in grads.items():
        assert g.dtype == dtype, name
        assert_rel(g, truth[4][name], rel, f"d loss / d {name}", 2 * floors.get(name, 0.0))
    if "pair_perturbation" in grads:
        kept = target != -100
        rows = torch.arange(B)[kept]
        assert torch.all(grads["pair_perturbation"][rows, target[kept]] == 0)
    for name in ("input", "pair_perturbation"):
        if name in grads and "ignore" in tables_on and not (name == "input" and head != "logits"):
            assert torch.all(grads[name][IGNORED_ROW] == 0), f"ignored row has a {name} gradient"
    return got


def leaf_names(head, tables_on):
    names = ["input"]
    if head != "logits":
        names.append("weight")
    if head == "linear":
        names.append("bias")
    return names + [k for k in TRAINABLE if k in tables_on]


# ---- every combination of the scalar options, with every table on ----------------------------------------

ALL_TABLES = ("class_margins", "logit_offset", "pair_perturbation", "class_weight", "omega", "beta", "ignore")
MARGINS = [
    ("additive_cosine", None),
    ("additive_angular", None),
    ("additive_angular", "threshold"),
    ("additive_angular", "easy"),
]
FULL = [
    (head, mt, fold, mg, hm, red)
    for head in ("cosine", "linear", "logits")
    for mt, fold in MARGINS
    if not (head == "linear" and mt == "additive_angular")
    for mg in ("exact", "straight_through")
    for hm in ("hard", "all")
    for red in ("mean", "sum", "none")
]


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "head,margin_type,fold,margin_grad,hard_mode,reduction", FULL, ids=["-".join(str(v) for v in case) for case in FULL]
)
def test_every_option_combination(head, margin_type, fold, margin_grad, hard_mode, reduction, dtype):
    spec_kwargs = dict(
        scale=8.0,
        margin_type=margin_type,
        angular_fold=fold,
        margin_grad=margin_grad,
        hard_mode=hard_mode,
        reduction=reduction,
        lambda_inst=1.0,
        lambda_elm=0.5,
        label_smoothing=0.1,
    )
    compare(head, spec_kwargs, ALL_TABLES, leaf_names(head, ALL_TABLES), dtype)


# ---- one option at a time, with each subset of trainable tensors ------------------------------------------

SINGLE = {
    "none": ((), {}),
    "class_margins": (("class_margins",), {}),
    "angular": (("class_margins",), dict(margin_type="additive_angular", lambda_inst=1.0)),
    "elm": (("class_margins",), dict(lambda_elm=0.7)),
    "logit_offset": (("logit_offset",), {}),
    "pair_perturbation": (("pair_perturbation",), {}),
    "class_weight": (("class_weight",), {}),
    "omega": (("omega",), {}),
    "beta": (("beta",), {}),
    "marc": (("omega", "beta", "class_margins"), {}),
    "label_smoothing": ((), dict(label_smoothing=0.2)),
    "ignore": (("ignore",), {}),
    "smoothing_weights_ignore": (("class_weight", "ignore"), dict(label_smoothing=0.3)),
}
GRAD_MODES = ("all", "features_only", "input_only", "tables_only")


def requires_for(mode, head, tables_on):
    names = leaf_names(head, tables_on)
    if mode == "all":
        return set(names)
    if mode == "features_only":
        return {"input", "weight", "bias"} & set(names)
    if mode == "input_only":
        return {"input"}
    tables = set(names) & set(TRAINABLE)
    return tables or {"bias"} & set(names) or {"weight"} & set(names) or {"input"}


SINGLE_CASES = [
    (head, option, mode)
    for head in ("cosine", "linear", "logits")
    for option in SINGLE
    for mode in GRAD_MODES
    if not (head == "linear" and SINGLE[option][1].get("margin_type") == "additive_angular")
]


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("head,option,mode", SINGLE_CASES, ids=["-".join(c) for c in SINGLE_CASES])
def test_single_options_and_grad_subsets(head, option, mode, dtype):
    tables_on, spec_kwargs = SINGLE[option]
    compare(head, dict(scale=6.0, **spec_kwargs), tables_on, requires_for(mode, head, tables_on), dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_bias_with_omega(reduction):
    """The bias is scaled by omega inside the affine: its gradient carries omega (eager-tables path) or
    not (omega frozen and no other table trainable is impossible here, so both paths are the same)."""
    for requires in ({"input", "weight", "bias"}, {"bias", "omega"}):
        compare("linear", dict(scale=2.0, reduction=reduction), ("omega", "class_margins"), requires, F64)


def test_all_rows_ignored():
    x, target, weight, _, tables = make_inputs("cosine", ("class_margins",))
    target[:] = -100
    for reduction in ("sum", "none"):
        spec = MarginLossSpec(head="cosine", scale=4.0, reduction=reduction)
        grad_out = torch.ones(B, dtype=F64) if reduction == "none" else torch.tensor(1.0, dtype=F64)
        loss, _, _, hard, grads = run(KERNEL, x, target, weight, None, tables, spec, {"input", "weight"}, grad_out)
        assert torch.all(loss == 0) and not hard.any()
        assert all(torch.all(g == 0) for g in grads.values())
    spec = MarginLossSpec(head="cosine", scale=4.0)
    loss = fused.fused_margin_cross_entropy(KERNEL, x, target, weight, None, spec, LossTables(**tables))[0]
    assert torch.isnan(loss)  # mean over no rows, as PyTorch


def test_zero_feature_row_and_parallel_rows_match_the_reference():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(C, D, generator=gen, dtype=F64)
    x = torch.randn(B, D, generator=gen, dtype=F64)
    x[0] = 0.0
    x[1] = 3.0 * weight[TARGET[1]]
    x[2] = -weight[TARGET[2]]
    x[4] = 1e-14 * x[4]  # 0 < norm < eps: F.normalize divides by eps and projects nothing out
    target = torch.tensor(TARGET)
    tables = {"class_margins": torch.full((C,), 0.3, dtype=F64)}
    for fold in (None, "threshold", "easy"):
        spec = MarginLossSpec(
            head="cosine", scale=16.0, margin_type="additive_angular", angular_fold=fold, lambda_inst=1.0
        )
        truth = run(None, x, target, weight, None, tables, spec, {"input", "weight"}, torch.tensor(1.0, dtype=F64))
        got = run(KERNEL, x, target, weight, None, tables, spec, {"input", "weight"}, torch.tensor(1.0, dtype=F64))
        assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[4].values())
        assert_rel(got[0], truth[0], 1e-10, "loss")
        for name in got[4]:
            assert_rel(got[4][name], truth[4][name], 1e-8, name)


@pytest.mark.parametrize("head", ["linear", "logits"])
def test_exact_ties_go_to_the_first_index(head):
    """Exact ties in the base scores (equal logits; integer features and duplicated integer class rows,
    whose dot products are exact in any summation order): pred, the hard flag and ELM's c* take the
    lowest index, as torch.argmax and the reference do. (A BLAS GEMM need not round duplicated columns
    alike after normalisation, so the cosine head cannot make a reliable exact tie.)"""
    gen = torch.Generator().manual_seed(5)
    target = torch.tensor([4, 2, 0, 4, 1, 2])
    if head == "linear":
        weight = torch.randint(-3, 3, (C, D), generator=gen).to(F64)  # entries in [-3, 2]
        weight[2] = weight[4] = weight[6] = 3.0
        x = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]] * B, dtype=F64) + torch.randint(0, 2, (B, D), generator=gen)
        x[:, 0] = 4.0
        margin_type = "additive_cosine"
    else:
        weight = None
        x = 0.5 * torch.tanh(torch.randn(B, C, generator=gen, dtype=F64))
        x[:, 4] = x[:, 2] = x[:, 6] = 0.9
        margin_type = "additive_angular"
    tables = {"class_margins": torch.linspace(0.1, 0.4, C, dtype=F64)}
    spec = MarginLossSpec(
        head=head,
        input_is_cosine=head == "logits",
        scale=0.5,
        margin_type=margin_type,
        lambda_inst=1.0,
        lambda_elm=0.5,
        reduction="none",
    )
    z = base_scores(x, weight, None, head, tables)
    assert torch.equal(z[:, 2], z[:, 4]) and torch.equal(z[:, 2], z[:, 6])
    assert (z[:, 2:3] > torch.cat([z[:, :2], z[:, 3:4], z[:, 5:6]], 1)).all()
    truth = run(None, x, target, weight, None, tables, spec, {"input"}, torch.ones(B, dtype=F64))
    got = run(KERNEL, x, target, weight, None, tables, spec, {"input"}, torch.ones(B, dtype=F64))
    assert truth[2].tolist() == [2] * B  # the reference's own reading of the ties
    assert truth[3].tolist() == [True, False, True, True, True, False]
    assert torch.equal(got[2], truth[2]) and torch.equal(got[3], truth[3])
    assert_rel(got[0], truth[0], 1e-10, "loss")
    assert_rel(got[4]["input"], truth[4]["input"], 1e-9, "input")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """docs/loss.md section 8: fp16/bf16 inputs compute in fp32 (fp32 loss and lse, gradients in the input dtype)
    and land no further from the float64 truth (on the same rounded inputs) than the reference run in that
    dtype, up to a few units in the last place of the largest entry. Seeds whose rounded cosines come
    within 0.02 of a tie are skipped over: there a flipped argmax is a legitimate difference."""
    spec = MarginLossSpec(head="cosine", scale=8.0, margin_type="additive_angular", lambda_inst=1.0)
    requires = {"input", "weight", "logit_offset"}
    ulp = torch.finfo(dtype).eps
    checked = 0
    for seed in range(40):
        x, target, weight, _, tables = cast(*make_inputs("cosine", ("class_margins", "logit_offset"), seed=seed), dtype)
        wide = cast(x, target, weight, None, tables, F64)
        z = base_scores(wide[0], wide[2], None, "cosine", wide[4])
        gaps = z.sort(dim=1).values.diff(dim=1)
        if gaps.min() < 0.02:
            continue
        loss, lse, pred, hard, grads = run(KERNEL, x, target, weight, None, tables, spec, requires, torch.tensor(1.0))
        ref = run(None, x, target, weight, None, tables, spec, requires, torch.tensor(1.0))
        truth = run(None, *wide, spec, requires, torch.tensor(1.0, dtype=F64))
        assert loss.dtype == torch.float32 and lse.dtype == torch.float32
        assert torch.equal(pred, truth[2]) and torch.equal(hard, truth[3])
        for name, g in grads.items():
            assert g.dtype == dtype, name
            err = (g.double() - truth[4][name]).abs().max().item()
            ref_err = (ref[4][name].double() - truth[4][name]).abs().max().item()
            assert err <= 2 * ref_err + 4 * ulp * truth[4][name].abs().max().item(), (seed, name, err, ref_err)
        err = abs(loss.item() - truth[0].item())
        assert err <= 2 * abs(ref[0].item() - truth[0].item()) + 4 * ulp * truth[0].item(), (seed, err)
        checked += 1
        if checked == 3:
            break
    assert checked == 3, "too few tie-free seeds"


# ---- float64 gradcheck through the plumbing ----------------------------------------------------------------


def assert_away_from_switches(z, target, spec, tables, gap=1e-4):
    """Finite differences must not cross an argmax, ELM's c*, a fold edge or the acos clamp; both sides of
    the fold must be exercised."""
    check_no_near_ties(z, gap)
    kept = target != -100
    y = torch.where(kept, target, 0)
    c = z.gather(1, y[:, None]).squeeze(1)
    if spec.margin_type != "additive_angular":
        return
    assert ((c.abs() - 1).abs()[kept] > gap).all()
    m = tables["class_margins"]
    hard = (z.argmax(1) != y).to(z.dtype) if spec.hard_mode == "hard" else torch.ones_like(c)
    wrong = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -math.inf).argmax(1)
    M = m[y] * (1 + spec.lambda_inst * hard * (1 - c) / 2) - spec.lambda_elm * m[wrong]
    edge = {None: None, "threshold": torch.cos(math.pi - M), "easy": torch.zeros_like(c)}[spec.angular_fold]
    if edge is not None:
        assert ((c - edge).abs()[kept] > gap).all()
        folded = (c <= edge) & kept
        assert folded.any() and (~folded & kept).any(), "both sides of the fold must be exercised"


GRADCHECK = [
    (head, mt, fold)
    for head in ("cosine", "linear", "logits")
    for mt, fold in MARGINS
    if not (head == "linear" and mt == "additive_angular")
]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("head,margin_type,fold", GRADCHECK, ids=["-".join(str(v) for v in c) for c in GRADCHECK])
def test_gradcheck_through_the_plumbing(head, margin_type, fold, reduction):
    x, target, weight, bias, tables = make_inputs(head, ALL_TABLES)
    spec = MarginLossSpec(
        head=head,
        input_is_cosine=head == "logits",
        scale=4.0,
        margin_type=margin_type,
        angular_fold=fold,
        lambda_inst=1.0,
        lambda_elm=0.5,
        label_smoothing=0.1,
        reduction=reduction,
    )
    assert_away_from_switches(base_scores(x, weight, bias, head, tables), target, spec, tables)

    names = leaf_names(head, ALL_TABLES)
    values = {"input": x, "weight": weight, "bias": bias, **tables}
    leaves = [values[n].clone().requires_grad_() for n in names]
    fixed = {k: v for k, v in tables.items() if k not in TRAINABLE}

    def fn(*args):
        bound = dict(zip(names, args))
        tabs = LossTables(**fixed, **{k: bound[k] for k in TRAINABLE if k in bound})
        return fused.fused_margin_cross_entropy(
            KERNEL, bound["input"], target, bound.get("weight"), bound.get("bias"), spec, tabs
        )[0]

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_double_backward_raises_instead_of_silently_wrong_second_derivatives():
    """Fused backends give first-order gradients only: a second derivative must fail loudly."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    loss, *_ = fused.fused_margin_cross_entropy(row_torch.ROW_KERNEL, x, y, None, None, MarginLossSpec(), LossTables())
    (first,) = torch.autograd.grad(loss, x, create_graph=True, retain_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(first.sum(), x)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()
