"""The C++ extension (``fused_margin._C``: CPU kernels, CUDA kernels when built) against the reference.

Through the public API (``margin_cross_entropy``, the loss modules) with ``backend="cpu"`` (and
``backend="cuda"`` in the tests marked ``cuda``), every option is compared with the float64 reference
run on the same rounded inputs (docs/loss.md section 8): fp32 to 1e-5 of the largest |truth| (inf-norm, per
output); bf16/fp16 no further from the truth than the reference run in that dtype (twice that for the
cosine and linear heads, which round the GEMM output and dL/draw where the reference rounds elsewhere),
plus a small floor. ``pred``/``hard`` must match wherever the top two base scores are not tied at the
dtype's resolution. The cases and the comparisons are shared with the Triton backend's tests
(``kernel_cases.py``). The ops themselves are checked against the eager row-kernel contract
(``row_torch``) on odd shapes (one row, two classes, widths that are no multiple of the vector width,
rows longer than the kernels' 1024-column chunk), NaN/inf rows, with ``torch.library.opcheck``, and
under every instruction set the CPU kernels are compiled for.
"""

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import row_torch
import torch

import fused_margin as fm
from fused_margin import backends
from fused_margin.backends import extension
from fused_margin.config import CONFIG
from fused_margin.core.options import vectors as kernel_vectors
from fused_margin.core.reference import margin_cross_entropy_reference
from fused_margin.core.spec import (
    REDUCTION_CODES,
    ROW_BACKWARD_OUTPUTS,
    ROW_FORWARD_OUTPUTS,
    LossTables,
    MarginLossSpec,
    row_tables,
)

if not extension.is_built():
    pytest.skip(
        f"the fused_margin C++ extension is not built ({extension.BUILD_ERROR}); build it with "
        "pip install --no-build-isolation --no-deps -e . (scripts/setup_env.sh does)",
        allow_module_level=True,
    )

import kernel_cases  # noqa: E402
from kernel_cases import (  # noqa: E402
    CASES,
    DBM_MARGINS,
    LOW_PRECISION,
    LOW_PRECISION_CASES,
    MODEL_TENSORS,
    MODULES,
    _gen,
    compare,
    make_case,
)

OPS = torch.ops.fused_margin
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
_seed = functools.partial(kernel_cases._seed, modulus=10000)  # the data these tests have always drawn


def _backend(device):
    if device == "cuda" and not extension.cuda_built():
        pytest.skip("the extension was built without its CUDA kernels")
    return device


# ---------------------------------------------------------------------------------------------------
# cases through the public API


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp32(name, device):
    options = dict(CASES[name])
    head = options.pop("head", "cosine")
    backend = _backend(device)
    compare(make_case(head, seed=_seed(name), **options), backend, device=backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", LOW_PRECISION_CASES)
def test_matches_reference_low_precision(name, dtype, device):
    """Per-row losses over 24 rows, so the inf-norm errors compared are maxima of many roundings."""
    options = dict(CASES[name], reduction="none")
    head = options.pop("head", "cosine")
    backend = _backend(device)
    got, _ = compare(make_case(head, B=24, seed=_seed(name) + 1, **options), backend, dtype=dtype, device=backend)
    for key in ("grad_input", "grad_weight", "grad_bias"):
        if key in got:
            assert got[key].dtype == dtype, key


# The cpu backend forms dL/draw in its forward for a training step (the grad_in_forward switch, the op
# row_forward_backward): the tests above take that path wherever it applies (a reduced loss on a GEMM head,
# no table requiring grad). These keep the separate row backward checked on the same cases, check that
# path in bf16/fp16 with a reduced loss, and an upstream gradient other than 1.


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp32_with_the_separate_row_backward(name, monkeypatch):

    monkeypatch.setattr(CONFIG, "grad_in_forward", False)
    options = dict(CASES[name])
    head = options.pop("head", "cosine")
    compare(make_case(head, seed=_seed(name), **options), "cpu")


@pytest.mark.parametrize("dtype", (torch.float32,) + tuple(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_gradient_formed_in_the_forward_is_the_row_backwards(name, dtype, monkeypatch):
    """For a reduced loss (mean or sum), the forward that forms dL/draw gives the separate path's forward
    outputs bit for bit, and its gradients to the rounding of p_j: it reuses the logsumexp's exps,
    p_j = exp(l_j - m_c) exp(m_c - lse) for the max m_c of j's chunk, where the row backward computes
    exp(l_j - lse) (fp32: within 1e-5 of the largest gradient; bf16/fp16: two units of the dtype's
    rounding of it, dL/draw being rounded to the dtype before the GEMMs). The separate path is checked
    against the reference above, in every dtype."""

    options = dict(CASES[name])
    options["reduction"] = "sum" if options.get("reduction") == "sum" else "mean"
    head = options.pop("head", "cosine")
    options.setdefault("B", 24)
    case = make_case(head, seed=_seed(name) + 2, **options)
    runs = {}
    for flag in (True, False):
        monkeypatch.setattr(CONFIG, "grad_in_forward", flag)
        runs[flag] = kernel_cases.evaluate(case, "cpu", dtype)
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    for key, value in runs[False].items():
        got = runs[True][key]
        if not key.startswith("grad_"):
            assert torch.equal(got.nan_to_num(), value.nan_to_num()) and torch.equal(got.isnan(), value.isnan()), key
            continue
        assert torch.equal(got.isnan(), value.isnan()), key
        got, value = got.double().nan_to_num(), value.double().nan_to_num()
        assert (got - value).abs().max() <= tol * value.abs().max() + 1e-30, key


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("head", ("cosine", "linear"))
def test_gradient_formed_in_the_forward_takes_the_upstream_gradient(head, dtype, monkeypatch):
    """loss * 2.5: the gradients formed for an upstream 1 in the forward are scaled in the backward (on the
    cosine head inside the projections' pass), and agree with the separate row backward, which takes 2.5 in
    the kernel (fp32: to rounding; bf16: one more rounding), twice over the same graph
    (kernel_cases.check_upstream_gradient)."""
    kernel_cases.check_upstream_gradient("cpu", dtype, head, monkeypatch)


def test_when_the_forward_forms_the_gradient():
    """fused.grad_in_forward: only a training step of a reduced loss on a GEMM head, with only the features
    or class weights requiring grad, on a kernel that has the op."""
    from fused_margin.core.spec import LossTables, MarginLossSpec
    from fused_margin.paths import fused

    kernel = extension.row_kernel("cpu")
    spec = MarginLossSpec(head="cosine")
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8)
    tables = LossTables()
    assert fused.grad_in_forward(kernel, spec, x, w, None, tables)
    assert not fused.grad_in_forward(kernel._replace(forward_backward=None), spec, x, w, None, tables)
    assert not fused.grad_in_forward(kernel, MarginLossSpec(head="cosine", reduction="none"), x, w, None, tables)
    assert not fused.grad_in_forward(kernel, MarginLossSpec(head="logits"), x, None, None, tables)
    assert not fused.grad_in_forward(kernel, spec, x.detach(), w, None, tables)
    assert not fused.grad_in_forward(kernel, spec, x, w, torch.zeros(10, requires_grad=True), tables)
    assert not fused.grad_in_forward(
        kernel, spec, x, w, None, LossTables(logit_offset=torch.zeros(10, requires_grad=True))
    )
    assert not fused.grad_in_forward(kernel, spec, x, w, None, LossTables(beta=torch.zeros(10)))
    with torch.no_grad():
        assert not fused.grad_in_forward(kernel, spec, x, w, None, tables)
    seen = []
    torch.func.grad(lambda v: seen.append(fused.grad_in_forward(kernel, spec, v, w, None, tables)) or v.sum())(x)
    assert seen == [False]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODULES))
def test_modules_match_reference(name, device):
    backend = _backend(device)
    kernel_cases.compare_module(name, backend, device)


# ---------------------------------------------------------------------------------------------------
# the ops against the eager contract (row_torch): shapes, dtypes, NaN and inf


def _op_inputs(B, C, dtype, seed, full=True, ignored=True, device="cpu"):
    g = _gen(seed)
    raw = (1.6 * torch.rand(B, C, generator=g) - 0.8).to(dtype)
    target = torch.randint(0, C, (B,), generator=g)
    if ignored and B > 1:
        target[1] = -100
    tables = dict(
        row_scale=None,
        col_scale=None,
        col_shift=None,
        class_margins=0.5 * torch.rand(C, generator=g),
        logit_offset=None,
        pair_perturbation=None,
        class_weight=None,
    )
    if full:
        tables.update(
            row_scale=0.5 + torch.rand(B, generator=g),
            col_scale=0.5 + torch.rand(C, generator=g),
            col_shift=0.1 * torch.randn(C, generator=g),
            logit_offset=torch.randn(C, generator=g),
            pair_perturbation=0.3 * torch.randn(B, C, generator=g),
            class_weight=0.2 + torch.rand(C, generator=g),
        )
    tables = {k: None if v is None else v.to(device) for k, v in tables.items()}
    return raw.to(device), target.to(device), tables


FORWARD_OPTIONS = {  # (margin_type, lambda_inst, hard_all, lambda_elm, fold, straight_through, smoothing)
    "cosine_elm_smoothing": (0, 0.0, False, 1.0, 0, False, 0.1),
    "angular_instance_hard": (1, 1.0, False, 0.0, 0, False, 0.0),
    "angular_all_threshold": (1, 0.7, True, 0.5, 1, False, 0.2),
    "angular_easy_straight": (1, 1.0, False, 0.0, 2, True, 0.0),
}
OUTPUTS = ROW_FORWARD_OUTPUTS


def _forward_args(raw, target, tables, options, scale=30.0, ignore_index=-100, reduction=0):
    margin_type, lambda_inst, hard_all, lambda_elm, fold, straight, smoothing = options
    floats, ints = kernel_vectors(
        scale=scale,
        margin_type=margin_type,
        lambda_inst=lambda_inst,
        hard_all=hard_all,
        lambda_elm=lambda_elm,
        fold=fold,
        straight_through=straight,
        label_smoothing=smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    return raw, target, row_tables(**tables), floats, ints


def _backward_args(
    raw, target, tables, forward_out, grad_rows, smoothing, scale_grad, scale=30.0, denom=None, sums=False
):
    """The backward's arguments; ``sums``: the projection factors (random, positive) and the column stats."""
    _, lse, _, _, nll, target_grad, _ = forward_out
    rows, cols = raw.shape
    proj = (None, None, False)
    if sums:
        g = _gen(rows * 7 + cols)
        proj = (torch.rand(rows, generator=g).to(raw.device), torch.rand(cols, generator=g).to(raw.device), True)
    floats, ints = kernel_vectors(scale=scale, label_smoothing=smoothing)
    return (
        raw,
        target,
        row_tables(**dict(tables, class_margins=None)),
        lse,
        nll,
        target_grad,
        grad_rows,
        denom,
        floats,
        ints,
        scale_grad,
    ) + proj


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
    for reduction in REDUCTION_CODES.values():
        args = _forward_args(raw, target, tables, options, reduction=reduction)
        got = OPS.row_forward(*args)
        want = row_torch.row_forward(*args)
        for name, a, b in zip(OUTPUTS, got, want):
            _close(f"{name} (reduction {reduction})", a, b, 2e-6)
    grad_rows = torch.rand(B, generator=_gen(seed + 1)).to(device)
    shared = torch.tensor(0.75, device=device)
    for scale_grad in (True, False):
        rtol = 2e-6 if (dtype == torch.float32 or not scale_grad) else 2 * torch.finfo(dtype).eps
        for upstream, denom, sums in ((grad_rows, None, False), (shared, want[-1], True), (shared, None, True)):
            bargs = _backward_args(raw, target, tables, want, upstream, options[-1], scale_grad, denom=denom, sums=sums)
            got_b, want_b = OPS.row_backward(*bargs), row_torch.row_backward(*bargs)
            for name, a, b in zip(ROW_BACKWARD_OUTPUTS, got_b, want_b):
                # the sums: fp32 in another order than row_torch's, over up to 5000 terms
                _close(f"{name} (scale_grad={scale_grad}, sums={sums})", a, b, rtol if name == "grad" else 2e-5)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("shape", [(1, 2), (5, 2), (3, 37), (4, 1024), (3, 2085), (2, 5000)], ids=str)
def test_ops_match_the_row_contract(shape, dtype):
    for i, options in enumerate(FORWARD_OPTIONS.values()):
        check_ops_against_contract(*shape, dtype, options, full=i % 2 == 0, seed=i)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_an_ignored_row_with_non_finite_logits_has_zero_gradient_and_no_part_in_the_sums(device, dtype):
    """An ignored row's logits may be anything (a masked -inf, a NaN): its gradient is exact +0 and its row and
    column sums are those of a row of zeros, also with the output scaled (scale_grad), as the contract has it."""
    device = _backend(device)
    B, C = 4, 37
    raw, target, tables = _op_inputs(B, C, dtype, seed=3, full=True, device=device)
    assert target[1].item() == -100
    clean = raw.clone()
    clean[1] = 0
    raw[1, 5], raw[1, 9], raw[1, 30] = float("-inf"), float("nan"), float("inf")
    options = FORWARD_OPTIONS["cosine_elm_smoothing"]
    for scale_grad in (True, False):
        calls = []
        for logits in (raw, clean):
            forward = OPS.row_forward(*_forward_args(logits, target, tables, options))
            shared = torch.tensor(0.75, device=device)
            calls.append(_backward_args(logits, target, tables, forward, shared, options[-1], scale_grad, sums=True))
        (grad, row_coef, col_coef, stats), (_, row_coef0, col_coef0, stats0) = (OPS.row_backward(*a) for a in calls)
        assert torch.equal(grad[1], row_torch.row_backward(*calls[0])[0][1])  # the eager contract's zeros too
        assert torch.equal(grad[1], torch.zeros_like(grad[1])) and not grad[1].float().signbit().any()
        assert torch.isfinite(grad).all() and row_coef[1].item() == 0.0
        for name, got, want in (("row_coef", row_coef, row_coef0), ("col_coef", col_coef, col_coef0)):
            assert torch.equal(got, want), name
        assert torch.equal(stats, stats0)


def test_ops_argmax_nan_inf_and_ties_follow_torch():
    """pred is torch.argmax's (first NaN, else first max; 0 for an all -inf row), c* the first non-target
    max; NaN and inf flow into lse and the loss as in the reference."""
    nan, inf = float("nan"), float("inf")
    C = 40
    raw = torch.rand(7, C)
    raw[0, 7] = raw[0, 30] = nan  # NaN wins, the first one (in a later vector than the max)
    raw[1, :] = -inf  # argmax 0
    raw[2, 5] = inf  # lse inf
    raw[3, 3] = raw[3, 19] = raw[3, 33] = 2.0  # ties across vectors: the first
    raw[4, 0] = nan  # the target column is NaN
    raw[5, 10] = raw[5, 26] = 1.5  # c* ties (target 26 excluded)
    raw[5, 2] = 1.5
    target = torch.tensor([1, 2, 3, 19, 0, 26, 4])
    margins = torch.rand(C) * 0.3
    offset = torch.zeros(C)
    offset[11] = -inf  # a class masked out by its offset
    for options, off in (((1, 1.0, False, 1.0, 0, False, 0.0), None), ((0, 0.0, False, 1.0, 0, False, 0.1), offset)):
        tables = dict(
            row_scale=None,
            col_scale=None,
            col_shift=None,
            class_margins=margins,
            logit_offset=off,
            pair_perturbation=None,
            class_weight=None,
        )
        got = OPS.row_forward(*_forward_args(raw, target, tables, options))
        assert torch.equal(got[2], raw.argmax(1)), (got[2], raw.argmax(1))
        # the reference function itself: the public API refuses a non-finite table (the -inf offset)
        spec = MarginLossSpec(
            input_is_cosine=True,
            scale=30.0,
            margin_type=("additive_cosine", "additive_angular")[options[0]],
            lambda_inst=options[1],
            lambda_elm=options[3],
            label_smoothing=options[6],
            reduction="none",
        )
        want = margin_cross_entropy_reference(
            raw.double(),
            target,
            None,
            None,
            spec,
            LossTables(class_margins=margins.double(), logit_offset=None if off is None else off.double()),
        )
        _close("loss", got[0].double(), want[0], 1e-5)
        _close("lse", got[1].double(), want[1].lse, 1e-5)
        assert torch.equal(got[3], want[1].hard)
    # row 5's c* is class 2 (the first of the tied non-target maxima): its target logit uses m_2
    tables = dict(
        row_scale=None,
        col_scale=None,
        col_shift=None,
        class_margins=margins,
        logit_offset=None,
        pair_perturbation=None,
        class_weight=None,
    )
    out = OPS.row_forward(*_forward_args(raw, target, tables, (0, 0.0, False, 1.0, 0, False, 0.0)))
    logits = 30.0 * raw[5].double()
    logits[26] = 30.0 * (1.5 - margins[26].double() + margins[2].double())
    expected_nll = torch.logsumexp(logits, 0) - logits[26]
    assert abs(out[4][5].item() - expected_nll.item()) < 1e-4


def test_ops_reject_bad_arguments():
    raw, target, tables = _op_inputs(3, 10, torch.float32, 0)
    options = FORWARD_OPTIONS["cosine_elm_smoothing"]
    with pytest.raises(RuntimeError, match="raw must be float32, bfloat16 or float16"):
        OPS.row_forward(*_forward_args(raw.double(), target, tables, options))
    bad = target.clone()
    bad[0] = 10
    with pytest.raises(ValueError, match=r"target\[0\] = 10 is out of range"):  # the Python check's error
        OPS.row_forward(*_forward_args(raw, bad, tables, options))
    with pytest.raises(RuntimeError, match="reduction must be 0"):
        OPS.row_forward(*_forward_args(raw, target, tables, options, reduction=3))
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


def test_ops_read_a_padded_class_stride_in_place():
    """raw with its class stride padded (the fused path's GEMM output) gives the same results as a contiguous
    raw, and a gradient with the same padded stride."""
    raw, target, tables = _op_inputs(4, 45, torch.bfloat16, 6, full=True)
    padded = torch.zeros(4, 48, dtype=raw.dtype)[:, :45]
    padded.copy_(raw)
    options = FORWARD_OPTIONS["angular_all_threshold"]
    got = OPS.row_forward(*_forward_args(padded, target, tables, options))
    want = OPS.row_forward(*_forward_args(raw, target, tables, options))
    for name, a, b in zip(OUTPUTS, got, want):
        assert torch.equal(a, b), name
    for scale_grad in (True, False):
        args = [
            _backward_args(r, target, tables, want, torch.tensor(1.0), options[-1], scale_grad, sums=True)
            for r in (padded, raw)
        ]
        got_b, want_b = OPS.row_backward(*args[0]), OPS.row_backward(*args[1])
        assert got_b[0].stride() == (48, 1) and want_b[0].is_contiguous()
        for name, a, b in zip(ROW_BACKWARD_OUTPUTS, got_b, want_b):
            assert torch.equal(a, b), name


@pytest.mark.cuda
def test_cuda_ops_refuse_a_projection_operand_on_the_cpu():
    """project_out_rows_ dispatches on grad's device: v, proj or scale left on the CPU is named, not read
    through a host pointer."""
    _backend("cuda")
    grad, v, proj = torch.randn(3, 8, device="cuda"), torch.randn(3, 8, device="cuda"), torch.rand(3, device="cuda")
    for name, args in (
        ("v", (grad, v.cpu(), proj, None)),
        ("proj", (grad, v, proj.cpu(), None)),
        ("scale", (grad, v, proj, torch.tensor([2.0]))),
    ):
        with pytest.raises(RuntimeError, match=f"{name} is on cpu but grad is on cuda"):
            OPS.project_out_rows_(*args)


@pytest.mark.cuda
def test_cuda_backward_with_column_sums_takes_more_rows_than_the_grid_has_blocks():
    """With the column sums the backward takes 32 rows a block; past 65535 blocks (2,097,120 rows) it takes
    more a block: the same outputs as the CPU op."""
    _backend("cuda")
    B, C = 2_100_003, 3
    raw, target, tables = _op_inputs(B, C, torch.float32, seed=5, full=False)
    options = FORWARD_OPTIONS["cosine_elm_smoothing"]
    outputs = {}
    for device in ("cpu", "cuda"):
        on = {k: None if t is None else t.to(device) for k, t in tables.items()}
        forward = OPS.row_forward(*_forward_args(raw.to(device), target.to(device), on, options))
        shared = torch.tensor(0.5, device=device)
        args = _backward_args(raw.to(device), target.to(device), on, forward, shared, options[-1], False, sums=True)
        outputs[device] = OPS.row_backward(*args)
    for name, got, want in zip(ROW_BACKWARD_OUTPUTS, outputs["cuda"], outputs["cpu"]):
        _close(name, got, want, 2e-6 if name == "grad" else 1e-4)  # the sums: fp32 over 2.1M rows, other orders


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", (None, 2.5, -0.375))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_project_out_rows_update_is_one_fp32_multiply_add_rounded_once(dtype, scale, device):
    """The C++ projection's update: grad + c v in fp32 (times the upstream ``scale`` when given), one
    rounding to grad's dtype (what torch's addcmul_ with an fp32 coefficient computes, up to its own FMA's
    rounding, after making fp32 copies of bf16 operands on the CPU). Small integers and a power-of-two proj
    make the dot, so c, exact in any order: the result is then checked bit for bit (the CUDA op, one warp a
    row, sums in another order)."""
    device = _backend(device)
    g = _gen(11)
    grad = torch.randint(-8, 9, (37, 45), generator=g).to(dtype)
    v = torch.randint(-8, 9, (37, 45), generator=g).to(dtype)
    proj = torch.full((37,), 2.0**-7)
    coef = -(proj * (grad.float() * v.float()).sum(1))
    want = grad.float() + coef[:, None] * v.float()
    want = (want if scale is None else want * scale).to(dtype)
    got = grad.clone().to(device)
    OPS.project_out_rows_(got, v.to(device), proj.to(device), None if scale is None else torch.tensor(scale).to(device))
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_project_out_rows_takes_its_coefficient_from_grad(dtype, device):
    """grad_i - proj_i (grad_i . v_i) v_i with the dot of grad's own (rounded) values in fp32 and one rounding:
    after it, the rows are orthogonal to v to the output's rounding, however large the radial part was
    (a gradient mostly along x: the case where a coefficient from dL/draw before its rounding leaves a
    radial residual of the GEMM's rounding); proj 0 (a norm below eps) leaves the row as it is."""
    device = _backend(device)
    g = _gen(12)
    v = torch.randn(37, 45, generator=g).to(dtype)
    tangent = torch.randn(37, 45, generator=g)
    grad = (30.0 * v.float() + tangent).to(dtype)  # mostly radial
    norms = v.float().norm(dim=1)
    proj = torch.where(torch.arange(37) % 7 == 3, 0.0, 1.0 / norms**2)
    want = grad.double() - (proj.double() * (grad.double() * v.double()).sum(1))[:, None] * v.double()
    got = grad.clone().to(device)
    OPS.project_out_rows_(got, v.to(device), proj.to(device))
    got = got.cpu()
    assert torch.equal(got[3], grad[3]) and torch.equal(got[10], grad[10])
    eps = torch.finfo(dtype).eps
    assert (got.double() - want).abs().max() <= 2 * eps * want.abs().max() + 1e-5 * eps * 30 * v.double().abs().max()
    # the radial residual: the output's rounding (eps |out| per element), and fp32's of the dot (of the input)
    radial = (got.double() * v.double()).sum(1) / norms.double()
    kept = proj != 0
    bound = 2 * eps * got.double().norm(dim=1) * 45**0.5 + 8 * 2**-24 * grad.double().norm(dim=1)
    assert (radial[kept].abs() <= bound[kept]).all()
    grad, v, proj = grad.to(device), v.to(device), proj.to(device)
    torch.library.opcheck(OPS.project_out_rows_.default, (grad.clone(), v, proj))
    torch.library.opcheck(OPS.project_out_rows_.default, (grad.clone(), v, proj, torch.tensor(-2.0, device=device)))
    with pytest.raises(RuntimeError, match="scale must hold one value"):
        OPS.project_out_rows_(grad.clone(), v, proj, torch.ones(2, device=device))


def test_opcheck():
    for dtype, full in ((torch.float32, True), (torch.bfloat16, False)):
        raw, target, tables = _op_inputs(4, 37, dtype, 5, full=full)
        options = FORWARD_OPTIONS["angular_all_threshold"]
        for reduction in (0, 1):
            args = _forward_args(raw, target, tables, options, reduction=reduction)
            torch.library.opcheck(OPS.row_forward.default, args)
        out = OPS.row_forward(*args)
        for scale_grad in (True, False):
            bargs = _backward_args(raw, target, tables, out, torch.rand(4), options[-1], scale_grad)
            torch.library.opcheck(OPS.row_backward.default, bargs)
            bargs = _backward_args(
                raw, target, tables, out, torch.tensor(0.5), options[-1], scale_grad, denom=out[-1], sums=True
            )
            torch.library.opcheck(OPS.row_backward.default, bargs)
        torch.library.opcheck(OPS.row_norms.default, (raw, 1e-12))
        padded = torch.zeros(4, 48, dtype=raw.dtype)[:, :37]
        padded.copy_(raw)
        bargs = _backward_args(padded, target, tables, out, torch.tensor(0.5), options[-1], True, sums=True)
        torch.library.opcheck(OPS.row_backward.default, bargs)  # the fake kernel's padded stride too


# ---------------------------------------------------------------------------------------------------
# discovery, compile, instruction sets


def test_auto_picks_the_cpu_kernel():
    entry = backends.resolve_backend("auto", torch.device("cpu"), torch.float32)
    assert entry is backends.REGISTRY["cpu"] and entry.block_ops("cpu") is extension.CppBlockOps
    kernel = entry.row_kernel("cpu")
    assert kernel is not None and kernel.name == "cpu"
    assert kernel.forward is OPS.row_forward and kernel.backward is OPS.row_backward
    assert extension.row_kernel("cpu") is kernel
    status = fm.available_backends("cpu", torch.bfloat16)
    assert status["cpu"] == "ok"
    assert extension.cpu_kernel_isa() in ("AVX512", "AVX2", "DEFAULT")
    assert (extension.row_kernel("cuda") is None) == (not extension.cuda_built())


def test_compiles_without_graph_breaks():
    """The fake kernels let torch.compile trace the fused loss (forward and backward) in one graph."""
    case = make_case(
        "cosine", B=6, C=19, seed=3, margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0, offset=True
    )
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
    from fused_margin.backends import extension
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


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["DEFAULT", "AVX2", "AVX512"])
def test_every_instruction_set_matches_the_contract(isa):
    """Each compiled instruction set (ATEN_CPU_CAPABILITY picks it, as it picks torch's own kernels) in a
    fresh process that also registers a Python op in the fused_margin namespace first."""
    if isa != "DEFAULT" and torch.backends.cpu.get_cpu_capability() not in (isa, "AVX512"):
        pytest.skip(f"this CPU does not run {isa} code")
    if isa == extension.cpu_kernel_isa():
        pytest.skip(f"{isa} is this process's kernel set, tested by the other tests")
    env = dict(
        os.environ,
        ATEN_CPU_CAPABILITY=isa.lower(),
        PYTHONPATH=os.pathsep.join(
            [
                os.path.dirname(__file__),
                os.path.join(os.path.dirname(__file__), os.pardir, "helpers"),
                os.environ.get("PYTHONPATH", ""),
            ]
        ),
    )
    result = subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT.format(isa=isa)], env=env, capture_output=True, text=True, timeout=120
    )
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


def _torch_cxx_standard(cpp_extension):
    """The C++ standard torch.utils.cpp_extension compiles extensions with (C++17 up to torch 2.12, C++20 after;
    torch 2.14's headers need C++20): the ``['-std=c++NN'`` lists of its source, else C++17."""
    import inspect
    import re

    found = re.findall(r"\['-std=c\+\+(\d\d)'", inspect.getsource(cpp_extension))
    return f"c++{max(found, key=int)}" if found else "c++17"


@pytest.mark.slow
def test_cuda_source_compiles_for_sm90():
    """The CUDA kernels cannot run here, but nvcc can compile them (for sm_90, with setup.py's flags,
    --fmad=false included) against the installed torch's headers: type errors, the whole-warp
    static_assert and the row contract's fields are checked without a GPU. A CPU-only torch ships the
    c10/cuda headers but not the generated cuda_cmake_macros.h, which is supplied here."""
    import shutil
    import sysconfig
    import tempfile

    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc") or (
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    )
    if nvcc is None or not os.path.exists(nvcc):
        pytest.skip("no nvcc")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory() as tmp:
        includes = cpp_extension.include_paths()
        if not any(os.path.exists(os.path.join(d, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for d in includes):
            os.makedirs(os.path.join(tmp, "c10", "cuda", "impl"))
            with open(os.path.join(tmp, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
                f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
            includes = [tmp] + includes
        command = [
            nvcc,
            "-arch=sm_90",
            f"-std={_torch_cxx_standard(cpp_extension)}",
            "-O3",
            "--fmad=false",
            "-DFUSED_MARGIN_WITH_CUDA",
            "-I",
            os.path.join(root, "fused_margin", "backends", "csrc"),
            "-I",
            sysconfig.get_paths()["include"],
        ]
        for d in includes:
            command += ["-I", d]
        command += [
            "-c",
            os.path.join(root, "fused_margin", "backends", "csrc", "fused_margin_cuda.cu"),
            "-o",
            os.path.join(tmp, "k.o"),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    # a host-only function called from device code is only a warning for nvcc (e.g. #20013, a constexpr
    # std::numeric_limits member without --expt-relaxed-constexpr): none in our sources
    ours = [
        line
        for line in result.stderr.splitlines()
        if line.startswith(os.path.join(root, "fused_margin", "backends", "csrc")) and "warning" in line
    ]
    assert not ours, "\n".join(ours[:20])
