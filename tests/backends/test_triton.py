"""The Triton backend against the reference (docs/loss.md section 8).

Every comparison goes through the public API (``margin_cross_entropy``, the loss modules) with
``backend="triton"``, against the float64 reference on the same (rounded) inputs: fp32 runs agree to
about 1e-5 relative (inf-norm, per output); fp16/bf16 runs may err no more than the reference run in
that dtype, plus a small floor. ``pred``/``hard`` must match on rows whose top two base scores are not
tied within the dtype's resolution. Small shapes with a forced small column block, so the kernels' loop
over column blocks (and a partial last block) is exercised. The cases and the comparisons are shared
with the C++ extension's tests (``kernel_cases.py``).

On a CPU-only machine these run in Triton's interpreter (``TRITON_INTERPRET=1``, which supports bf16
and fp16); the tests marked ``cuda`` repeat the comparisons at larger shapes on a GPU, check that the
kernels make no host synchronisation and compile the loss with inductor.
"""

import functools
import os

import pytest
import torch

from fused_margin.config import CONFIG

if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip(
        "the Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run in Triton's CPU "
        "interpreter (scripts/test.sh sets it on CPU-only machines)",
        allow_module_level=True,
    )
pytest.importorskip("triton")

import kernel_cases  # noqa: E402
import row_torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from kernel_cases import (  # noqa: E402  # noqa: E402
    CASES,
    DBM_MARGINS,
    LOW_PRECISION,
    LOW_PRECISION_CASES,
    MODULES,
    _counts,
    _gen,
    _upstream,
    assert_fp32_close,
    backward_args,
    forward_args,
    make_case,
)

import fused_margin as fm  # noqa: E402
from fused_margin.backends.triton import (  # noqa: E402
    INTERPRETED,
    ROW_KERNEL,
    max_block,
    row_backward,
    row_forward,
    row_forward_backward,
)
from fused_margin.backends.triton._common import round_to, target_margin  # noqa: E402
from fused_margin.core import options, rowmath  # noqa: E402
from fused_margin.core.options import KERNEL_INTS  # noqa: E402
from fused_margin.core.spec import (  # noqa: E402
    REDUCTION_CODES,
    ROW_BACKWARD_OUTPUTS,
    ROW_FORWARD_OUTPUTS,
    MarginLossSpec,  # noqa: E402
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_seed = functools.partial(kernel_cases._seed, modulus=1000)  # the data these tests have always drawn


def compare(case, dtype=torch.float32, block=8):
    """``kernel_cases.compare`` on the Triton backend with the column block capped at ``block``; returns
    ``(got, truth)``."""
    return kernel_cases.compare(case, "triton", dtype, DEVICE, context=lambda: max_block(block))


# ---------------------------------------------------------------------------------------------------
# every option, fp32


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp32(name):
    options = dict(CASES[name])
    head = options.pop("head", "cosine")
    compare(make_case(head, seed=_seed(name), **options))


@pytest.mark.parametrize("block", [2, 4, 64])
def test_block_size_does_not_change_the_result(block):
    case = make_case(
        "cosine",
        seed=7,
        margins=DBM_MARGINS,
        margin_type="additive_angular",
        lambda_inst=1.0,
        lambda_elm=0.5,
        label_smoothing=0.1,
        weights=True,
        offset=True,
        ignored=(2,),
    )
    compare(case, block=block)


# ---------------------------------------------------------------------------------------------------
# fp16 / bf16 (the interpreter runs both)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", LOW_PRECISION_CASES)
def test_matches_reference_low_precision(name, dtype):
    """Per-row losses (``reduction="none"``, 24 rows) so that the inf-norm errors compared are maxima
    over many rounding errors, not one scalar's luck."""
    options = dict(CASES[name], reduction="none")
    head = options.pop("head", "cosine")
    got, _ = compare(make_case(head, B=24, seed=_seed(name) + 1, **options), dtype=dtype)
    for key, value in got.items():
        if key in ("grad_input", "grad_weight", "grad_bias"):
            assert value.dtype == dtype, key


# ---------------------------------------------------------------------------------------------------
# the loss modules


@pytest.mark.parametrize("name", list(MODULES))
def test_modules_match_reference(name):
    kernel_cases.compare_module(name, "triton", DEVICE, context=lambda: max_block(8))


# ---------------------------------------------------------------------------------------------------
# argmax semantics, clamps, layouts and edge cases


def _logits_run(input_, target, backend, block=4, **options):
    x = input_.detach().clone().to(DEVICE).requires_grad_()
    with max_block(block):
        loss, aux = fm.margin_cross_entropy(
            x, target.to(DEVICE), backend=backend, return_aux=True, reduction="none", **options
        )
        (grad,) = torch.autograd.grad(loss, [x], _upstream(loss.shape[0]).to(loss))
    return loss, aux, grad


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's log(0) = -inf
def test_pred_ties_and_nan_follow_torch_argmax():
    inf, nan = float("inf"), float("nan")
    rows = torch.tensor(
        [
            [0.0, 2.0, 1.0, 2.0, 0.5, 2.0, 0.0, 1.0, 2.0, 0.0],  # ties across blocks of 4: first index
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0],  # max in the last, partial block
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all tied
            [0.0, 1.0, nan, 5.0, nan, 0.0, 0.0, 0.0, 0.0, 0.0],  # NaN wins, the first one
            [-inf, -inf, -inf, -inf, -inf, 0.5, -inf, -inf, -inf, -inf],
            [0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.9, 0.0],  # tie between target (7) and 8
        ]
    )
    target = torch.tensor([3, 0, 5, 1, 5, 7])
    margins = torch.linspace(0.1, 1.0, 10).to(DEVICE)
    got = _logits_run(rows, target, "triton", class_margins=margins, lambda_elm=1.0, lambda_inst=0.5, scale=2.0)
    ref = _logits_run(
        rows.double(), target, "reference", class_margins=margins.double(), lambda_elm=1.0, lambda_inst=0.5, scale=2.0
    )
    assert torch.equal(got[1].pred.cpu(), rows.argmax(1))
    assert torch.equal(got[1].pred.cpu(), torch.tensor([1, 9, 0, 2, 5, 7]))
    assert torch.equal(got[1].hard, ref[1].hard)
    for label, a, b in (("loss", got[0], ref[0]), ("lse", got[1].lse, ref[1].lse), ("grad", got[2], ref[2])):
        assert_fp32_close(label, a, b)


def test_elm_strongest_wrong_class_ties_to_lowest_index():
    # c* is the first of the tied non-target maxima, found across column blocks
    rows = torch.tensor([[0.1, 0.7, 0.3, 0.2, 0.7, 0.0, 0.7, 0.1, 0.0], [0.9, 0.0, 0.0, 0.0, 0.0, 0.4, 0.0, 0.0, 0.4]])
    target = torch.tensor([4, 0])
    margins = torch.tensor([0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9]).to(DEVICE)
    got = _logits_run(rows, target, "triton", block=2, class_margins=margins, lambda_elm=1.0, scale=10.0)
    ref = _logits_run(rows.double(), target, "reference", class_margins=margins.double(), lambda_elm=1.0, scale=10.0)
    assert_fp32_close("loss", got[0], ref[0])
    # the target logit t = lse - loss (no weights, no smoothing), by hand: row 0 has c* = 1 (margin 0.1),
    # not the target 4 nor 6, so t = 10 (0.7 - 0.4 + 0.1); row 1 has c* = 5, t = 10 (0.9 - 0.5 + 0.6)
    target_logit = (got[1].lse - got[0]).cpu().double()
    assert torch.allclose(target_logit, torch.tensor([4.0, 10.0], dtype=torch.float64), atol=1e-5), target_logit


def test_angular_clamp_at_plus_minus_one():
    """Cosines exactly +-1 sit outside the acos clamp: psi uses the clamped value and its gradient has
    no 1/sin(theta) term. The fp32 clamp bound is not the fp64 one, so the fp32 reference judges."""
    rows = torch.tensor([[1.0, 0.2, -0.3, 0.1, 0.0], [0.3, -1.0, 0.2, 0.5, 0.1], [0.5, 0.1, 1.0, -0.2, 0.3]])
    target = torch.tensor([0, 1, 2])
    options = dict(
        input_is_cosine=True,
        margin_type="additive_angular",
        scale=30.0,
        lambda_inst=1.0,
        class_margins=torch.tensor([0.3, 0.5, 0.2, 0.4, 0.1]).to(DEVICE),
    )
    got = _logits_run(rows, target, "triton", **options)
    ref = _logits_run(rows, target, "reference", **options)
    for label, a, b in (("loss", got[0], ref[0]), ("lse", got[1].lse, ref[1].lse), ("grad", got[2], ref[2])):
        assert_fp32_close(label, a, b, rtol=2e-6)


def test_strided_logits_and_pair_perturbation():
    g = _gen(5)
    base = 2.0 * torch.randn(11, 8, generator=g)
    pair_base = torch.randn(11, 16, generator=g)
    target = torch.randint(0, 11, (8,), generator=g).to(DEVICE)
    results = []
    for contiguous in (False, True):
        x = base.t().to(DEVICE)  # 8 x 11, strides (1, 8)
        pair = pair_base[:, ::2].t().to(DEVICE)  # 8 x 11, strides (2, 16)
        if contiguous:
            x, pair = x.contiguous(), pair.contiguous()
        x.requires_grad_()
        pair.requires_grad_()
        with max_block(4):
            loss = fm.margin_cross_entropy(
                x,
                target,
                pair_perturbation=pair,
                backend="triton",
                class_margins=torch.full((11,), 0.3, device=DEVICE),
                scale=2.0,
            )
            results.append((loss, *torch.autograd.grad(loss, [x, pair])))
    x64 = base.t().double().to(DEVICE).requires_grad_()
    pair64 = pair_base[:, ::2].t().double().to(DEVICE).requires_grad_()
    loss = fm.margin_cross_entropy(
        x64,
        target,
        pair_perturbation=pair64,
        backend="reference",
        class_margins=torch.full((11,), 0.3, device=DEVICE),
        scale=2.0,
    )
    truth = (loss, *torch.autograd.grad(loss, [x64, pair64]))
    for got in results:
        for label, a, b in zip(("loss", "grad_input", "grad_pair"), got, truth):
            assert_fp32_close(label, a, b)


def test_all_rows_ignored_mean_is_nan_with_zero_gradients():
    case = make_case(
        "cosine", B=3, seed=3, margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0, ignored=(0, 1, 2)
    )
    got, truth = compare(case)
    assert got["loss"].isnan() and truth["loss"].isnan()
    assert not got["hard"].any()
    assert (got["grad_input"] == 0).all() and (got["grad_weight"] == 0).all()


def test_large_common_offset_with_label_smoothing():
    """Logits around 1e3: the online logsumexp and the smoothing sum must not lose the 1e-5 relative
    accuracy (the smoothing sum is accumulated relative to the target's logit)."""
    g = _gen(9)
    x = 1000.0 + torch.randn(5, 300, generator=g, dtype=torch.float64)
    target = torch.randint(0, 300, (5,), generator=g)
    case = {
        "tensors": {"input": x},
        "target": target,
        "grads": ["input"],
        "options": dict(head="logits", label_smoothing=0.3, reduction="none"),
    }
    compare(case, block=16)


# ---------------------------------------------------------------------------------------------------
# the row kernels directly: the contract of fused_margin.paths.fused, against its eager statement


def _row_args(B=5, C=23, dtype=torch.float32, seed=0, ignore=(1,)):
    g = _gen(seed)
    raw = (torch.randn(B, C, generator=g) * 2.0).to(dtype).to(DEVICE)
    target = torch.randint(0, C, (B,), generator=g)
    target[list(ignore)] = -100
    f32 = lambda *shape: torch.rand(*shape, generator=g).to(DEVICE)  # noqa: E731
    tables = dict(
        row_scale=f32(B) + 0.2,
        col_scale=f32(C) + 0.2,
        col_shift=f32(C) - 0.5,
        class_margins=f32(C) * 0.5,
        logit_offset=f32(C) - 0.5,
        pair_perturbation=f32(B, C) - 0.5,
        class_weight=f32(C) + 0.5,
    )
    return raw, target.to(DEVICE), tables


@pytest.mark.parametrize(
    "margin_type, fold, straight_through", [(0, 0, False), (1, 0, False), (1, 1, False), (1, 2, True)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_kernels_match_eager_contract(margin_type, fold, straight_through, dtype):
    raw, target, t = _row_args(dtype=dtype)
    options = dict(
        scale=3.0,
        margin_type=margin_type,
        lambda_inst=1.0,
        lambda_elm=0.5,
        fold=fold,
        straight_through=straight_through,
        label_smoothing=0.1,
    )
    for reduction in REDUCTION_CODES.values():
        args = forward_args(raw, target, t, **options, reduction=reduction)
        with max_block(8):
            got = ROW_KERNEL.forward(*args)
        want = row_torch.row_forward(*args)
        for name, a, b in zip(ROW_FORWARD_OUTPUTS, got, want):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            if a.is_floating_point():
                assert_fp32_close(name, a, b, rtol=2e-6)
            else:
                assert torch.equal(a, b), name
    B, C = raw.shape
    g = _gen(2)
    grad_rows = torch.rand(B, generator=g).to(DEVICE)
    projections = (torch.rand(B, generator=g).to(DEVICE), torch.rand(C, generator=g).to(DEVICE))
    for scale_grad in (False, True):
        for upstream, denom, proj, stats in (
            (grad_rows, None, (None, None), False),
            (torch.tensor(0.7).to(DEVICE), want[-1], projections, True),
        ):
            back = backward_args(
                raw,
                target,
                t,
                want[1],
                want[4],
                want[5],
                upstream,
                denom,
                scale=3.0,
                label_smoothing=0.1,
                scale_grad=scale_grad,
                row_proj=proj[0],
                col_proj=proj[1],
                col_stats=stats,
            )
            with max_block(8):  # several column blocks, and (B = 5) one partial block of rows
                got_b = ROW_KERNEL.backward(*back)
            want_b = row_torch.row_backward(*back)
            for name, a, b in zip(ROW_BACKWARD_OUTPUTS, got_b, want_b):
                assert a.dtype == b.dtype and a.shape == b.shape, name
                if name == "grad" and dtype != torch.float32 and scale_grad:
                    # one bf16 rounding of the same fp32 value, give or take an fp32 ulp
                    assert_fp32_close(f"grad scale_grad={scale_grad}", a, b, rtol=torch.finfo(dtype).eps)
                else:
                    assert_fp32_close(f"{name} scale_grad={scale_grad}", a, b, rtol=2e-6 if name == "grad" else 1e-5)
            assert (got_b[0][target.cpu() == -100] == 0).all()


def test_row_kernels_without_optional_tables_and_empty_batch():
    raw, target, _ = _row_args(B=4, C=9)
    args = forward_args(raw, target, reduction=0)
    got, want = ROW_KERNEL.forward(*args), row_torch.row_forward(*args)
    for a, b in zip(got, want):
        if a.is_floating_point():
            assert_fp32_close("row output", a, b, rtol=2e-6)
        else:
            assert torch.equal(a, b)
    empty = ROW_KERNEL.forward(*forward_args(raw[:0], target[:0], reduction=0))
    assert [o.shape for o in empty] == [torch.Size([0])] * 6 + [torch.Size([])]
    assert empty[-1].item() == 0  # no kept row
    mean = ROW_KERNEL.forward(*forward_args(raw[:0], target[:0], reduction=REDUCTION_CODES["mean"]))
    assert mean[0].shape == () and mean[0].isnan()  # 0 / 0, as F.cross_entropy
    grad, row_coef, col_coef, stats = ROW_KERNEL.backward(
        *backward_args(
            raw[:0],
            target[:0],
            None,
            *empty[1:2],
            *empty[4:6],
            empty[0],
            None,
            row_proj=torch.ones(0, device=DEVICE),
            col_proj=torch.ones(9, device=DEVICE),
            col_stats=True,
        )
    )
    assert grad.shape == (0, 9) and row_coef.shape == (0,)
    assert torch.equal(col_coef, torch.zeros(9, device=DEVICE)) and torch.equal(stats, torch.zeros(3, 9, device=DEVICE))


def test_bad_arguments_are_named():
    raw, target, _ = _row_args(B=2, C=4)
    args = forward_args(raw, target)[2:]
    with pytest.raises(ValueError, match=r"target\[1\] = 4 is out of range"):  # checked by the kernel
        ROW_KERNEL.forward(raw, torch.tensor([0, 4]).to(DEVICE), *args)
    with pytest.raises(ValueError, match="reduction"):
        ROW_KERNEL.forward(*forward_args(raw, target, reduction=3))
    sizes = f"{len(options.KERNEL_FLOATS)} float and {len(options.KERNEL_INTS)} int"
    with pytest.raises(ValueError, match=f"the row ops take {sizes} options"):
        ROW_KERNEL.forward(raw, target, args[0], args[1][:-1], args[2])
    with pytest.raises(ValueError, match="the row ops take 7 tables"):
        ROW_KERNEL.forward(raw, target, args[0][:-1], *args[1:])
    with pytest.raises(TypeError, match="raw"):
        ROW_KERNEL.forward(raw.double(), target, *args)
    with pytest.raises(ValueError, match="target"):
        ROW_KERNEL.forward(raw, target[:1], *args)
    with pytest.raises(ValueError, match="raw must be B x C with C >= 2"):
        ROW_KERNEL.forward(raw[:, :1], target, *args)
    with pytest.raises(ValueError, match="limit"):
        with max_block(3):
            pass


# ---------------------------------------------------------------------------------------------------
# the forward that forms the gradient (row_forward_backward, the grad_in_forward switch)


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(f"{func.namespace}.{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


_LOW_PRECISION_FORWARD_BACKWARD = (
    "dbm_bs_drw",
    "smoothing_weighted_ignored",
    "elm_angular_instance",
    "reduction_sum",
    "linear_margins_elm_smoothing",
    "two_classes",
)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_gradient_formed_in_the_forward_is_the_row_backwards(name, dtype, monkeypatch):
    """A training step of a reduced loss on a GEMM head takes ``triton_row_forward_backward`` (dL/draw
    written over the GEMM output by the forward's program, right after the row's forward): its forward
    outputs and gradients are the separate row backward's bit for bit in the interpreter (the one
    ``logit_grad`` expression; the GPU compiler may schedule the two kernels' divisions differently, so
    there within two units of the dtype's rounding). The cases' fp32 runs against the reference above take
    this path wherever it applies; this also keeps the separate backward under test on every case."""

    if dtype != torch.float32 and name not in _LOW_PRECISION_FORWARD_BACKWARD:
        pytest.skip("the low-precision runs take a few cases (each is two interpreted steps)")
    options = dict(CASES[name])
    if options.get("reduction") == "none":
        options["reduction"] = "mean"  # the path is for reduced losses
    head = options.pop("head", "cosine")
    case = make_case(head, seed=_seed(name) + 3, **options)
    block = 512 if name == "longer_than_a_chunk" else 8  # still several blocks a row, in a tenth of the time
    runs, names = {}, {}
    for flag in (True, False):
        monkeypatch.setattr(CONFIG, "grad_in_forward", flag)
        with _OpNames() as log:
            runs[flag] = kernel_cases.evaluate(case, "triton", dtype, DEVICE, context=lambda: max_block(block))
        names[flag] = log.names
    applies = head != "logits" and set(case["grads"]) <= {"input", "weight"}
    assert ("fused_margin.triton_row_forward_backward" in names[True]) == applies, names[True]
    assert "fused_margin.triton_row_forward_backward" not in names[False]
    assert ("fused_margin.triton_row_backward" in names[True]) != applies
    tol = 0.0 if INTERPRETED else (1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps)
    for key, value in runs[False].items():
        got = runs[True][key]
        assert torch.equal(got.isnan(), value.isnan()), key
        if not key.startswith("grad_") or INTERPRETED:
            assert torch.equal(got.nan_to_num(), value.nan_to_num()), key
            continue
        got, value = got.double().nan_to_num(), value.double().nan_to_num()
        assert (got - value).abs().max() <= tol * value.abs().max(), key


@pytest.mark.slow
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("head", ("cosine", "linear"))
def test_gradient_formed_in_the_forward_takes_the_upstream_gradient(head, dtype, monkeypatch):
    """loss * k (k = 1, 2.5, -0.125): the gradient formed for an upstream 1 in the forward takes k in the
    backward (on the cosine head inside the projections' pass, project_out's scale; on the linear head one
    multiply of dL/draw) and agrees with the separate row backward, which takes k in the kernel (fp32: to
    rounding; bf16: to two of its roundings), twice over one graph (kernel_cases.check_upstream_gradient)."""
    kernel_cases.check_upstream_gradient("triton", dtype, head, monkeypatch, DEVICE, context=lambda: max_block(8))


def test_forward_backward_op_writes_the_row_backwards_gradient_over_raw():
    """The op itself, on a padded class stride (the fused path's GEMM output) with every table but the pair
    perturbation, mean and sum, one ignored row: the forward outputs are ``triton_row_forward``'s and raw
    becomes ``triton_row_backward``'s dL/draw (scaled, raw's dtype) for the upstream gradient 1; bad
    arguments are refused by name."""
    for dtype in (torch.float32, torch.bfloat16):
        raw0, target, t = _row_args(B=6, C=21, dtype=dtype)
        for reduction in (1, 2):
            buffer = torch.full((6, 32), float("nan"), dtype=dtype, device=DEVICE)
            raw = buffer[:, :21]
            raw.copy_(raw0)
            tables = dict(t, pair_perturbation=None)
            options = dict(scale=3.0, margin_type=1, lambda_inst=1.0, lambda_elm=0.5, label_smoothing=0.1)
            args = forward_args(raw0, target, tables, **options, reduction=reduction)
            with max_block(8):
                want = row_forward(*args)
                grad = row_backward(
                    *backward_args(
                        raw0,
                        target,
                        tables,
                        want[1],
                        want[4],
                        want[5],
                        torch.ones((), device=DEVICE),
                        want[6] if reduction == 1 else None,
                        **options,
                    )
                )[0]
                got = row_forward_backward(raw, *args[1:], None, None)
            for label, a, b in zip(ROW_FORWARD_OUTPUTS, got, want):
                assert torch.equal(a.nan_to_num(), b.nan_to_num()), label
            assert got[7].numel() == 0 and got[8].numel() == 0
            tol = 0.0 if INTERPRETED else 2 * torch.finfo(dtype).eps * grad.float().abs().max().item()
            assert (raw.float() - grad.float()).abs().max().item() <= tol, (dtype, reduction)
            assert not raw[1].any()  # the ignored row
            # the padding is read in whole vectors (io_columns) but its NaN reaches no column of raw
            assert torch.isfinite(raw).all() and not buffer[:, 21:].nan_to_num().any()
    raw, target, _ = _row_args(B=2, C=4)
    args, none = forward_args(raw, target, reduction=1)[2:], forward_args(raw, target, reduction=0)[2:]
    with pytest.raises(ValueError, match="reduction must be the code of 'mean'"):
        row_forward_backward(raw.clone(), target, *none, None, None)
    with pytest.raises(ValueError, match="row_proj and col_proj must be None"):
        row_forward_backward(raw.clone(), target, *args, torch.ones(2, device=DEVICE), None)
    with pytest.raises(ValueError, match="unit column stride"):
        row_forward_backward(raw.t().contiguous().t(), target, *args, None, None)
    if INTERPRETED:  # on a GPU, a device assertion (test_bad_arguments_are_named's forward check runs on CPU)
        with pytest.raises(ValueError, match=r"target\[1\] = 4 is out of range"):
            row_forward_backward(raw.clone(), torch.tensor([0, 4]).to(DEVICE), *args, None, None)


# ---------------------------------------------------------------------------------------------------
# the angular margin helper (it replaces acos by the angle-addition formulas)


@triton.jit
def _psi_kernel(
    c_ptr,
    m_ptr,
    dm_ptr,
    value_ptr,
    grad_ptr,
    n,
    MARGIN_TYPE: tl.constexpr,
    FOLD: tl.constexpr,
    STRAIGHT_THROUGH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = tl.load(c_ptr + offs, mask=mask, other=0.0)
    value, grad = target_margin(
        c,
        tl.load(m_ptr + offs, mask=mask, other=0.0),
        tl.load(dm_ptr + offs, mask=mask, other=0.0),
        1.0,
        MARGIN_TYPE,
        FOLD,
        STRAIGHT_THROUGH,
    )
    tl.store(value_ptr + offs, value, mask=mask)
    tl.store(grad_ptr + offs, grad, mask=mask)


def _psi_truth(c, m, dm, fold):
    """float64 ``cos(acos(clamp(c)) + M)`` and its derivative, as reference.target_margin and row_torch state it."""
    lo, hi = -1.0 + 1e-7, 1.0 - 1e-7
    theta = torch.acos(c.clamp(lo, hi))
    value = torch.cos(theta + m)
    inside = ((c >= lo) & (c <= hi)).double()
    grad = torch.sin(theta + m) / torch.sin(theta) * inside - torch.sin(theta + m) * dm
    if fold == 1:
        folded = c <= torch.cos(torch.pi - m)
        value = torch.where(folded, c - m * torch.sin(m), value)
        grad = torch.where(folded, 1.0 - (torch.sin(m) + m * torch.cos(m)) * dm, grad)
    elif fold == 2:
        value = torch.where(c <= 0, c, value)
        grad = torch.where(c <= 0, torch.ones_like(grad), grad)
    return value, grad


@pytest.mark.parametrize("fold", [0, 1, 2])
def test_angular_margin_accuracy(fold):
    """Over cosines in [-1, 1] and margins in [-0.5, 3], the kernel's fp32 psi is within 5e-7 of the
    float64 truth, and its derivative (normalised by max(|truth|, 1)) errs no more than the fp32 eager
    statement built on ``torch.acos`` (``row_torch``), plus 1e-6. Cosines within 1e-6 of +-1 are left
    to ``test_angular_clamp_at_plus_minus_one``: the fp32 and fp64 clamp bounds differ there."""
    c = torch.linspace(-1.0 + 1e-6, 1.0 - 1e-6, 4001, dtype=torch.float64).float()
    c = torch.cat([c, torch.tensor([0.0, 0.5, -0.5, 1.0 - 2e-6, -1.0 + 2e-6])])
    m = torch.linspace(-0.5, 3.0, c.numel())[torch.randperm(c.numel(), generator=_gen(0))]
    dm = -0.2 * torch.rand(c.numel(), generator=_gen(1))
    c, m, dm = c.to(DEVICE), m.to(DEVICE), dm.to(DEVICE)
    value, grad = torch.empty_like(c), torch.empty_like(c)
    _psi_kernel[(triton.cdiv(c.numel(), 1024),)](
        c, m, dm, value, grad, c.numel(), MARGIN_TYPE=1, FOLD=fold, STRAIGHT_THROUGH=False, BLOCK=1024
    )
    want_value, want_grad = _psi_truth(c.double(), m.double(), dm.double(), fold)
    eager_value, eager_grad = rowmath.target_logit(
        c,
        m,
        dm,
        MarginLossSpec(
            head="logits",
            input_is_cosine=True,
            margin_type="additive_angular",
            angular_fold=(None, "threshold", "easy")[fold],
        ),
    )
    # away from the fold boundary, where fp32 and fp64 may take different branches
    if fold == 1:
        check = (c.double() - torch.cos(torch.pi - m.double())).abs() > 1e-6
    else:
        check = torch.ones_like(c, dtype=torch.bool)
    value_err = (value.double() - want_value)[check].abs().max().item()
    assert value_err < 5e-7, value_err
    norm = want_grad.abs().clamp_min(1.0)
    grad_err = ((grad.double() - want_grad) / norm)[check].abs().max().item()
    eager_err = ((eager_grad.double() - want_grad) / norm)[check].abs().max().item()
    assert grad_err <= eager_err + 1e-6, (grad_err, eager_err)


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, round_to(tl.load(x_ptr + offs, mask=mask), y_ptr.dtype.element_ty), mask=mask)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's cast to fp16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gradient_store_rounds_to_nearest_even(dtype):
    """The backward writes dL/draw rounded as ``Tensor.to`` rounds (nearest, ties to even), including
    exact ties, infinities, NaN and the largest finite values."""
    g = _gen(0)
    ties = torch.randint(-(2**14), 2**14, (512,), generator=g).float() * 2**-9 + 2**-17
    x = torch.cat(
        [
            torch.randn(4096, generator=g) * 10.0,
            ties,
            torch.tensor(
                [
                    float("inf"),
                    -float("inf"),
                    float("nan"),
                    3.0e38,
                    -3.0e38,
                    65519.0,
                    0.0,
                    -0.0,
                    1.0 + 2**-8,
                    1.0 + 3 * 2**-8,
                    255.99,
                ]
            ),
        ]
    ).to(DEVICE)
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = x.to(dtype)
    assert torch.equal(y.isnan(), want.isnan())
    assert torch.equal(y[~want.isnan()], want[~want.isnan()])


# ---------------------------------------------------------------------------------------------------
# torch.library registration and torch.compile


def _op_args(scale_grad=True):
    raw, target, t = _row_args(B=4, C=11)
    tables = dict(t, col_shift=None, pair_perturbation=None)
    options = dict(scale=5.0, margin_type=1, lambda_inst=1.0, lambda_elm=0.5, fold=1, label_smoothing=0.1)
    forward = forward_args(raw, target, tables, **options, reduction=1)
    lse, nll, target_grad, denom = [o for i, o in enumerate(row_forward(*forward)) if i in (1, 4, 5, 6)]
    backward = backward_args(
        raw,
        target,
        tables,
        lse,
        nll,
        target_grad,
        torch.tensor(0.5).to(DEVICE),
        denom,
        **options,
        scale_grad=scale_grad,
        row_proj=torch.rand(4).to(DEVICE),
        col_proj=torch.rand(11).to(DEVICE),
        col_stats=True,
    )
    return forward, backward


def _with_reduction(forward, reduction):
    """Forward arguments with another reduction code."""
    ints = list(forward[4])
    ints[[arg.name for arg in KERNEL_INTS].index("reduction")] = reduction
    return forward[:4] + (ints,)


def test_ops_are_registered_and_pass_opcheck():
    assert ROW_KERNEL.forward is row_forward and ROW_KERNEL.backward is row_backward  # the registered ops
    assert torch.ops.fused_margin.triton_row_forward.default is not None
    assert torch.ops.fused_margin.triton_row_backward.default is not None
    forward, backward = _op_args()
    for op, args in (
        (torch.ops.fused_margin.triton_row_forward.default, forward),
        (torch.ops.fused_margin.triton_row_forward.default, _with_reduction(forward, 0)),
        (torch.ops.fused_margin.triton_row_backward.default, backward),
        (torch.ops.fused_margin.triton_row_backward.default, _op_args(False)[1]),
        (torch.ops.fused_margin.triton_row_norms.default, (forward[0], 1e-12)),
    ):
        torch.library.opcheck(op, args)  # schema, fake kernel, autograd registration, AOT dispatch
    grad = torch.randn(5, 37, device=DEVICE)
    torch.library.opcheck(
        torch.ops.fused_margin.triton_project_out_rows_.default,
        (grad, torch.randn(5, 37, device=DEVICE), torch.rand(5, device=DEVICE)),
    )
    assert ROW_KERNEL.forward_backward is row_forward_backward
    for reduction in (1, 2):
        torch.library.opcheck(
            torch.ops.fused_margin.triton_row_forward_backward.default,
            _with_reduction(forward, reduction) + (None, None),
        )


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_project_out_rows_update_is_one_fp32_multiply_add_rounded_once(dtype):
    """The Triton projection's update: (grad + c v) scale in fp32, one rounding (to nearest even) to grad's
    dtype, with and without the upstream ``scale``; small integers and a power-of-two proj make every step
    exact but the final rounding, so the result is checked bit for bit."""
    from fused_margin.backends.triton.norms import project_out_rows_

    g = _gen(11)
    grad = torch.randint(-8, 9, (37, 300), generator=g).to(dtype)
    v = torch.randint(-8, 9, (37, 300), generator=g).to(dtype)
    proj = torch.full((37,), 2.0**-9)
    coef = -(proj * (grad.float() * v.float()).sum(1))
    for scale in (None, 2.5, -0.375):
        want = grad.float() + coef[:, None] * v.float()
        want = (want if scale is None else want * scale).to(dtype)
        got = grad.clone().to(DEVICE)
        project_out_rows_(got, v.to(DEVICE), proj.to(DEVICE), None if scale is None else torch.tensor(scale).to(DEVICE))
        assert torch.equal(got.cpu(), want), scale
    with pytest.raises(ValueError, match="scale must hold one value"):
        project_out_rows_(grad.clone().to(DEVICE), v.to(DEVICE), proj.to(DEVICE), torch.ones(2, device=DEVICE))
    torch.library.opcheck(
        torch.ops.fused_margin.triton_project_out_rows_.default,
        (grad.to(DEVICE), v.to(DEVICE), proj.to(DEVICE), torch.tensor(0.5, device=DEVICE)),
    )


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_project_out_rows_takes_its_coefficient_from_grad(dtype):
    """The Triton projection: grad_i - proj_i (grad_i . v_i) v_i, the dot of grad's rounded values in fp32,
    one rounding; on a mostly radial input the rows end orthogonal to v to the output's rounding; rows with
    proj 0 unchanged (cols not a multiple of the block, rows not of the row block)."""
    from fused_margin.backends.triton.norms import project_out

    g = _gen(12)
    v = torch.randn(37, 300, generator=g).to(dtype)
    grad = (30.0 * v.float() + torch.randn(37, 300, generator=g)).to(dtype)
    norms = v.float().norm(dim=1)
    proj = torch.where(torch.arange(37) % 7 == 3, 0.0, 1.0 / norms**2)
    want = grad.double() - (proj.double() * (grad.double() * v.double()).sum(1))[:, None] * v.double()
    got = project_out(grad.clone().to(DEVICE), v.to(DEVICE), proj.to(DEVICE)).cpu()
    assert torch.equal(got[3], grad[3]) and torch.equal(got[10], grad[10])
    eps = torch.finfo(dtype).eps
    assert (got.double() - want).abs().max() <= 2 * eps * want.abs().max() + 1e-4 * eps * grad.double().abs().max()
    radial = (got.double() * v.double()).sum(1) / norms.double()
    bound = 2 * eps * got.double().norm(dim=1) * 300**0.5 + 8 * 2**-24 * grad.double().norm(dim=1) * 300**0.5
    kept = proj != 0
    assert (radial[kept].abs() <= bound[kept]).all()


_COEXIST_CHECK = """
import torch
ops = torch.ops.fused_margin
assert hasattr(ops, "row_forward") and hasattr(ops, "row_backward")
raw = torch.tensor([[0.3, -0.2, 0.9]], device="{device}")
from fused_margin.core import options
floats, ints = options.vectors()  # every option at its default: plain cross-entropy
out = ops.triton_row_forward(raw, torch.tensor([2], device=raw.device), [None] * 7, floats, ints)
assert abs(out[0].item() - (torch.logsumexp(raw[0], 0) - raw[0, 2]).item()) < 1e-6
"""


def test_ops_coexist_with_the_cxx_extension():
    """The C++ extension defines the namespace with ``TORCH_LIBRARY(fused_margin, m)``; the Triton ops are
    a Python fragment of it. Either import order must leave both op sets usable: Triton first here (this
    module imported it), the extension first in a fresh interpreter."""
    import subprocess
    import sys

    from fused_margin.backends import extension

    if not extension.is_built():
        pytest.skip(f"the C++ extension is not built: {extension.BUILD_ERROR}")
    check = _COEXIST_CHECK.replace("{device}", DEVICE)
    exec(check, {})
    code = "import fused_margin.backends.extension, fused_margin.backends.triton\n" + check
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every ``@triton.jit`` kernel of the package compiles ahead of time for sm_90 with a launch's argument
    types, its PTX free of contracted FMAs, the row kernels' I/O in 16-byte vectors (tests/helpers/sm90_compile.py,
    in a fresh interpreter without TRITON_INTERPRET); prints each variant's registers and spills."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, os.path.join("tests", "helpers", "sm90_compile.py")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
        env=env,
    )
    if result.returncode != 0 and (
        "No module named 'triton" in result.stderr
        or "ptxas" in result.stderr.lower()
        and "not found" in result.stderr.lower()
    ):
        pytest.skip(f"Triton cannot compile for sm_90 here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sm90 compile ok" in result.stdout
    print(result.stdout)


def test_the_fused_path_pads_the_class_stride():
    """What makes the launches above see a row stride divisible by 16: the GEMM writes raw into a buffer with
    the class stride padded (no copy), and the backward's dL/draw gets the same stride."""
    from fused_margin.paths import fused

    x, w = torch.randn(3, 8).to(DEVICE), torch.randn(8142, 8).to(DEVICE)
    raw = fused.class_padded_mm(x, w)
    assert raw.shape == (3, 8142) and raw.stride() == (8144, 1)
    assert_fp32_close("raw", raw, x @ w.t(), rtol=1e-6)
    assert fused.grad_row_stride(raw) == 8144 and fused.grad_row_stride(raw.contiguous()) == 8142
    assert fused.class_padded_mm(x, w[:8000]).is_contiguous()  # already a multiple of 16


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(compile_backend):
    torch._dynamo.reset()
    case = make_case(
        "cosine", B=4, C=13, seed=4, margins=DBM_MARGINS, margin_type="additive_angular", lambda_inst=1.0, offset=True
    )
    x = case["tensors"]["input"].float().to(DEVICE)
    w = case["tensors"]["weight"].float().to(DEVICE)
    margins = case["tensors"]["class_margins"].float().to(DEVICE)
    offset = case["tensors"]["logit_offset"].float().to(DEVICE)
    target = case["target"].to(DEVICE)

    def loss_fn(x, w):
        return fm.margin_cross_entropy(
            x,
            target,
            w,
            class_margins=margins,
            logit_offset=offset,
            scale=30.0,
            margin_type="additive_angular",
            lambda_inst=1.0,
            backend="triton",
        )

    compiled = torch.compile(loss_fn, backend=compile_backend, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        with max_block(4):
            loss = fn(xs, ws)
            results.append((loss, *torch.autograd.grad(loss, [xs, ws])))
    for label, a, b in zip(("loss", "grad_x", "grad_w"), *results):
        assert_fp32_close(label, a, b, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# GPU: larger shapes, no host syncs, inductor


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "name",
    [
        "dbm_hard",
        "dbm_bs_drw",
        "elm_angular_instance",
        "smoothing_weighted_ignored",
        "marc_grads",
        "offset_pair_grads",
        "linear_marc",
        "logits_cosine_dbm",
        "dbm_fold_threshold",
        "reduction_none",
    ],
)
def test_cuda_large_shapes(name, dtype):
    options = dict(CASES[name])
    head = options.pop("head", "cosine")
    options.pop("ignored", None)
    case = make_case(head, B=256, C=8142, D=256, seed=_seed(name), ignored=tuple(range(0, 256, 17)), **options)
    compare(case, dtype=dtype, block=1 << 20)


@pytest.mark.cuda
@pytest.mark.parametrize("num_classes", [2, 1000, 100_003])
def test_cuda_class_counts(num_classes):
    case = make_case(
        "cosine",
        B=64,
        C=num_classes,
        D=128,
        seed=1,
        margins=DBM_MARGINS,
        margin_type="additive_angular",
        lambda_inst=1.0,
        lambda_elm=0.5,
        label_smoothing=0.1,
        weights=True,
        ignored=(3, 7),
    )
    compare(case, block=1 << 20)


@pytest.mark.cuda
def test_cuda_row_kernels_make_no_host_sync():
    raw, target, t = _row_args(B=512, C=8142, dtype=torch.bfloat16)
    options = dict(scale=30.0, margin_type=1, lambda_inst=1.0, lambda_elm=0.5, label_smoothing=0.1)
    args = forward_args(raw, target, t, **options, reduction=1)
    out = ROW_KERNEL.forward(*args)  # compile the kernels outside the check
    proj = dict(row_proj=torch.rand(512, device="cuda"), col_proj=torch.rand(8142, device="cuda"), col_stats=True)
    # the forward that forms the gradient (of the mean: its denominator pass first), and the projection
    # with a device scale (the upstream gradient folded into it)
    both = forward_args(raw.clone(), target, dict(t, pair_perturbation=None), **options, reduction=1) + (None, None)
    grad = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    project = (grad, torch.randn_like(grad), proj["row_proj"], torch.tensor(2.0, device="cuda"))
    backwards = [
        backward_args(raw, target, t, out[1], out[4], out[5], out[0], out[6], **options, scale_grad=scale_grad, **proj)
        for scale_grad in (False, True)
    ]
    for backward in backwards:
        ROW_KERNEL.backward(*backward)
    ROW_KERNEL.norms(raw, 1e-12)
    ROW_KERNEL.forward_backward(*both)
    ROW_KERNEL.project_out(*project)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ROW_KERNEL.forward(*args)
        ROW_KERNEL.norms(raw, 1e-12)
        for backward in backwards:
            ROW_KERNEL.backward(*backward)
        ROW_KERNEL.forward_backward(*both)
        ROW_KERNEL.project_out(*project)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_cuda_inductor_fullgraph():
    torch._dynamo.reset()
    g = _gen(0)
    x = torch.randn(128, 256, generator=g).cuda().requires_grad_()
    w = torch.randn(1000, 256, generator=g).cuda().requires_grad_()
    target = torch.randint(0, 1000, (128,), generator=g).cuda()
    loss_fn = fm.DBMLoss(_counts(1000), variant="bs", backend="triton").cuda()
    compiled = torch.compile(loss_fn, fullgraph=True)
    eager = loss_fn(x, target, weight=w)
    eager_grads = torch.autograd.grad(eager, [x, w])
    loss = compiled(x, target, weight=w)
    grads = torch.autograd.grad(loss, [x, w])
    for label, a, b in zip(("loss", "grad_x", "grad_w"), (loss, *grads), (eager, *eager_grads)):
        assert_fp32_close(label, a, b, rtol=1e-5)
