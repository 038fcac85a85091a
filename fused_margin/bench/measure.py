"""Timing and peak-memory measurement.

Time: each repetition uses the next of several input sets (so caches do not flatter a case), after a
warm-up whose first call is reported apart (it holds compilation, autotuning, first allocations).
On CUDA every repetition is bracketed by CUDA events recorded on the stream, with no host sync in the
timed loop but the final ``torch.cuda.synchronize()``; the median is reported, and the loop's wall
time per call as a cross-check (fwd and fwdbwd). On CPU every repetition is timed with
``time.perf_counter`` and the median is reported.

Peak extra memory, measured on a separate run after timing, over what is allocated before the call
(the inputs; in bwd mode also the forward's saved graph); the call's outputs (loss, gradients) count.
CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the running sum of
the allocation and free events of ``torch.profiler`` (``profile_memory=True``), whose peak is the
peak extra memory allocated through torch's CPU allocator. Not seen: memory a kernel gets outside
torch's allocator, and frees of blocks allocated before the call (in bwd mode the saved graph), so on
CPU the bwd figure is an upper bound.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from fused_margin.bench.cases import InputSet

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory allocated before the call",
    "cpu": "torch.profiler memory events (profile_memory=True): peak of the running sum of torch CPU "
    "allocations minus frees during the call (frees of older blocks unseen: bwd is an upper bound)",
}


class Op:
    """What one timed repetition runs, for one mode: ``prepare(i)`` is untimed (the forward in bwd
    mode), ``run(i, ctx)`` is timed and returns its outputs (dropped after the repetition)."""

    def __init__(
        self,
        mode: str,
        inputs: Sequence[InputSet],
        fn: Optional[Callable] = None,
        floor_grads: Optional[Sequence[torch.Tensor]] = None,
    ):
        self.mode, self.inputs, self.fn, self.floor_grads = mode, inputs, fn, floor_grads

    def prepare(self, i: int):
        if self.mode == "bwd" and self.fn is not None:
            s = self.inputs[i]
            return self.fn(s.X, s.W, s.y)
        return None

    def run(self, i: int, ctx):
        s = self.inputs[i]
        if self.fn is None:
            return self._floor(i)
        if self.mode == "fwd":
            return self.fn(s.X, s.W, s.y)
        loss = ctx if self.mode == "bwd" else self.fn(s.X, s.W, s.y)
        return torch.autograd.grad(loss, (s.X, s.W))

    def _floor(self, i: int):
        """The GEMMs alone: logits ``X W^T`` (fwd), ``G W`` and ``G^T X`` (bwd), all three (fwdbwd)."""
        s = self.inputs[i]
        X, W = s.X.detach(), s.W.detach()
        out = []
        if self.mode in ("fwd", "fwdbwd"):
            out.append(X @ W.t())
        if self.mode in ("bwd", "fwdbwd"):
            G = self.floor_grads[i]
            out.append(G @ W)
            out.append(G.t() @ X)
        return out


@dataclass
class Timing:
    ms: float  # median per repetition
    ms_p20: float
    ms_p80: float
    reps: int
    first_call_s: float  # the first warm-up call, synchronised (compilation, autotuning, allocation)
    wall_ms: Optional[float] = None  # CUDA: loop wall time per call (fwd, fwdbwd)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_op(op: Op, device: torch.device, *, warmup: int, target_time: float, min_reps: int, max_reps: int) -> Timing:
    """Warm up, pick the repetition count from the last warm-up call (``target_time`` seconds in all,
    within ``[min_reps, max_reps]``), then time the repetitions over the rotating input sets."""
    n_sets = len(op.inputs)
    first = last = 0.0
    for k in range(warmup):
        ctx = op.prepare(k % n_sets)
        _sync(device)
        t0 = time.perf_counter()
        out = op.run(k % n_sets, ctx)
        _sync(device)
        last = time.perf_counter() - t0
        first = last if k == 0 else first
        del out, ctx
    reps = int(min(max_reps, max(min_reps, math.ceil(target_time / max(last, 1e-6)))))

    times: List[float] = []
    wall = None
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        _sync(device)
        t0 = time.perf_counter()
        for r in range(reps):
            i = r % n_sets
            ctx = op.prepare(i)
            starts[r].record()
            out = op.run(i, ctx)
            ends[r].record()
            del out, ctx
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        if op.mode != "bwd" or op.fn is None:
            wall = 1e3 * elapsed / reps
    else:
        for r in range(reps):
            i = r % n_sets
            ctx = op.prepare(i)
            t0 = time.perf_counter()
            out = op.run(i, ctx)
            times.append(1e3 * (time.perf_counter() - t0))
            del out, ctx
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), reps, first, wall)


#: the profiler's note that a block allocated before profiling was freed: expected (see peak_extra_mib).
_PRE_PROFILE_FREE = "allocated before the profiling started"


@contextlib.contextmanager
def _kineto_log_filtered():
    """Drop the ``USDT: ... profiler_start/stop`` lines Kineto writes to file descriptor 2 on every
    profile, and its note on frees of blocks allocated before profiling; pass anything else on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [
                line
                for line in sink.read().decode(errors="replace").splitlines(keepends=True)
                if not line.startswith("USDT:") and _PRE_PROFILE_FREE not in line
            ]
            if kept:
                sys.stderr.write("".join(kept))


def peak_extra_mib(op: Op, device: torch.device) -> float:
    """Peak memory of one call above what was allocated before it, in MiB (see the module docstring)."""
    ctx = op.prepare(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = op.run(0, ctx)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out, ctx
        return peak / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _kineto_log_filtered():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = op.run(0, ctx)
    del out, ctx
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20
