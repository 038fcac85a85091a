"""``python -m fused_margin.bench``: the command line of the benchmark harness."""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

import torch

from fused_margin.bench.config import (
    ALL_IMPLS,
    DEFAULT_LOSSES,
    DTYPES,
    IMPL_HELP,
    LOSSES,
    MODE_HELP,
    MODES,
    PRESETS,
    BenchConfig,
)

DESCRIPTION = """\
Benchmark fused_margin's margin losses as a user runs them: every fused backend available here (Triton,
CUDA, the C++ CPU kernel) against the eager pure-PyTorch reference, torch.compile of it, plain-CE
anchors (different loss: eager F.cross_entropy, Liger-Kernel, cut-cross-entropy when installed) and the
three-GEMM floor, on the same shapes and dtype.

Every case is first checked against a float64 reference (loss and gradients to features and class
weights; pred/hard on untied rows): a wrong case is reported WRONG and not timed. Then each mode is
timed (median over repetitions that rotate several input sets; CUDA events on a GPU, perf_counter on
CPU; first call and compile time reported apart) and its peak extra memory measured.

Defaults: with a GPU, the inat preset (B=512 D=2048 C=8142) in bf16 on the losses dbm-ce, dbm-bs,
ldam, elm, arcface, bs, every loss compiled; without one, a small CPU run (B=256 D=512 C=8142, fp32,
losses dbm-bs, ldam, arcface, only the first compiled) of about a minute.

Table columns: ms (median per call), wall ms (GPU: loop wall time per call), vs eager (eager ms / ms for
the same loss and head; plain-CE rows against eager F.cross_entropy), x floor (ms / GEMM floor ms of the
mode), peak MiB (peak memory above what was allocated before the call, outputs included), check (ok,
WRONG, OOM, ERROR, UNCHECKED when the reference itself could not run, n/a for the floor). The exit
status is 1 when a case is WRONG; 130 when the run was stopped early (Ctrl-C, or SIGTERM from a time
limit), after writing the cases measured so far (marked INTERRUPTED). The GEMM floor runs first.

Writes table.txt, results.json, results.csv (with the machine and library versions) and results.png to
--out (default benchmarks/results/<timestamp>)."""

EPILOG = """\
examples:
  python -m fused_margin.bench                                   # the default for this machine
  python -m fused_margin.bench --preset face --dtype bf16 --mode fwd,fwdbwd
  python -m fused_margin.bench --B 1024 --D 512 --C 20000 --losses dbm-bs,arcface --backends reference,triton,floor
  python -m fused_margin.bench --row-kernel mine=my_pkg.kernels:ROW_KERNEL   # a RowKernel under development
  python -m fused_margin.bench --list
"""


def _csv(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_margin.bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="list presets, losses, backends (with their status here), modes and dtypes, then exit",
    )
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available) [auto]")
    shape = p.add_argument_group("shape and dtype")
    shape.add_argument(
        "--preset", choices=sorted(PRESETS), help="named shape (see --list) [inat on a GPU, cpu-small on CPU]"
    )
    shape.add_argument("--B", type=int, help="batch size (overrides the preset)")
    shape.add_argument("--D", type=int, help="feature size (overrides the preset)")
    shape.add_argument("--C", type=int, help="number of classes (overrides the preset)")
    shape.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype [bf16 on a GPU, fp32 on CPU]")
    what = p.add_argument_group("what to run")
    what.add_argument("--mode", default="fwdbwd", help="comma list of " + ", ".join(MODES) + " [fwdbwd]")
    what.add_argument(
        "--losses",
        help="comma list of losses, or 'all' (see --list) [GPU: "
        + ",".join(DEFAULT_LOSSES["cuda"])
        + "; CPU: "
        + ",".join(DEFAULT_LOSSES["cpu"])
        + "]",
    )
    what.add_argument(
        "--heads",
        default="cosine,linear",
        help="comma list of cosine, linear: each loss runs on the requested heads it supports [cosine,linear]",
    )
    what.add_argument(
        "--backends", default="all", help="comma list of implementations, or 'all': " + ", ".join(ALL_IMPLS) + " [all]"
    )
    what.add_argument(
        "--row-kernel",
        action="append",
        default=[],
        metavar="NAME=MODULE:ATTR",
        help="also run a fused_margin.paths.fused.RowKernel (e.g. one under development) through the "
        "fused autograd plumbing; repeatable",
    )
    what.add_argument(
        "--class-chunk",
        default="auto",
        metavar="auto|off|N",
        help="class_chunk of the fused backend rows: 'auto' takes the memory-lean path (class "
        "chunks, no B x C matrix) when a B x C fp32 matrix would exceed 64 MiB, 'off' never, N "
        "always with N classes per chunk; the 'lean' row forces it whatever this says [auto]",
    )
    what.add_argument(
        "--compile",
        choices=("all", "first", "none"),
        help="which losses get a torch.compile case [all on a GPU, first on CPU]",
    )
    what.add_argument(
        "--imbalance",
        type=float,
        default=100.0,
        help="class-count imbalance n_max/n_min of the long-tailed counts behind margins, priors and labels [100]",
    )
    meas = p.add_argument_group("measurement")
    meas.add_argument("--input-sets", type=int, default=3, help="random input sets rotated over repetitions [3]")
    meas.add_argument(
        "--target-time", type=float, help="seconds of timed repetitions per case and mode [0.5 on a GPU, 1.0 on CPU]"
    )
    meas.add_argument("--min-reps", type=int, help="fewest timed repetitions [10 on a GPU, 5 on CPU]")
    meas.add_argument("--max-reps", type=int, help="most timed repetitions [200 on a GPU, 50 on CPU]")
    meas.add_argument(
        "--warmup", type=int, default=3, help="warm-up calls before timing (the first is reported as first_call_s) [3]"
    )
    meas.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="timing sweeps: after the first (checks, timing, memory), every timed case is timed "
        "again ROUNDS-1 times, the floor and the cases in the same order each sweep, so a slow "
        "drift of the machine's speed hits them alike; ms is the median of the sweeps' medians and "
        "'x floor'/'vs eager' the medians of each sweep's own ratios [1]",
    )
    meas.add_argument(
        "--check-rows", type=int, help="rows of the correctness check [all rows while B*C <= 2**24, else fewer]"
    )
    meas.add_argument("--threads", type=int, help="torch CPU threads for the run [torch's default]")
    meas.add_argument("--seed", type=int, default=0, help="random seed [0]")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="output directory [benchmarks/results/<timestamp>]")
    out.add_argument("--no-plot", action="store_true", help="skip the PNG")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _load_row_kernel(spec: str):
    if "=" not in spec or ":" not in spec.split("=", 1)[1]:
        raise SystemExit(f"--row-kernel must be NAME=MODULE:ATTR, got {spec!r}")
    name, target = spec.split("=", 1)
    module, attr = target.split(":", 1)
    kernel = getattr(importlib.import_module(module), attr)
    from fused_margin.paths.fused import RowKernel

    if not isinstance(kernel, RowKernel):
        raise SystemExit(f"--row-kernel {name}: {target} is a {type(kernel).__name__}, not a fused_margin RowKernel")
    return name, kernel


def _class_chunk(value: str):
    value = value.strip()
    if value in ("auto", "off"):
        return value
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"--class-chunk must be auto, off or a positive integer, got {value!r}") from None


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of parsed arguments, with the defaults of this machine filled in."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device.startswith("cuda")
    preset = args.preset or ("inat" if gpu else "cpu-small")
    B, D, C = PRESETS[preset][0]
    B, D, C = args.B or B, args.D or D, args.C or C
    if args.losses in (None, ""):
        losses = DEFAULT_LOSSES["cuda" if gpu else "cpu"]
    elif args.losses == "all":
        losses = tuple(LOSSES)
    else:
        losses = tuple(_csv(args.losses))
    impls = ALL_IMPLS if args.backends == "all" else tuple(_csv(args.backends))
    row_kernels = dict(_load_row_kernel(s) for s in args.row_kernel)
    return BenchConfig(
        device=device,
        B=B,
        D=D,
        C=C,
        dtype=args.dtype or ("bf16" if gpu else "fp32"),
        modes=tuple(_csv(args.mode)),
        losses=losses,
        heads=tuple(_csv(args.heads)),
        impls=impls,
        row_kernels=row_kernels,
        compile=args.compile or ("all" if gpu else "first"),
        imbalance=args.imbalance,
        seed=args.seed,
        input_sets=args.input_sets,
        target_time=args.target_time if args.target_time is not None else (0.5 if gpu else 1.0),
        min_reps=args.min_reps or (10 if gpu else 5),
        max_reps=args.max_reps or (200 if gpu else 50),
        warmup=args.warmup,
        rounds=args.rounds,
        check_rows=args.check_rows,
        threads=args.threads,
        class_chunk=_class_chunk(args.class_chunk),
        preset=preset if not (args.B or args.D or args.C) else None,
    )


def list_everything(device: str, dtype: str) -> str:
    """The text of ``--list``: presets, losses with heads, implementations and their status on this machine."""
    import fused_margin as fm
    from fused_margin.bench.cases import installed

    lines = ["presets (B x D x C):"]
    for name, ((B, D, C), text) in PRESETS.items():
        lines.append(f"  {name:12s} {B:>6d} x {D:>5d} x {C:>7d}   {text}")
    lines += ["", "losses (heads; the first is the loss's natural head):"]
    for name, loss in LOSSES.items():
        lines.append(f"  {name:9s} {','.join(loss.heads):15s} {loss.title}")
    status = fm.available_backends(torch.device(device), DTYPES[dtype])
    lines += ["", f"implementations (--backends; status for {device} {dtype}):"]
    for name in ALL_IMPLS:
        if name in status:
            state = status[name]
        elif name == "liger":
            state = "ok" if installed("liger_kernel") and device.startswith("cuda") else "needs liger-kernel and CUDA"
        elif name == "cce":
            state = (
                "ok"
                if installed("cut_cross_entropy") and device.startswith("cuda")
                else "needs cut-cross-entropy and CUDA"
            )
        else:
            state = "ok"
        lines.append(f"  {name:9s} {IMPL_HELP[name]}\n  {'':9s}   -> {state}")
    lines += ["", "modes (--mode):"] + [f"  {m:7s} {MODE_HELP[m]}" for m in MODES]
    lines += ["", "dtypes (--dtype): " + ", ".join(DTYPES)]
    return "\n".join(lines)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        device = (
            "cuda"
            if (args.device == "auto" and torch.cuda.is_available())
            else ("cpu" if args.device == "auto" else args.device)
        )
        print(list_everything(device, args.dtype or ("bf16" if device.startswith("cuda") else "fp32")))
        return 0
    cfg = config_from_args(args)
    try:
        cfg.validate()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from fused_margin.bench.report import format_table, write_outputs
    from fused_margin.bench.runner import run_benchmark

    out_dir = args.out or Path("benchmarks") / "results" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    # a time limit's SIGTERM (timeout, a job scheduler) stops the run as Ctrl-C does: what was measured is written
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        run = run_benchmark(cfg, progress=not args.quiet)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    run.command = " ".join(["python -m fused_margin.bench"] + list(sys.argv[1:] if argv is None else argv))
    print(format_table(run))
    paths = write_outputs(run, out_dir, plot=not args.no_plot)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} ({run.wall_s:.0f} s)")
    wrong = sorted({f"{r['group']} {r['backend']}" for r in run.rows if r["check"] == "WRONG"})
    if wrong:
        print(f"WRONG (failed the correctness check, not timed): {', '.join(wrong)}", file=sys.stderr)
    if run.interrupted:
        print("interrupted: the files hold the cases measured before the stop", file=sys.stderr)
        return 130
    return 1 if wrong else 0
