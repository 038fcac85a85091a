"""The memory-lean path (``fused_margin.paths.lean``) and the class-split contract it runs on
(``fused_margin.core.class_split``), against the reference (docs/loss.md sections 8 and 9).

Chunks of 7 classes put argmax ties, labels, ELM's strongest wrong class and NaNs on chunk boundaries
and in the last, partial chunk; float64 runs must match the reference to rounding, fp32 and bf16 runs are
judged against the float64 truth as the fused kernels are (``kernel_cases``).
"""

import importlib.util
import os

import kernel_cases as kc
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fused_margin import backends
from fused_margin.core import class_split, reference
from fused_margin.core.reference import margin_cross_entropy_reference
from fused_margin.core.spec import LossTables, MarginLossSpec
from fused_margin.paths.lean import auto_chunk, lean_margin_cross_entropy

TRITON_RUNS = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
)


#: the lean path's kernels: eager torch everywhere; Triton where it runs (here: CPU tensors under the
#: interpreter; the device follows the tensors, so a GPU run tests the compiled kernels on CUDA tensors)
def _blocks(name, device_type):
    """Why backend ``name``'s chunk kernels cannot run here (None when they can)."""
    status = backends.get(name).status(device_type, torch.float32, block=True)
    return None if status == "ok" else status


KERNELS = [
    "reference",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs a CUDA GPU, or TRITON_INTERPRET=1 on the CPU"),
    ),
    pytest.param("cpu", marks=pytest.mark.skipif(_blocks("cpu", "cpu") is not None, reason=str(_blocks("cpu", "cpu")))),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not torch.cuda.is_available() or _blocks("cuda", "cuda") is not None,
                reason="the extension was built without its CUDA kernels, or no GPU",
            ),
        ],
    ),
]


def _device(kernel):
    """The device of a kernel's tensors: CUDA for the C++ CUDA ops, and for Triton on a GPU machine (not
    under the interpreter); else the CPU."""
    if kernel == "cuda" or (
        kernel == "triton" and torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        return "cuda"
    return "cpu"


@pytest.fixture(params=KERNELS)
def kernel(request):
    return request.param


def _run(case, impl, dtype, chunk=7, run_dtype=None, kernel="reference"):
    """Loss, lse and the gradients of ``case`` (a ``kernel_cases.make_case``) through ``impl`` ("lean" or
    "reference"), model tensors rounded to ``run_dtype`` (default ``dtype``) and run in ``dtype``; the
    lean path with ``kernel`` (on CUDA tensors for ``"cuda"``); the outputs come back on the CPU."""
    run_dtype = dtype if run_dtype is None else run_dtype
    device = _device(kernel) if impl == "lean" else "cpu"
    leaves = {}
    for name, master in case["tensors"].items():
        value = master.to(run_dtype) if name in kc.MODEL_TENSORS else master.float()
        if dtype == torch.float64:
            value = value.double()
        leaves[name] = value.to(device).requires_grad_(name in case["grads"])
    kwargs = dict(leaves)
    x, w, b = kwargs.pop("input"), kwargs.pop("weight", None), kwargs.pop("bias", None)
    options = dict(case["options"])
    options.setdefault("head", "logits")
    spec, tables = MarginLossSpec(**options), LossTables(**kwargs)
    if impl == "reference":
        loss, (lse, pred, hard) = margin_cross_entropy_reference(x, case["target"], w, b, spec, tables)
    else:
        loss, lse, pred, hard = lean_margin_cross_entropy(
            x, case["target"].to(device), w, b, spec, tables, chunk, kernel=kernel
        )
    upstream = torch.ones_like(loss) if loss.dim() == 0 else kc._upstream(loss.shape[0]).to(loss)
    grads = torch.autograd.grad(loss, [leaves[n] for n in case["grads"]], upstream)
    out = {"loss": loss.detach(), "lse": lse, "pred": pred, "hard": hard}
    out.update({f"grad_{n}": g for n, g in zip(case["grads"], grads)})
    return {k: v.cpu() for k, v in out.items()}


def _case(name):
    return kc.make_case(**kc.CASES[name], seed=kc._seed(name, 1000))


def _numeric_keys(out):
    return [k for k in out if k.startswith("grad_") or k in ("loss", "lse")]


@pytest.mark.parametrize("chunk", [1, 7, 2048])
@pytest.mark.parametrize("name", sorted(kc.CASES))
def test_float64_matches_reference(name, chunk):
    case = _case(name)
    truth = _run(case, "reference", torch.float64)
    got = _run(case, "lean", torch.float64, chunk)
    for key in _numeric_keys(truth):
        torch.testing.assert_close(got[key], truth[key], rtol=1e-11, atol=1e-13, equal_nan=True, msg=key)
    assert torch.equal(got["pred"], truth["pred"]) and torch.equal(got["hard"], truth["hard"])


@pytest.mark.parametrize("name", sorted(kc.CASES))
def test_float32_within_tolerance(name, kernel):
    case = _case(name)
    truth = _run(case, "reference", torch.float64, run_dtype=torch.float32)
    got = _run(case, "lean", torch.float32, kernel=kernel)
    for key in _numeric_keys(truth):
        kc.assert_fp32_close(key, got[key], truth[key])
    kc.assert_pred_hard(got, {**truth, "z": _base_scores(case)}, case, gap=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", kc.LOW_PRECISION_CASES)
def test_bfloat16_within_reference_error(name, kernel):
    opts = dict(kc.CASES[name], B=24, reduction="none")
    case = kc.make_case(**opts, seed=kc._seed(name, 1000))
    truth = _run(case, "reference", torch.float64, run_dtype=torch.bfloat16)
    ref = _run(case, "reference", torch.bfloat16)
    got = _run(case, "lean", torch.bfloat16, kernel=kernel)
    for key in _numeric_keys(truth):
        assert got[key].dtype == ref[key].dtype, key
        kc.assert_within_reference_error(key, got[key], ref[key], truth[key], factor=2.0)


def _assert_close(got, truth, dtype, key):
    """float64 runs to rounding; fp32 runs per docs/loss.md section 8 (NaN and infinities equal)."""
    if dtype == torch.float64:
        torch.testing.assert_close(got, truth, rtol=1e-11, atol=1e-13, equal_nan=True, msg=key)
    else:
        kc.assert_fp32_close(key, got, truth)


def _base_scores(case):
    leaves = {k: v.double() for k, v in case["tensors"].items()}
    options = dict(case["options"])
    options.setdefault("head", "logits")
    spec = MarginLossSpec(head=options["head"], input_is_cosine=options.get("input_is_cosine", False))
    tables = LossTables(omega=leaves.get("omega"), beta=leaves.get("beta"), class_norms=leaves.get("class_norms"))
    return reference.base_scores(leaves["input"], leaves.get("weight"), leaves.get("bias"), spec, tables)


def _logits_case(z, target, **options):
    return {
        "tensors": {"input": z.double()},
        "target": target,
        "grads": ["input"],
        "options": dict(head="logits", input_is_cosine=True, scale=10.0, reduction="none", **options),
    }


def test_ties_labels_and_nans_on_chunk_boundaries(kernel):
    """C = 50 in chunks of 7 (the last holds one class): the maximum tied across a boundary (columns 6 and
    7, 13 and 14), the label on a chunk's last or first column, a NaN in the last chunk, ELM's ``c*`` tied
    across chunks, all against the reference's ``torch.argmax`` order."""
    g = torch.Generator().manual_seed(5)
    z = torch.rand(6, 50, generator=g, dtype=torch.float64) * 0.5
    z[0, 6] = z[0, 7] = 0.9  # tie across chunks 0|1, label elsewhere
    z[1, 13] = z[1, 14] = 0.9  # tie 1|2, label on the second: pred is 13, hard
    z[2, 20] = 0.95  # label 20 = last column of chunk 2 and the max
    z[2, 27] = z[2, 41] = 0.8  # ELM's c*: tie across chunks 3 and 5
    z[3, 49] = float("nan")  # NaN in the last, one-class chunk
    z[4, 0] = z[4, 49] = 0.99  # tie between the first and the last class
    z[5, :] = 0.3  # every class tied
    target = torch.tensor([3, 14, 20, 49, 49, 21])
    options = dict(class_margins=None, margin_type="additive_angular", lambda_inst=1.0, lambda_elm=0.5)
    case = _logits_case(z, target, **{k: v for k, v in options.items() if k != "class_margins"})
    case["tensors"]["class_margins"] = 0.05 + 0.3 * torch.rand(50, generator=g, dtype=torch.float64)
    dtype = torch.float32 if kernel == "triton" else torch.float64  # the Triton kernels take fp32 at most
    truth = _run(case, "reference", torch.float64, run_dtype=dtype)
    got = _run(case, "lean", dtype, chunk=7, kernel=kernel)
    assert got["pred"].tolist() == truth["pred"].tolist() == [6, 13, 20, 49, 0, 0]
    assert torch.equal(got["hard"], truth["hard"])
    for key in _numeric_keys(truth):
        _assert_close(got[key], truth[key], dtype, key)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_inputs_follow_the_reference(value, kernel):
    """A non-finite score in various places: the same ``lse``, ``pred``, loss and gradient NaN pattern
    as the reference (torch.logsumexp / torch.argmax semantics)."""
    g = torch.Generator().manual_seed(9)
    z = torch.randn(5, 23, generator=g, dtype=torch.float64)
    z[0, 3] = value  # off the target
    z[1, 5] = value  # on the target
    z[2, 7:14] = value  # a whole chunk
    z[3, :] = value  # the whole row
    target = torch.tensor([1, 5, 0, 2, 22])
    case = _logits_case(z, target)
    case["options"].update(input_is_cosine=False, scale=1.0)
    dtype = torch.float32 if kernel == "triton" else torch.float64
    truth = _run(case, "reference", torch.float64, run_dtype=dtype)
    got = _run(case, "lean", dtype, chunk=7, kernel=kernel)
    assert torch.equal(got["pred"], truth["pred"])
    for key in _numeric_keys(truth):
        _assert_close(got[key], truth[key], dtype, key)


@pytest.mark.parametrize("margins", [False, True])
def test_confident_rows_as_precise_as_cross_entropy(margins, kernel):
    """Rows whose loss runs from 1e-8 to 1e-2 (docs/loss.md section 8): the fp32 loss and target-column
    gradient no further from the float64 truth than twice ``F.cross_entropy``'s own fp32 error on the
    same final logits, plus 1e-9."""
    C, s = 40, 32.0
    losses = torch.logspace(-8, -2, 13, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    z = torch.rand(len(losses), C, generator=g, dtype=torch.float64) * 0.2
    target = torch.arange(len(losses)) % C
    m = 0.1 if margins else 0.0
    # choose z_y so that the final target logit s (z_y - m) beats the others by the requested loss:
    # nll = log1p(sum_{j != y} exp(l_j - t)), so t = log(sum_j exp(l_j)) - log(expm1(loss))
    others = (s * z).scatter(1, target[:, None], float("-inf"))
    z_y = (torch.logsumexp(others, 1) - torch.log(torch.expm1(losses))) / s + m
    z.scatter_(1, target[:, None], z_y[:, None])
    case = {
        "tensors": {"input": z},
        "target": target,
        "grads": ["input"],
        "options": dict(head="logits", scale=s, reduction="none"),
    }
    if margins:
        case["tensors"]["class_margins"] = torch.full((C,), m, dtype=torch.float64)
    truth = _run(case, "reference", torch.float64, run_dtype=torch.float32)
    got = _run(case, "lean", torch.float32, kernel=kernel)
    # F.cross_entropy on the same fp32 final logits
    logits32 = (s * z.float()).scatter(1, target[:, None], (s * (z.float().gather(1, target[:, None]) - m)))
    logits32.requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(logits32, target, reduction="none")
    (ce_grad,) = torch.autograd.grad(ce, logits32, kc._upstream(len(losses)).float())
    ce_err = (ce.double() - truth["loss"]).abs()
    err = (got["loss"].double() - truth["loss"]).abs()
    assert (err <= 2 * ce_err + 1e-9 * truth["loss"].abs().clamp_min(1) + 1e-16).all(), (err, ce_err)
    # the target column of dL/dz = s dL/dl
    col = lambda t: t.gather(1, target[:, None]).squeeze(1).double()  # noqa: E731
    truth_col = col(truth["grad_input"])
    ce_col_err = (s * col(ce_grad) - truth_col).abs()
    col_err = (col(got["grad_input"]) - truth_col).abs()
    assert (col_err <= 2 * ce_col_err + 1e-9 * truth_col.abs() + 1e-12).all(), (col_err, ce_col_err)
    assert (got["loss"] > 0).all()


def test_no_batch_by_class_tensor_is_allocated(kernel):
    """Forward and backward of a cosine-head DBM-BS case in chunks of 16 classes allocate no tensor of
    B x C elements or more (the gradients themselves are C x D and B x D, below that here)."""
    B, C, D = 32, 300, 8

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = (0, None)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                    self.largest = (t.numel(), str(func))
            return out

    g = torch.Generator().manual_seed(0)
    device = _device(kernel)
    x = torch.randn(B, D, generator=g).to(device).requires_grad_()
    w = torch.randn(C, D, generator=g).to(device).requires_grad_()
    target = torch.randint(0, C, (B,), generator=g).to(device)
    spec = MarginLossSpec(
        head="cosine", scale=30.0, margin_type="additive_angular", lambda_inst=1.0, label_smoothing=0.1
    )
    tables = LossTables(
        class_margins=(torch.rand(C, generator=g) * 0.3).to(device),
        logit_offset=torch.randn(C, generator=g).to(device),
        class_weight=(torch.rand(C, generator=g) + 0.5).to(device),
    )
    with Sizes() as sizes:
        loss, *_ = lean_margin_cross_entropy(x, target, w, None, spec, tables, chunk=16, kernel=kernel)
        loss.backward()
    assert sizes.largest[0] < B * C, sizes.largest
    # and the same case unchunked does allocate B x C (the check can fail)
    with Sizes() as sizes:
        loss, *_ = lean_margin_cross_entropy(x, target, w, None, spec, tables, chunk=C)
        loss.backward()
    assert sizes.largest[0] >= B * C


def test_combine_is_associative_and_order_free():
    """Partials of three blocks merged as (a+b)+c, a+(b+c) and c+(b+a): the same row statistics."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 21, generator=g, dtype=torch.float64)
    z[0, 3] = z[0, 17] = 5.0
    z[1, 9] = float("nan")
    target = torch.randint(0, 21, (8,), generator=g)
    kept = torch.ones(8, dtype=torch.bool)
    spec = MarginLossSpec(head="logits", scale=2.0, label_smoothing=0.1)
    parts = [
        class_split.block_partials(z[:, c0 : c0 + 7], c0, target, kept, spec, track_wrong=True) for c0 in (0, 7, 14)
    ]
    a, b, c = parts
    orders = [
        class_split.combine(class_split.combine(a, b), c),
        class_split.combine(a, class_split.combine(b, c)),
        class_split.combine(c, class_split.combine(b, a)),
    ]
    for other in orders[1:]:
        for name in class_split.Partials._fields:
            torch.testing.assert_close(
                getattr(other, name), getattr(orders[0], name), equal_nan=True, rtol=1e-14, atol=1e-14, msg=name
            )
    assert orders[0].z_arg[0] == 3 and orders[0].z_arg[1] == 9


def test_auto_chunk():
    assert auto_chunk(2048, 65536) % 128 == 0
    assert 128 <= auto_chunk(2048, 65536) < 65536
    assert auto_chunk(4, 50) == 50
    assert auto_chunk(10**6, 10**6) == 128
    # the buffers of one chunk stay within the budget
    chunk = auto_chunk(1024, 1 << 20, budget_bytes=64 << 20)
    assert 1024 * chunk * 4 * 6 <= 64 << 20
