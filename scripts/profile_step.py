"""Profile one forward+backward step of a fused loss: device time against wall time, and the kernels.

For each backend asked for, one step of ``LOSS`` (a benchmark loss, see ``python -m fused_margin.bench
--list``) at a preset shape, with gradients to the features and the class weights:

* wall ms per step (mean over ``--steps`` steps, synchronised once at the end) and, on a GPU, the
  summed device time of the kernels per step (``torch.profiler``): their ratio shows how much of the
  step is launch gaps and host overhead rather than kernels;
* the dispatched ops per step (a ``TorchDispatchMode``, views excluded) and the kernels/ops by time;
* on a GPU, the registers, spills and shared memory of every Triton kernel compiled so far (a row
  kernel that spills or runs at low occupancy shows here).

A backend written ``NAME/separate`` runs with the ``grad_in_forward`` switch off (fused_margin.config): the
separate row backward instead of the forward that forms ``dL/draw`` (``RowKernel.forward_backward``), to
measure what that saves.

Usage (scripts/gpu_check.sh runs it on a GPU; on a CPU it works too, the device columns then empty)::

    python scripts/profile_step.py --preset inat --dtype bf16 --loss dbm-bs --backends triton,triton/separate,cuda
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_margin as fm  # noqa: F401  (registers the ops)
from fused_margin.bench.cases import class_counts, make_inputs
from fused_margin.bench.config import DTYPES, LOSSES, PRESETS, BenchConfig


class _OpCounter(TorchDispatchMode):
    """Counts the dispatched ops, views excluded (they launch nothing)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[f"{func.namespace}.{func.overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(fn, X, W, y):
    loss = fn(X, W, y)
    gx, gw = torch.autograd.grad(loss, (X, W))
    return loss, gx, gw


def _triton_kernel_report() -> list:
    """``(name, registers, spills, shared bytes, warps)`` of every Triton kernel of the package compiled in
    this process (best effort: the JIT cache's layout differs between Triton versions)."""
    import importlib
    import pkgutil

    try:
        from triton.runtime.jit import JITFunction

        import fused_margin.backends.triton as package
    except Exception as error:  # noqa: BLE001
        return [(f"(no Triton kernels: {error})", "", "", "", "")]
    rows, seen = [], set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for obj in vars(module).values():
            fn = obj
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):  # autotune/heuristics wrappers
                fn = fn.fn
            if not isinstance(fn, JITFunction) or id(fn) in seen:
                continue
            seen.add(id(fn))
            for cache in (getattr(fn, "device_caches", None) or {}).values():
                kernels = cache[0] if isinstance(cache, tuple) else cache
                for compiled in kernels.values() if hasattr(kernels, "values") else ():
                    try:
                        compiled._init_handles()
                    except Exception:  # noqa: BLE001
                        pass
                    meta = getattr(compiled, "metadata", None)
                    rows.append(
                        (
                            fn.__name__,
                            getattr(compiled, "n_regs", "?"),
                            getattr(compiled, "n_spills", "?"),
                            getattr(meta, "shared", "?"),
                            getattr(meta, "num_warps", "?"),
                        )
                    )
    return rows or [("(none found in the JIT caches)", "", "", "", "")]


def profile_backend(backend: str, args, device) -> str:
    """One backend (``NAME`` or ``NAME/separate``, see the module docstring)."""

    name, _, variant = backend.partition("/")
    if variant not in ("", "separate"):
        raise ValueError(f"a backend is NAME or NAME/separate, got {backend!r}")
    with fm.config(grad_in_forward=variant != "separate"):
        return _profile(name, backend, args, device)


def _profile(backend: str, label: str, args, device) -> str:
    B, D, C = PRESETS[args.preset][0]
    B, D, C = args.B or B, args.D or D, args.C or C
    cfg = BenchConfig(device=str(device), B=B, D=D, C=C, dtype=args.dtype)
    counts = class_counts(cfg)
    module = LOSSES[args.loss].module(counts, args.head, backend).to(device)
    X, W, y = make_inputs(cfg, counts, 0)

    def fn(X, W, y):
        return module(X, y, W)

    for _ in range(3):
        _step(fn, X, W, y)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        _step(fn, X, W, y)
    _sync(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / args.steps

    counter = _OpCounter()
    with counter:
        _step(fn, X, W, y)
    _sync(device)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            _step(fn, X, W, y)
        _sync(device)
    events = prof.key_averages()
    lines = [
        f"== {args.loss}/{args.head} backend={label} B={B} D={D} C={C} {args.dtype} on {device} "
        f"(torch {torch.__version__})",
        f"wall: {wall_ms:.3f} ms per step (mean of {args.steps}, one synchronisation at the end)",
        f"dispatched ops per step: {sum(counter.ops.values())}: "
        + ", ".join(f"{k} x{v}" if v > 1 else k for k, v in counter.ops.most_common()),
    ]
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        device_us = sum(e.device_time for e in kernels if hasattr(e, "device_time")) or sum(
            getattr(e, "cuda_time", 0.0) for e in kernels
        )
        per_step = device_us / 1e3 / args.steps
        lines.append(
            f"device kernels: {len(kernels) / args.steps:.1f} per step, {per_step:.3f} ms per step "
            f"({per_step / wall_ms:.0%} of the wall time; the rest is launch gaps and host work)"
        )
        sort_by = "self_device_time_total"
    else:
        sort_by = "self_cpu_time_total"
    try:
        lines.append(events.table(sort_by=sort_by, row_limit=args.rows))
    except Exception:  # noqa: BLE001  (older torch: cuda_time_total)
        lines.append(
            events.table(sort_by="self_cuda_time_total" if device.type == "cuda" else sort_by, row_limit=args.rows)
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="inat", choices=sorted(PRESETS))
    parser.add_argument("--B", type=int)
    parser.add_argument("--D", type=int)
    parser.add_argument("--C", type=int)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--loss", default="dbm-bs", choices=sorted(LOSSES))
    parser.add_argument("--head", default="cosine", choices=("cosine", "linear"))
    parser.add_argument("--backends", default="triton,cuda", help="comma list of fused_margin backends")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=25, help="rows of each profiler table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    failed = False
    for backend in args.backends.split(","):
        try:
            print(profile_backend(backend.strip(), args, device), flush=True)
        except Exception as error:  # noqa: BLE001  (report and go on with the next backend)
            failed = True
            print(f"== backend={backend}: FAILED: {type(error).__name__}: {error}", flush=True)
    if device.type == "cuda":
        print("== Triton kernels compiled in this process (name, registers, spills, shared bytes, warps)")
        for row in _triton_kernel_report():
            print("  ", *row)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
