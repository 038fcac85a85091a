"""Smoke tests of the benchmark harness (fused_margin.bench): tiny shapes, a few seconds.

What must hold: a correct fused path is timed and compared with eager and the GEMM floor; a wrong one
(loss, gradient or argmax) is reported WRONG and not timed; the JSON, CSV, table and PNG say so; the
row-kernel route (the loss's keyword arguments) computes the same loss as the preset module.
"""

import csv
import importlib.util
import json
import math
import os
import sys
import types

import pytest
import torch
from row_torch import ROW_KERNEL

import fused_margin as fm
from fused_margin.bench import BenchConfig, format_table, run_benchmark, write_outputs
from fused_margin.bench.cases import (
    class_counts,
    make_inputs,
    reference_fn,
    reference_rows_fn,
    row_kernel_fns,
    tie_options,
)
from fused_margin.bench.check import Outputs, Truth, build_truth, judge, run_outputs
from fused_margin.bench.cli import build_parser, main
from fused_margin.bench.config import LOSSES
from fused_margin.bench.runner import FIELDS
from fused_margin.paths.fused import RowKernel


def _wrong_loss(*args):
    loss, lse, pred, hard, nll, target_grad, denom = ROW_KERNEL.forward(*args)
    return loss * 1.01, lse, pred, hard, nll, target_grad, denom


def _wrong_grad(*args):
    grad, row_coef, col_coef, stats = ROW_KERNEL.backward(*args)
    return grad * 1.05, row_coef, col_coef, stats


def _wrong_pred(*args):
    loss, lse, pred, hard, nll, target_grad, denom = ROW_KERNEL.forward(*args)
    return loss, lse, (pred + 1) % args[0].shape[1], hard, nll, target_grad, denom


WRONG = {
    "wrong-loss": RowKernel("wrong-loss", _wrong_loss, ROW_KERNEL.backward, ROW_KERNEL.norms),
    "wrong-grad": RowKernel("wrong-grad", ROW_KERNEL.forward, _wrong_grad, ROW_KERNEL.norms),
    "wrong-pred": RowKernel("wrong-pred", _wrong_pred, ROW_KERNEL.backward, ROW_KERNEL.norms),
}
QUICK = dict(
    device="cpu",
    B=16,
    D=32,
    C=64,
    dtype="fp32",
    target_time=0.0,
    min_reps=2,
    max_reps=2,
    warmup=1,
    input_sets=2,
    compile="none",
    threads=1,
)


@pytest.fixture(scope="module")
def run():
    cfg = BenchConfig(
        **QUICK,
        modes=("fwdbwd",),
        losses=("dbm-bs",),
        heads=("cosine",),
        impls=("reference", "torch-ce", "floor"),
        row_kernels={"torch": ROW_KERNEL, **WRONG},
    )
    return run_benchmark(cfg, progress=False, log=lambda _: None)


def _row(run, backend):
    rows = [r for r in run.rows if r["backend"] == backend]
    assert len(rows) == 1, rows
    return rows[0]


def test_correct_cases_are_timed_and_compared(run):
    ref, fused, floor = _row(run, "reference"), _row(run, "row:torch"), _row(run, "floor")
    for r in (ref, fused):
        assert r["check"] == "ok", r["check_detail"]
        assert r["ms"] > 0 and r["reps"] == 2 and r["peak_extra_mib"] is not None
        assert r["err_loss"] <= r["tol_loss"] and r["err_grad_weight"] <= r["tol_grad_weight"]
        assert r["pred_mismatch"] == 0
    assert ref["speedup_vs_eager"] == pytest.approx(1.0)
    assert fused["speedup_vs_eager"] == pytest.approx(ref["ms"] / fused["ms"])
    assert fused["x_gemm_floor"] == pytest.approx(fused["ms"] / floor["ms"])
    assert floor["check"] == "n/a" and floor["speedup_vs_eager"] is None
    ce = _row(run, "torch-ce")
    assert ce["kind"] == "plain-ce" and ce["check"] == "ok" and "F.cross_entropy" in ce["check_detail"]


@pytest.mark.parametrize(
    "name, says",
    [("wrong-loss", "loss rel err"), ("wrong-grad", "grad_input rel err"), ("wrong-pred", "pred/hard differ")],
)
def test_wrong_kernels_are_reported_wrong_and_not_timed(run, name, says):
    r = _row(run, f"row:{name}")
    assert r["check"] == "WRONG"
    assert says in r["check_detail"]
    assert r["ms"] is None and r["speedup_vs_eager"] is None and r["peak_extra_mib"] is None


def test_table_json_csv_png(run, tmp_path):
    table = format_table(run)
    lines = {line.split()[1]: line for line in table.splitlines() if line.startswith("dbm-bs/cosine")}
    assert "WRONG" in lines["row:wrong-loss"] and "ok" in lines["row:torch"]
    assert lines["row:wrong-loss"].split()[3] == "-"  # no time for a wrong case
    assert "not timed or failed:" in table and "B=16 D=32 C=64 fp32" in table

    paths = write_outputs(run, tmp_path, plot=True)
    data = json.loads(paths["json"].read_text())
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["name"]
    assert data["config"]["row_kernels"] == sorted(["torch", *WRONG])
    assert [r["backend"] for r in data["rows"]] == [r["backend"] for r in run.rows]
    wrong = next(r for r in data["rows"] if r["backend"] == "row:wrong-grad")
    assert wrong["check"] == "WRONG" and wrong["ms"] is None

    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert set(FIELDS) | {"machine", "torch", "triton"} <= set(rows[0])
    by_backend = {r["backend"]: r for r in rows}
    assert by_backend["row:wrong-pred"]["ms"] == "" and by_backend["row:wrong-pred"]["check"] == "WRONG"
    assert math.isclose(float(by_backend["row:torch"]["ms"]), _row(run, "row:torch")["ms"])
    assert by_backend["floor"]["machine"] == run.machine["name"]
    assert paths["table"].read_text().strip() == table.strip()
    if importlib.util.find_spec("matplotlib") is None:  # the plot is skipped with a note, the rest written
        assert "png" not in paths
    else:
        assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_judge_rule():
    truth_out = Outputs(
        torch.tensor(2.0, dtype=torch.float64),
        torch.ones(4, 3, dtype=torch.float64),
        torch.ones(5, 3, dtype=torch.float64),
    )
    truth = Truth(truth_out, {"loss": 1e-3, "grad_input": 1e-3, "grad_weight": 1e-3}, torch.bfloat16, ())

    def out(loss, gx, gw):
        return Outputs(torch.tensor(loss), torch.full((4, 3), gx), torch.full((5, 3), gw))

    assert judge(out(2.0 * (1 + 2.5e-3), 1.0, 1.0), truth).ok  # within 2 * 1e-3 + 1e-3
    verdict = judge(out(2.0, 1.0, 1.0 + 4e-3), truth)  # beyond it
    assert not verdict.ok and "grad_weight" in verdict.detail
    assert not judge(out(float("nan"), 1.0, 1.0), truth).ok


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_gate(dtype):
    """In bf16/fp16 the torch row double (same math as eager, other rounding) passes, with its ties
    ignored; a kernel 3% off in the loss or 5% off in the gradients does not."""
    cfg = BenchConfig(**{**QUICK, "B": 48, "dtype": dtype})
    counts = class_counts(cfg)
    s = make_inputs(cfg, counts, 0)
    truth = build_truth(
        *reference_fn("dbm-bs", "cosine", counts, "cpu"),
        reference_rows_fn("dbm-bs", "cosine", counts, "cpu"),
        "cosine",
        s.X.detach(),
        s.W.detach(),
        s.y,
        **tie_options("dbm-bs", counts, cfg.C, "cosine"),
    )
    kwargs = LOSSES["dbm-bs"].kwargs(counts, cfg.C, "cosine")

    def verdict(kernel):
        return judge(run_outputs(row_kernel_fns(kernel, kwargs)[1], *truth.inputs, True), truth)

    assert verdict(ROW_KERNEL).ok, verdict(ROW_KERNEL).detail
    off_loss = RowKernel(
        "x",
        lambda *a: (ROW_KERNEL.forward(*a)[0] * 1.03,) + ROW_KERNEL.forward(*a)[1:],
        ROW_KERNEL.backward,
        ROW_KERNEL.norms,
    )
    assert "loss rel err" in verdict(off_loss).detail and not verdict(off_loss).ok
    assert not verdict(WRONG["wrong-grad"]).ok


@pytest.mark.parametrize("loss, head", [(loss, head) for loss, d in LOSSES.items() for head in d.heads])
def test_row_kernel_route_is_the_preset_loss(loss, head):
    """The keyword arguments that feed a bare RowKernel give exactly the preset module's loss: float64
    tables against the module in float64, float32 tables against the module's float32 buffers."""
    gen = torch.Generator().manual_seed(1)
    counts = fm.long_tailed_counts(40, n_max=100, imbalance=50.0)
    X = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    W = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 40, (12,), generator=gen)
    d = LOSSES[loss]
    via_module = d.module(counts, head, "reference").double()(X, y, W)
    via_kwargs = fm.margin_cross_entropy(
        X, y, W, backend="reference", **d.kwargs(counts, 40, head, dtype=torch.float64)
    )
    assert torch.allclose(via_module, via_kwargs, rtol=1e-12, atol=0)
    X, W = X.float(), W.float()
    via_module = d.module(counts, head, "reference")(X, y, W)
    via_kwargs = fm.margin_cross_entropy(X, y, W, backend="reference", **d.kwargs(counts, 40, head))
    assert torch.equal(via_module, via_kwargs)


@pytest.mark.parametrize("loss", [name for name, d in LOSSES.items() if "linear" in d.heads])
def test_linear_head_cases_use_the_scale_a_linear_head_trains_with(loss):
    """s = 30 on unnormalised logits made most exps denormal (and the eager row slow)."""
    counts = fm.long_tailed_counts(40, n_max=100, imbalance=50.0)
    assert LOSSES[loss].kwargs(counts, 40, "linear")["scale"] == 1.0
    assert LOSSES[loss].module(counts, "linear", "reference").options["scale"] == 1.0
    if "cosine" in LOSSES[loss].heads:
        assert LOSSES[loss].kwargs(counts, 40, "cosine")["scale"] == 30.0


def test_cli_list_help_and_run(tmp_path, capsys, monkeypatch):
    assert main(["--list", "--device", "cpu"]) == 0
    listed = capsys.readouterr().out
    for word in (
        "inat",
        "imagenet-lt",
        "face",
        "vocab",
        "dbm-ce",
        "dbm-bs",
        "ldam",
        "elm",
        "arcface",
        "floor",
        "fwdbwd",
    ):
        assert word in listed
    assert "reference" in listed and "-> ok" in listed
    helptext = build_parser().format_help()
    for option in ("--preset", "--B", "--dtype", "--mode", "--losses", "--backends", "--row-kernel", "--out"):
        assert option in helptext

    out = tmp_path / "cli"
    monkeypatch.setitem(sys.modules, "bench_test_kernels", types.SimpleNamespace(WRONG_GRAD=WRONG["wrong-grad"]))
    argv = [
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--losses",
        "ldam",
        "--heads",
        "linear",
        "--mode",
        "fwd,bwd",
        "--backends",
        "reference,floor",
        "--row-kernel",
        "wrong=bench_test_kernels:WRONG_GRAD",
        "--target-time",
        "0",
        "--min-reps",
        "1",
        "--max-reps",
        "1",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--quiet",
        "--no-plot",
        "--out",
        str(out),
    ]
    assert main(argv) == 1  # a WRONG case fails the run
    printed = capsys.readouterr().out
    assert "ldam/linear" in printed and "WRONG" in printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["backend"], r["mode"]) for r in rows} >= {
        ("reference", "fwd"),
        ("reference", "bwd"),
        ("floor", "fwd"),
        ("floor", "bwd"),
    }
    assert all(r["check"] == "WRONG" for r in rows if r["backend"] == "row:wrong")


def test_lean_row_and_class_chunk_option(tmp_path, capsys):
    """The lean row runs, is checked and says its chunk; --class-chunk N puts the fused rows on the lean
    path (their note says so); the face presets and the option are in --help/--list."""
    helptext = build_parser().format_help()
    assert "--class-chunk" in helptext and "lean" in helptext
    assert main(["--list", "--device", "cpu"]) == 0
    listed = capsys.readouterr().out
    assert "face-1m" in listed and "lean" in listed
    out = tmp_path / "lean"
    argv = [
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--losses",
        "dbm-bs",
        "--heads",
        "cosine",
        "--mode",
        "fwdbwd",
        "--backends",
        "reference,cpu,lean",
        "--class-chunk",
        "24",
        "--target-time",
        "0",
        "--min-reps",
        "1",
        "--max-reps",
        "1",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--quiet",
        "--no-plot",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    rows = {r["backend"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["lean"]["check"] == "ok" and "class chunks of 64" in rows["lean"]["note"]
    if rows["cpu"]["check"] != "skipped":
        assert rows["cpu"]["check"] == "ok" and "lean path (class_chunk=24" in rows["cpu"]["note"]
    with pytest.raises(SystemExit):
        main(argv[:-2] + ["--class-chunk", "many", "--out", str(out)])


def test_large_vocabulary_check_takes_the_chunked_reference(monkeypatch):
    """Past CHUNKED_TRUTH_BYTES of float64 class weights (face-1m) the check's references run the
    reference backend over class chunks: the same verdicts (a right case ok, a wrong one WRONG), and
    the float64 base scores built in class blocks equal the one-GEMM ones."""
    from fused_margin.bench import cases as cases_mod
    from fused_margin.bench.check import base_scores64

    assert cases_mod.truth_class_chunk(64, 1 << 20, 512) is not None
    assert cases_mod.truth_class_chunk(256, 8142, 512) is None
    built = []
    original = cases_mod._reference_module

    def spy(loss, head, counts, device, class_chunk):
        built.append(class_chunk)
        return original(loss, head, counts, device, class_chunk)

    monkeypatch.setattr(cases_mod, "CHUNKED_TRUTH_BYTES", 0)
    monkeypatch.setattr(cases_mod, "_reference_module", spy)
    cfg = BenchConfig(
        **QUICK,
        modes=("fwdbwd",),
        losses=("dbm-bs",),
        heads=("cosine",),
        impls=("floor",),
        row_kernels={"torch": ROW_KERNEL, "wrong-grad": WRONG["wrong-grad"]},
    )
    result = run_benchmark(cfg, progress=False, log=lambda _: None)
    assert built and all(isinstance(k, int) and 1 <= k for k in built), built
    assert _row(result, "row:torch")["check"] == "ok" and _row(result, "row:wrong-grad")["check"] == "WRONG"
    g = torch.Generator().manual_seed(0)
    X, W = torch.randn(5, 7, generator=g), torch.randn(3 * (1 << 24) // 7 // 1000 + 9, 7, generator=g)
    plain = torch.nn.functional.normalize(X.double(), dim=1) @ torch.nn.functional.normalize(W.double(), dim=1).t()
    assert torch.equal(base_scores64(X, W, "cosine"), plain)


_STOPPED_RUN = """
import os, signal, sys, types
sys.path.insert(0, TESTS)  # row_torch, the row-kernel contract in eager torch (a test double)
from fused_margin.bench.cli import main
from fused_margin.paths.fused import RowKernel
from row_torch import ROW_KERNEL

def forward(*args):  # a time limit's SIGTERM arriving in the middle of a case
    os.kill(os.getpid(), signal.SIGTERM)
    return ROW_KERNEL.forward(*args)

sys.modules["stop_kernels"] = types.SimpleNamespace(STOP=RowKernel("stop", forward, ROW_KERNEL.backward,
                                                                   ROW_KERNEL.norms))
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_stopped_by_sigterm_writes_what_it_measured(tmp_path):
    """SIGTERM (a time limit, e.g. scripts/gpu_check.sh's) stops the run as Ctrl-C does: exit 130, and the
    table and JSON hold the cases measured before the stop (the floor runs first), marked interrupted."""
    import subprocess

    out = tmp_path / "stopped"
    argv = [
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--losses",
        "ldam",
        "--heads",
        "linear",
        "--mode",
        "fwdbwd",
        "--backends",
        "reference,floor",
        "--row-kernel",
        "stop=stop_kernels:STOP",
        "--target-time",
        "0",
        "--min-reps",
        "1",
        "--max-reps",
        "1",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--quiet",
        "--no-plot",
        "--out",
        str(out),
    ]
    helpers = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")
    code = _STOPPED_RUN.replace("TESTS", repr(helpers))
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr[-2000:]
    payload = json.loads((out / "results.json").read_text())
    assert payload["interrupted"] is True
    measured = {r["backend"]: r for r in payload["rows"]}
    assert measured["floor"]["ms"] > 0 and measured["reference"]["check"] == "ok"
    assert "row:stop" not in measured or measured["row:stop"]["ms"] is None
    assert "INTERRUPTED" in (out / "table.txt").read_text()


def test_gpu_check_script_parses_and_names_its_arguments():
    """scripts/gpu_check.sh (the GPU check) is valid bash and refuses a call without its output folder or
    with a bad budget, saying so (its phases are rehearsed with --dry-run; see the README)."""
    import pathlib
    import subprocess

    script = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr
    done = subprocess.run(["bash", str(script), "/tmp/unused-gpu-check", "soon"], capture_output=True, text=True)
    assert done.returncode == 2 and "BUDGET_SECONDS" in done.stderr


def test_profile_step_runs_a_backend_with_and_without_the_gradient_in_the_forward(capsys):
    """scripts/profile_step.py (the GPU check's profile phase): ``NAME/separate`` profiles the same step with
    the separate row backward (the grad_in_forward switch off, restored afterwards); a bad variant is named and
    the others still run (exit 1)."""
    import importlib.util
    import pathlib

    from fused_margin import backends
    from fused_margin.config import CONFIG

    if backends.available_backends("cpu")["cpu"] != "ok":
        pytest.skip("the C++ extension is not built")
    path = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "profile_step.py"
    spec = importlib.util.spec_from_file_location("profile_step", path)
    profile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_step)
    assert (
        profile_step.main(
            ["--preset", "tiny", "--steps", "1", "--rows", "2", "--device", "cpu", "--backends", "cpu,cpu/separate"]
        )
        == 0
    )
    assert CONFIG.grad_in_forward
    blocks = capsys.readouterr().out.split("== ")
    together = next(b for b in blocks if b.startswith("dbm-bs/cosine backend=cpu "))
    separate = next(b for b in blocks if b.startswith("dbm-bs/cosine backend=cpu/separate "))
    assert "fused_margin.row_forward_backward" in together and "fused_margin.row_backward" not in together
    assert "fused_margin.row_backward" in separate and "fused_margin.row_forward_backward" not in separate
    assert (
        profile_step.main(
            ["--preset", "tiny", "--steps", "1", "--rows", "2", "--device", "cpu", "--backends", "cpu/twice,cpu"]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "a backend is NAME or NAME/separate, got 'cpu/twice'" in out and "backend=cpu B=" in out


def test_rounds_retime_every_case_and_take_the_median_of_each_rounds_ratio():
    """--rounds N: every timed row is timed N times (the floor and the cases in one order each round); its ms
    is the median of the rounds' medians and its ratios the medians of each round's own ratio."""
    import statistics

    cfg = BenchConfig(
        **{**QUICK, "input_sets": 1},
        modes=("fwdbwd", "fwd"),
        losses=("ldam",),
        heads=("linear",),
        impls=("reference", "floor"),
        row_kernels={"torch": ROW_KERNEL},
        rounds=3,
    )
    rows = run_benchmark(cfg, progress=False, log=lambda _: None).rows
    timed = [r for r in rows if r["ms"] is not None]
    assert {(r["backend"], r["mode"]) for r in timed} == {
        (b, m) for b in ("floor", "reference", "row:torch") for m in ("fwdbwd", "fwd")
    }
    floor = {r["mode"]: r for r in timed if r["backend"] == "floor"}
    eager = {r["mode"]: r for r in timed if r["backend"] == "reference"}
    for r in timed:
        assert r["rounds"] == 3 and len(r["round_ms"]) == 3 and all(t > 0 for t in r["round_ms"])
        assert r["ms"] == statistics.median(r["round_ms"])
        per_round = [a / b for a, b in zip(r["round_ms"], floor[r["mode"]]["round_ms"])]
        assert r["x_gemm_floor"] == pytest.approx(statistics.median(per_round))
        if r["backend"] == "row:torch":
            speedups = [b / a for a, b in zip(r["round_ms"], eager[r["mode"]]["round_ms"])]
            assert r["speedup_vs_eager"] == pytest.approx(statistics.median(speedups))
    with pytest.raises(ValueError, match="rounds"):
        BenchConfig(**QUICK, rounds=0).validate()


def test_sharded_sampling_benchmark_runs_every_rate_on_spawned_ranks(tmp_path, capsys):
    """``python -m fused_margin.bench.sharded``: every rate in fresh gloo ranks, the kept classes a rank as the
    sampling rule gives them, a time and a peak memory for each; bad arguments named."""
    from fused_margin.bench import sharded

    out = tmp_path / "sharded.json"
    assert (
        sharded.main(["--preset", "small", "--C", "3000", "--D", "16", "--B", "8", "--steps", "1", "--json", str(out)])
        == 0
    )
    table = capsys.readouterr().out
    assert "| 1 | 1,500 / 1,500 |" in table and "| 0.1 | 150 / 150 |" in table
    record = json.loads(out.read_text())
    assert [r["rate"] for r in record["results"]] == [1.0, 0.1]
    for result in record["results"]:
        assert result["ms"] > 0 and len(result["ranks"]) == 2
        assert all(q["peak_mib"] >= q["set_up_mib"] > 0 for q in result["ranks"])
    for argv, says in ((["--rates", "0"], "sample_rate must be in"), (["--B", "3"], "multiple of --world")):
        with pytest.raises(SystemExit):
            sharded.parse_args(argv)
        assert says in capsys.readouterr().err
