"""The benchmark run: build the cases, gate each on correctness, time it in every mode, measure memory.

Order per case: (``torch.compile`` cases: the first call at the benchmark shape, timed apart as the
compile time) -> the correctness check against the group's float64 reference -> for each mode the timed
repetitions, then one more call for peak memory. A case that fails the check is WRONG and is not timed.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

import fused_margin as fm
from fused_margin.bench import cases as cases_mod
from fused_margin.bench.cases import Case
from fused_margin.bench.check import QUANTITIES, Truth, Verdict, build_truth, judge, run_outputs
from fused_margin.bench.config import BenchConfig
from fused_margin.bench.measure import MEMORY_METHOD, Op, peak_extra_mib, time_op
from fused_margin.bench.report import machine_info

#: the check runs on at most this many elements of the B x C matrix (the float64 reference holds a
#: dozen such temporaries); larger shapes are checked on their first rows.
CHECK_ELEMENTS = 2**24

FIELDS = (
    "group",
    "loss",
    "head",
    "backend",
    "kind",
    "mode",
    "dtype",
    "B",
    "D",
    "C",
    "ms",
    "ms_p20",
    "ms_p80",
    "wall_ms",
    "reps",
    "rounds",
    "round_ms",
    "speedup_vs_eager",
    "x_gemm_floor",
    "peak_extra_mib",
    "check",
    "check_detail",
    "err_loss",
    "err_grad_input",
    "err_grad_weight",
    "tol_loss",
    "tol_grad_input",
    "tol_grad_weight",
    "pred_mismatch",
    "first_call_s",
    "compile_s",
    "note",
)


@dataclass
class BenchRun:
    """The outcome of :func:`run_benchmark`: the configuration, the machine and one row per case and mode
    (one row per skipped case, mode ``None``)."""

    config: BenchConfig
    machine: dict
    rows: List[dict]
    check_rows: int
    memory_method: str
    wall_s: float = 0.0
    command: Optional[str] = None
    interrupted: bool = False  # stopped early (Ctrl-C, SIGTERM from a time limit): the rows measured so far


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _describe(error: BaseException) -> str:
    if _is_oom(error):
        return "OOM"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"ERROR: {type(error).__name__}: {first[:200]}"


def _free(device: torch.device) -> None:
    """Give cached GPU memory back between cases (so one case's cache does not count against the next)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


class _Runner:
    def __init__(self, cfg: BenchConfig, progress: bool, log: Callable[[str], None]):
        self.cfg, self.log = cfg, log
        self.device = torch.device(cfg.device)
        self.dtype = cfg.torch_dtype
        self.counts = cases_mod.class_counts(cfg)
        self.inputs = [cases_mod.make_inputs(cfg, self.counts, i) for i in range(cfg.input_sets)]
        self.check_rows = cfg.check_rows or min(cfg.B, max(1, CHECK_ELEMENTS // cfg.C))
        first = self.inputs[0]
        r = self.check_rows
        self.check_inputs = (first.X.detach()[:r], first.W.detach(), first.y[:r])
        self.status = fm.available_backends(self.device, self.dtype)
        self.rows: List[dict] = []
        self.timed: List[tuple] = []  # (row, op) of every timed row, in run order: what the later rounds re-time
        self.interrupted = False
        self.progress = progress
        self.floor_grads = None

    # -- plan -------------------------------------------------------------------------------------
    def groups(self):
        """``(cases, make_truth)`` per group, in run order."""
        cfg = self.cfg
        # the floor first: a run stopped early (a time limit) still has every ratio to it
        out = [([cases_mod.floor_case()], None)] if "floor" in cfg.impls else []
        for index, (loss, head) in enumerate(cfg.loss_heads()):
            compile_it = cfg.compile == "all" or (cfg.compile == "first" and index == 0)
            cases = cases_mod.margin_cases(cfg, loss, head, self.counts, compile_it, self.status)

            def make_truth(loss=loss, head=head):
                chunk = cases_mod.truth_class_chunk(self.check_rows, cfg.C, cfg.D)
                fn, fn_aux = cases_mod.reference_fn(loss, head, self.counts, self.device, chunk)
                rows = cases_mod.reference_rows_fn(loss, head, self.counts, self.device, chunk)
                return build_truth(
                    fn, fn_aux, rows, head, *self.check_inputs, **cases_mod.tie_options(loss, self.counts, cfg.C, head)
                )

            out.append((cases, make_truth))
        plain = cases_mod.plain_ce_cases(cfg)
        if plain:
            out.append(
                (
                    plain,
                    lambda: build_truth(
                        cases_mod.plain_ce, None, cases_mod.plain_ce_rows, "linear", *self.check_inputs
                    ),
                )
            )
        return out

    # -- rows -------------------------------------------------------------------------------------
    def _row(self, case: Case, mode: Optional[str], **values) -> dict:
        cfg = self.cfg
        row = dict.fromkeys(FIELDS)
        row.update(
            group=case.group,
            loss=case.loss,
            head=case.head,
            backend=case.impl,
            kind=case.kind,
            mode=mode,
            dtype=cfg.dtype,
            B=cfg.B,
            D=cfg.D,
            C=cfg.C,
            note=case.note,
        )
        row.update(values)
        self.rows.append(row)
        return row
        return row

    @staticmethod
    def _verdict_values(verdict: Verdict) -> dict:
        values = {"check": verdict.status, "check_detail": verdict.detail, "pred_mismatch": verdict.pred_mismatch}
        for q in QUANTITIES:
            values[f"err_{q}"] = verdict.errors.get(q)
            values[f"tol_{q}"] = verdict.tolerances.get(q)
        return values

    # -- run --------------------------------------------------------------------------------------
    def run(self) -> List[dict]:
        from tqdm.auto import tqdm

        plan = self.groups()
        modes = self.cfg.modes
        total = sum(len(cases) for cases, _ in plan) * len(modes)
        bar = tqdm(total=total, disable=not self.progress, file=sys.stderr, unit="case", dynamic_ncols=True)
        self.write = bar.write if self.progress else self.log
        try:
            for cases, make_truth in plan:
                truth: Optional[Truth] = None
                truth_error: Optional[str] = None
                for case in cases:
                    bar.set_description(f"{case.group} {case.impl}")
                    if case.skip:
                        self._row(case, None, check="skipped", check_detail=case.skip)
                        bar.update(len(modes))
                        continue
                    if make_truth is not None and truth is None and truth_error is None:
                        try:
                            truth = make_truth()
                        except Exception as error:  # noqa: BLE001 - reported, the run goes on
                            truth_error = _describe(error)
                            self.write(f"[bench] {case.group}: the reference check could not run: {truth_error}")
                    self._run_case(case, truth, truth_error, bar)
                    _free(self.device)
                del truth
                _free(self.device)
            for sweep in range(2, self.cfg.rounds + 1):
                for row, op in self.timed:
                    bar.set_description(
                        f"round {sweep}/{self.cfg.rounds}: {row['group']} {row['backend']} {row['mode']}"
                    )
                    timing = self._time(op)
                    row["round_ms"].append(timing.ms)
                    _free(self.device)
        except KeyboardInterrupt:  # Ctrl-C, or the SIGTERM of a time limit (cli.main): keep what was measured
            self.interrupted = True
            self.write("[bench] interrupted: the cases measured so far are reported, the rest did not run")
        finally:
            bar.close()
        for row, _ in self.timed:
            row["rounds"] = len(row["round_ms"])
            row["ms"] = statistics.median(row["round_ms"])
        self._ratios()
        return self.rows

    def _time(self, op: Op):
        return time_op(
            op,
            self.device,
            warmup=self.cfg.warmup,
            target_time=self.cfg.target_time,
            min_reps=self.cfg.min_reps,
            max_reps=self.cfg.max_reps,
        )

    def _run_case(self, case: Case, truth: Optional[Truth], truth_error: Optional[str], bar) -> None:
        modes = self.cfg.modes
        shared = {}
        if case.compiled:
            try:
                _sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
                t0 = time.perf_counter()
                Op("fwdbwd", self.inputs, case.fn).run(0, None)
                _sync()
                shared["compile_s"] = time.perf_counter() - t0
            except Exception as error:  # noqa: BLE001
                reason = f"torch.compile failed: {_describe(error)}"
                self.write(f"[bench] {case.group} compile: skipped, {reason}")
                self._row(case, None, check="skipped", check_detail=reason)
                bar.update(len(modes))
                return
            case.note = f"compiled in {shared['compile_s']:.1f} s (not in ms)"

        if case.kind == "floor":
            shared["check"] = "n/a"
            shared["check_detail"] = "no loss: the GEMMs alone"
        elif truth is None:
            shared["check"] = "UNCHECKED"
            shared["check_detail"] = f"the reference could not run: {truth_error}"
        else:
            try:
                out = run_outputs(case.fn_aux or case.fn, *truth.inputs, with_aux=case.fn_aux is not None)
                verdict = judge(out, truth)
                del out
            except Exception as error:  # noqa: BLE001
                status = _describe(error)
                self.write(f"[bench] {case.group} {case.impl}: the check call failed: {status}")
                self._fail(case, status, f"the check call failed: {status}", bar, shared)
                return
            shared.update(self._verdict_values(verdict))
            if not verdict.ok:
                self.write(f"[bench] {case.group} {case.impl}: WRONG ({verdict.detail}); not timed")
                self._fail(case, "WRONG", verdict.detail, bar, shared)
                return
            if case.kind == "plain-ce":
                shared["check_detail"] = f"vs float64 F.cross_entropy: {verdict.detail}"

        if case.kind == "floor" and self.floor_grads is None:
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 7)
            self.floor_grads = [
                torch.randn(self.cfg.B, self.cfg.C, device=self.device, generator=gen).to(self.dtype)
                for _ in self.inputs
            ]
        for mode in modes:
            bar.set_description(f"{case.group} {case.impl} {mode}")
            op = Op(mode, self.inputs, case.fn, self.floor_grads if case.kind == "floor" else None)
            try:
                timing = self._time(op)
                _free(self.device)
                memory = peak_extra_mib(op, self.device)
            except Exception as error:  # noqa: BLE001
                status = _describe(error)
                self.write(f"[bench] {case.group} {case.impl} {mode}: {status}")
                self._row(
                    case,
                    mode,
                    **{
                        **shared,
                        "check": status,
                        "check_detail": f"check {shared.get('check')}, then the timed call failed",
                    },
                )
                _free(self.device)
                bar.update(1)
                continue
            row = self._row(
                case,
                mode,
                ms=timing.ms,
                ms_p20=timing.ms_p20,
                ms_p80=timing.ms_p80,
                wall_ms=timing.wall_ms,
                reps=timing.reps,
                round_ms=[timing.ms],
                first_call_s=timing.first_call_s,
                peak_extra_mib=memory,
                **shared,
            )
            # the later rounds re-run op (which holds the floor's gradients, when it is the floor's)
            self.timed.append((row, op if self.cfg.rounds > 1 else None))
            bar.update(1)
        if case.kind == "floor":
            self.floor_grads = None

    def _fail(self, case: Case, status: str, detail: str, bar, shared: dict) -> None:
        """A case that is not timed: one row per mode with the status and no time."""
        for mode in self.cfg.modes:
            self._row(case, mode, **{**shared, "check": status, "check_detail": detail})
        bar.update(len(self.cfg.modes))

    def _ratios(self) -> None:
        """Speed-up over the group's eager baseline and ratio to the GEMM floor, per mode: with several
        rounds, the median of each round's own ratio (the rounds both rows have)."""

        def ratio(a: dict, b: dict) -> float:
            ra, rb = a.get("round_ms") or [a["ms"]], b.get("round_ms") or [b["ms"]]
            n = min(len(ra), len(rb))
            return statistics.median(x / y for x, y in zip(ra[:n], rb[:n]))

        baseline = {
            (r["group"], r["mode"]): r
            for r in self.rows
            if r["backend"] in ("reference", "torch-ce") and r["ms"] is not None
        }
        floor = {r["mode"]: r for r in self.rows if r["kind"] == "floor" and r["ms"] is not None}
        for r in self.rows:
            if r["ms"] is None:
                continue
            base = baseline.get((r["group"], r["mode"]))
            if base is not None and r["kind"] != "floor":
                r["speedup_vs_eager"] = ratio(base, r)
            if r["mode"] in floor:
                r["x_gemm_floor"] = ratio(r, floor[r["mode"]])


def run_benchmark(cfg: BenchConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> BenchRun:
    """Run the benchmark described by ``cfg`` and return its rows (nothing is written to disk)."""
    cfg.validate()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch.cuda.is_available() is False")
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        start = time.perf_counter()
        runner = _Runner(cfg, progress, log)
        rows = runner.run()
    finally:
        torch.set_num_threads(threads)
    machine = machine_info(device)
    machine["torch_threads"] = cfg.threads or threads
    return BenchRun(
        cfg,
        machine,
        rows,
        runner.check_rows,
        MEMORY_METHOD[device.type],
        time.perf_counter() - start,
        interrupted=runner.interrupted,
    )
