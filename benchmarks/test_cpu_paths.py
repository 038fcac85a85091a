"""pytest-benchmark timings of the CPU paths (forward + backward), each gated by the harness's
correctness check against the float64 reference first.

    PYTHONPATH=. .venv/bin/python -m pytest benchmarks/test_cpu_paths.py --benchmark-columns=median,iqr,rounds

Paths: the eager reference, the C++ CPU kernel (``backend="cpu"``, skipped with the reason where the
extension is not built), the eager-torch row kernel through the fused autograd plumbing (the contract's
test double: it shows what the plumbing costs around a row kernel) and the three-GEMM floor. The full
comparison, with torch.compile, memory and plots, is ``python -m fused_margin.bench``.
"""

import pytest
import torch
from row_torch import ROW_KERNEL

import fused_margin as fm
from fused_margin.bench.cases import (
    InputSet,
    class_counts,
    make_inputs,
    reference_fn,
    reference_rows_fn,
    row_kernel_fns,
    tie_options,
)
from fused_margin.bench.check import build_truth, judge, run_outputs
from fused_margin.bench.config import LOSSES, BenchConfig
from fused_margin.bench.measure import Op

CFG = BenchConfig(device="cpu", B=128, D=256, C=4096, dtype="fp32")
GROUPS = [("dbm-bs", "cosine"), ("ldam", "linear")]


@pytest.fixture(scope="module")
def counts():
    return class_counts(CFG)


@pytest.fixture(scope="module")
def inputs(counts) -> InputSet:
    return make_inputs(CFG, counts, 0)


def _fn(impl, loss, head, counts):
    if impl == "reference":
        return reference_fn(loss, head, counts, "cpu")
    if impl == "cpu":
        status = fm.available_backends(torch.device("cpu"), torch.float32)["cpu"]
        if status != "ok":
            pytest.skip(f"backend 'cpu': {status}")
        module = LOSSES[loss].module(counts, head, "cpu")
        return (lambda X, W, y: module(X, y, W)), (lambda X, W, y: module(X, y, W, return_aux=True))
    return row_kernel_fns(ROW_KERNEL, LOSSES[loss].kwargs(counts, CFG.C, head))


@pytest.mark.parametrize("impl", ["reference", "cpu", "row-torch"])
@pytest.mark.parametrize("loss, head", GROUPS, ids=[f"{loss}-{head}" for loss, head in GROUPS])
def test_fwdbwd(benchmark, impl, loss, head, counts, inputs):
    fn, fn_aux = _fn(impl, loss, head, counts)
    ref, ref_aux = reference_fn(loss, head, counts, "cpu")
    rows = reference_rows_fn(loss, head, counts, "cpu")
    truth = build_truth(
        ref,
        ref_aux,
        rows,
        head,
        inputs.X.detach(),
        inputs.W.detach(),
        inputs.y,
        **tie_options(loss, counts, CFG.C, head),
    )
    verdict = judge(run_outputs(fn_aux, *truth.inputs, True), truth)
    assert verdict.ok, f"{impl} {loss}/{head} is WRONG: {verdict.detail}"
    benchmark.group = f"{loss}/{head} fwdbwd B={CFG.B} D={CFG.D} C={CFG.C}"
    op = Op("fwdbwd", [inputs], fn)
    benchmark.pedantic(lambda: op.run(0, None), rounds=5, warmup_rounds=1)


def test_gemm_floor(benchmark, inputs):
    grads = [torch.randn(CFG.B, CFG.C)]
    op = Op("fwdbwd", [inputs], None, grads)
    benchmark.group = f"gemm floor fwdbwd B={CFG.B} D={CFG.D} C={CFG.C}"
    out = op.run(0, None)
    assert [tuple(t.shape) for t in out] == [(CFG.B, CFG.C), (CFG.B, CFG.D), (CFG.C, CFG.D)]
    benchmark.pedantic(lambda: op.run(0, None), rounds=5, warmup_rounds=1)
