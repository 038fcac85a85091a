"""The fused path's op budget: what one forward + backward dispatches, counted by a ``TorchDispatchMode``.

On a GPU every dispatched op is at least one kernel launch (a few microseconds each, plus host dispatch),
and at the iNaturalist shape the three GEMMs take about as long as a few dozen launches. So the fused
path is held to a budget here, on CPU tensors (the cpu backend; Triton under the interpreter): every op
below the autograd layer is counted (views excluded, the autograd engine's gradient seed included), and
the ops that read or write a B x C or C x D tensor are named.

Inside our own ops, the launches are: C++ CPU, one parallel region each (no device launches); CUDA,
row_forward 2 (the row kernel, the reduction), row_backward 1 or 2 (+ the sums kernel when the
projections or column sums are asked for), row_norms 1; Triton the same.
"""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_margin as fm
from fused_margin import backends
from fused_margin.config import CONFIG

#: ops that only re-view memory (no kernel on any device)
VIEWS = {
    "view",
    "_unsafe_view",
    "t",
    "transpose",
    "expand",
    "as_strided",
    "detach",
    "alias",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "permute",
    "reshape",
    "_reshape_alias",
    "lift_fresh",
}
#: allocations: no kernel on any device (the caching allocator), so outside the budget; the fused path's
#: only one is the padded B x C buffer of the GEMM output (fused.class_padded_mm)
ALLOCATIONS = {"empty", "new_empty", "empty_strided", "empty_like"}
#: the budget of one forward + backward (the issue's target: at most 12 device ops, 3 of them GEMMs)
BUDGET = 12

B, D, C = 64, 96, 1000  # B x C, C x D and B x D all differ in size


class OpLog(TorchDispatchMode):
    """Every dispatched op (the overload packet's name) and the largest tensor it reads or writes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in VIEWS and name not in ALLOCATIONS:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.ops.append((f"{func.namespace}.{name}", max((t.numel() for t in tensors), default=0)))
        return out


def _backends():
    out = []
    for name in ("cpu", "triton"):
        status = backends.available_backends("cpu")[name]
        out.append(pytest.param(name, marks=pytest.mark.skipif(status != "ok", reason=status)))
    return out


def _case(name, backend):
    """``(step, learnable)``: one forward + backward of a preset, with fresh gradients each call."""
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 500, (C,), generator=g)
    x = torch.randn(B, D, generator=g, requires_grad=True)
    w = torch.randn(C, D, generator=g, requires_grad=True)
    y = torch.randint(0, C, (B,), generator=g)
    y[3] = -100
    learnable = [x, w]
    if name == "dbm-bs":
        module = fm.DBMLoss(class_counts=counts, variant="bs", backend=backend, class_chunk="off")
        call = lambda: module(x, y, w)  # noqa: E731
    elif name == "ldam-linear-bias":
        bias = torch.zeros(C, requires_grad=True)
        learnable.append(bias)
        module = fm.LDAMLoss(class_counts=counts, feature_head="linear", backend=backend, class_chunk="off")
        call = lambda: module(x, y, w, bias=bias)  # noqa: E731
    else:  # MARC: a frozen linear classifier, trainable omega and beta
        w.requires_grad_(False)
        omega = torch.ones(C, requires_grad=True)
        beta = torch.zeros(C, requires_grad=True)
        learnable = [x, omega, beta]
        call = lambda: fm.margin_cross_entropy(
            x,
            y,
            w,
            head="linear",
            omega=omega,
            beta=beta,  # noqa: E731
            backend=backend,
            class_chunk="off",
        )

    def step():
        for t in learnable:
            t.grad = None
        call().backward()

    return step, learnable


def _log(name, backend):
    step, learnable = _case(name, backend)
    step()  # first call: table checks, compilation (Triton), warm caches
    with OpLog() as log:
        step()
    assert all(t.grad is not None for t in learnable)
    return log.ops


CASES = ("dbm-bs", "ldam-linear-bias", "marc-omega-beta")


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("backend", _backends())
def test_one_step_dispatches_at_most_the_budget(backend, name):
    ops = _log(name, backend)
    counts = collections.Counter(op for op, _ in ops)
    gemms = counts["aten.mm"] + counts["aten.addmm"]
    assert len(ops) <= BUDGET, f"{len(ops)} ops > {BUDGET}: {sorted(counts.items())}"
    assert gemms == (2 if name == "marc-omega-beta" else 3), counts  # MARC's W is frozen: no dW GEMM
    print(f"{backend} {name}: {len(ops)} ops: {dict(counts)}")


def _big(ops):
    """The ops that read or write a tensor of at least min(B C, C D) elements."""
    return collections.Counter(op for op, size in ops if size >= min(B * C, C * D))


@pytest.mark.parametrize("backend", _backends())
def test_only_the_gemms_the_row_kernels_and_the_norms_touch_big_tensors(backend):
    """DBM-BS (cosine head): besides the three GEMMs and the two row kernels, one norm pass reads W and one
    in-place op applies the normalisation's projection to dW (``project_out_rows_``, C++ or Triton, which
    forms its coefficient from dW itself); no other op touches B x C or C x D."""
    prefix = "fused_margin.triton_" if backend == "triton" else "fused_margin."
    project = "fused_margin.project_out_rows_" if backend == "cpu" else "fused_margin.triton_project_out_rows_"
    # the forward forms dL/draw (row_forward_backward, C++ and Triton): one row op instead of two
    want = {"aten.mm": 3, prefix + "row_forward_backward": 1, prefix + "row_norms": 1, project: 1}
    assert _big(_log("dbm-bs", backend)) == want


def test_the_cpu_step_needs_one_class_matrix_less_when_the_forward_forms_the_gradient(monkeypatch):
    """With the grad_in_forward switch (the default), the cpu backend's forward writes dL/draw over the GEMM output,
    so a step's peak memory (torch.profiler's allocation events, as the benchmark measures it) is one
    B x C fp32 buffer lower than with the separate row backward, which allocates dL/draw anew."""
    from fused_margin.bench.cases import InputSet
    from fused_margin.bench.measure import Op, peak_extra_mib
    from fused_margin.paths import fused

    if backends.available_backends("cpu")["cpu"] != "ok":
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(0)
    module = fm.DBMLoss(
        class_counts=torch.randint(1, 500, (C,), generator=g), variant="bs", backend="cpu", class_chunk="off"
    )
    inputs = [
        InputSet(
            torch.randn(B, D, generator=g, requires_grad=True),
            torch.randn(C, D, generator=g, requires_grad=True),
            torch.randint(0, C, (B,), generator=g),
        )
    ]
    op = Op("fwdbwd", inputs, lambda x, w, y: module(x, y, w))
    peaks = {}
    for flag in (True, False):
        monkeypatch.setattr(CONFIG, "grad_in_forward", flag)
        op.run(0, None)  # warm: table checks
        peaks[flag] = peak_extra_mib(op, torch.device("cpu"))
    class_matrix = B * fused.padded_classes(C) * 4 / 2**20
    assert peaks[False] - peaks[True] == pytest.approx(class_matrix, rel=0.05), peaks


def test_the_big_tensor_check_sees_an_eager_pass():
    """The check above can fail: the same step with an eager B x C op added is caught."""
    step, _ = _case("dbm-bs", "cpu" if backends.available_backends("cpu")["cpu"] == "ok" else "reference")
    with OpLog() as log:
        step()
        torch.zeros(B, C).exp_()
    assert _big(log.ops)["aten.exp_"] == 1


@pytest.mark.parametrize("backend", _backends())
def test_module_tables_are_read_once_per_version(backend):
    """A module's tables are checked for NaN/inf once, not every step: the second step dispatches no
    ``isfinite``; changing a table in place (its version counter moves) checks it again."""
    step, _ = _case("dbm-bs", backend)
    step()
    with OpLog() as log:
        step()
    assert not any("isfinite" in op or "abs" in op for op, _ in log.ops), log.ops
    module_table = fm.DBMLoss(class_counts=torch.ones(C), variant="bs", backend=backend).logit_offset
    x, w, y = torch.randn(2, D), torch.randn(C, D), torch.tensor([0, 1])
    fm.margin_cross_entropy(x, y, w, logit_offset=module_table, backend=backend, class_chunk="off")
    module_table[5] = float("nan")
    with pytest.raises(ValueError, match=r"logit_offset must be finite, got logit_offset\[5\] = nan"):
        fm.margin_cross_entropy(x, y, w, logit_offset=module_table, backend=backend, class_chunk="off")


@pytest.mark.parametrize("backend", _backends())
def test_labels_out_of_range_are_named_by_the_row_kernels(backend):
    """The fused row path has no label-check ops of its own: the kernels raise the same ValueError."""
    x, w = torch.randn(3, D), torch.randn(C, D)
    y = torch.tensor([0, C, 1])
    with pytest.raises(ValueError, match=rf"target\[1\] = {C} is out of range: labels must be in \[0, {C}\)"):
        fm.margin_cross_entropy(x, y, w, backend=backend, class_chunk="off")
