"""``python -m fused_margin.bench.sharded``: the class-sharded loss's training step over ``world`` gloo ranks
(spawned here, on this machine's CPU), at each sample rate: time and peak memory per rank.

Each rank holds an even shard of a cosine classifier (``C / world`` rows of ``D``) and its ``B / world`` rows
of the global batch; one step is :func:`fused_margin.distributed.sharded_margin_cross_entropy` (ArcFace,
``s=64``, ``m=0.5``, a scalar margin) forward and backward, new features and labels every step (labels uniform
over the C classes). The ranks start each step together (a barrier); a step's time is the slowest rank's, and
the median over the timed steps is reported. Every sample rate runs in fresh processes, so each rank's peak
resident memory (``getrusage``'s ``ru_maxrss``) is that rate's; the table also gives its rise over the resident
memory after set-up (the shard and the inputs allocated), which holds the step's own memory: the gathered rows
of the sample, the gradient of the weight (dense ``C_r x D`` at rate 1, the kept rows at rate ``< 1``) and the
chunk buffers. Ratios are within the one run. Progress goes to stderr.

Presets (``--preset``): ``face-10m`` C=10,000,000 D=128 B=256 over 2 ranks, rates 1 and 0.1 (about 11 GiB of
memory in all at rate 1); ``small`` C=200,000 D=64 B=64 over 2 ranks (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PRESETS = {
    "face-10m": dict(C=10_000_000, D=128, B=256, world=2, rates=(1.0, 0.1)),
    "small": dict(C=200_000, D=64, B=64, world=2, rates=(1.0, 0.1)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def _resident_mib() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_resident_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _step_inputs(args, rank: int, step: int, dtype):
    """The global batch of ``step`` (the same on every rank) and this rank's rows of it."""
    g = torch.Generator().manual_seed(1_000_003 * (step + 1))
    labels = torch.randint(0, args.C, (args.B,), generator=g)
    rows = args.B // args.world
    features = torch.randn(rows, args.D, generator=torch.Generator().manual_seed(7919 * step + rank), dtype=dtype)
    return features, labels[rank * rows : (rank + 1) * rows]


def _worker(rank: int, args, rate: float, store_path: str, out_path: str) -> None:
    import fused_margin.distributed as fmd

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))
    dist.init_process_group("gloo", store=dist.FileStore(store_path, args.world), rank=rank, world_size=args.world)
    try:
        dtype = DTYPES[args.dtype]
        start, count = fmd.even_shards(args.C, args.world)[rank]
        weight = torch.empty(count, args.D, dtype=dtype)
        weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(rank))
        weight.requires_grad_()
        set_up = _resident_mib()
        times, kept = [], None
        for step in range(args.warmup + args.steps):
            x, y = _step_inputs(args, rank, step, dtype)
            draw = torch.Generator().manual_seed(104729 * step + rank)
            dist.barrier()
            t0 = time.perf_counter()
            loss = fmd.sharded_margin_cross_entropy(
                x,
                y,
                weight,
                class_start=start,
                num_classes=args.C,
                scale=64.0,
                margin=0.5,
                margin_type="additive_angular",
                sample_rate=rate,
                generator=draw,
            )
            loss.backward()
            value = float(loss.detach())
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            grad = weight.grad
            kept = grad.coalesce().indices().shape[1] if grad.is_sparse else grad.shape[0]
            del grad, loss  # nothing of this step outlives it
            weight.grad = None
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if step >= args.warmup:
                times.append(float(elapsed))
            if rank == 0:
                label = "warm-up" if step < args.warmup else f"step {step - args.warmup + 1}/{args.steps}"
                print(
                    f"  rate {rate:g}: {label} {1e3 * float(elapsed):.0f} ms, loss {value:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
        record = dict(rank=rank, set_up_mib=set_up, peak_mib=_peak_resident_mib(), kept=kept, times=times)
        records = [None] * args.world
        dist.all_gather_object(records, record)
        if rank == 0:
            Path(out_path).write_text(json.dumps(records))
    finally:
        dist.destroy_process_group()


def run_rate(args, rate: float) -> dict:
    """One sample rate in fresh processes: ``{rate, ms, kept, ranks: [{rank, set_up_mib, peak_mib, ...}]}``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "records.json")
        mp.spawn(_worker, args=(args, rate, os.path.join(tmp, "store"), out), nprocs=args.world, join=True)
        records = json.loads(Path(out).read_text())
    return dict(rate=rate, ms=1e3 * statistics.median(records[0]["times"]), ranks=records)


def format_table(args, results) -> str:
    full = next((r for r in results if r["rate"] == 1.0), None)
    lines = [
        f"class-sharded step (loss forward + backward), C={args.C:,} D={args.D} B={args.B} (global) "
        f"{args.dtype}, {args.world} gloo ranks, {max(1, (os.cpu_count() or 1) // args.world)} thread(s) a rank, "
        f"median of {args.steps} steps",
        "",
        "| sample rate | kept classes a rank | step ms | vs rate 1 | peak RSS a rank (MiB) | rise over set-up (MiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        ratio = f"{r['ms'] / full['ms']:.3f}x" if full else "-"
        kept = " / ".join(f"{q['kept']:,}" for q in r["ranks"])
        peak = " / ".join(f"{q['peak_mib']:.0f}" for q in r["ranks"])
        rise = " / ".join(f"{q['peak_mib'] - q['set_up_mib']:.0f}" for q in r["ranks"])
        lines.append(f"| {r['rate']:g} | {kept} | {r['ms']:.0f} | {ratio} | {peak} | {rise} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_margin.bench.sharded",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="face-10m", help="named shape [face-10m]")
    p.add_argument("--C", type=int, help="number of classes (overrides the preset)")
    p.add_argument("--D", type=int, help="feature size (overrides the preset)")
    p.add_argument("--B", type=int, help="global batch size, a multiple of --world (overrides the preset)")
    p.add_argument("--world", type=int, help="ranks to spawn (overrides the preset)")
    p.add_argument("--rates", help="comma-separated sample rates in (0, 1] (overrides the preset)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="features and weight [fp32]")
    p.add_argument("--steps", type=int, default=3, help="timed steps a rate [3]")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first [1]")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p


def parse_args(argv=None):
    from fused_margin.paths.sampled import check_sample_rate

    p = build_parser()
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for name in ("C", "D", "B", "world"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.rates = tuple(preset["rates"]) if args.rates is None else tuple(float(v) for v in args.rates.split(","))
    try:
        args.rates = tuple(check_sample_rate(r) for r in args.rates)
    except (TypeError, ValueError) as e:
        p.error(f"--rates: {e}")
    if args.world < 1:
        p.error(f"--world must be at least 1, got {args.world}")
    if args.B < args.world or args.B % args.world:
        p.error(f"--B must be a positive multiple of --world ({args.world}), got {args.B}")
    if args.C < 2 * args.world:
        p.error(f"--C must give every rank 2 classes or more, got {args.C} over {args.world} ranks")
    if args.D < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--D and --steps must be positive and --warmup non-negative")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = []
    for rate in args.rates:
        print(f"sample rate {rate:g}: {args.world} ranks ...", file=sys.stderr, flush=True)
        results.append(run_rate(args, rate))
    table = format_table(args, results)
    print(table)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps(dict(settings=settings, results=results), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
