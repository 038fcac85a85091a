"""Inputs and cases: what a benchmark row runs.

A *case* is one implementation of one loss on one head: a callable ``fn(X, W, y) -> loss`` (and, where
the implementation can give them, the side outputs ``(loss, aux)`` through ``fn_aux``). Cases are
grouped: every case of a group computes the same loss and is judged against that group's reference
(the margin losses against the fused_margin reference, the plain-CE anchors against
``F.cross_entropy``); the GEMM floor is alone in its group and computes no loss.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional

import torch
import torch.nn.functional as F

import fused_margin as fm
from fused_margin.bench.config import FUSED_BACKENDS, LOSSES, BenchConfig
from fused_margin.core.spec import LossTables, MarginLossSpec
from fused_margin.functional import uses_lean_path
from fused_margin.paths.fused import RowKernel, fused_margin_cross_entropy
from fused_margin.paths.lean import auto_chunk

#: how strongly a feature points at its class's weight: about half of the rows are then predicted
#: right (the max of C random cosines is about sqrt(2 ln C / D)), so hard and easy rows both occur.
SIGNAL = 4.3


class InputSet(NamedTuple):
    """Features ``X`` (B x D), class weights ``W`` (C x D, both leaves requiring grad) and labels ``y``."""

    X: torch.Tensor
    W: torch.Tensor
    y: torch.Tensor


def class_counts(cfg: BenchConfig) -> torch.Tensor:
    """Long-tailed class counts (exponential profile, head class 1000 samples, ``cfg.imbalance``)."""
    return fm.long_tailed_counts(cfg.C, n_max=1000, imbalance=float(cfg.imbalance), profile="exp")


def make_inputs(cfg: BenchConfig, counts: torch.Tensor, index: int) -> InputSet:
    """Input set ``index``: labels drawn from the class counts (head classes dominate the batch, as in a
    long-tailed epoch), ``W`` rows ~ N(0, I/D), ``X_i = noise + SIGNAL * unit(W_{y_i})`` so the
    cosine and linear heads both see realistic scores. Made in fp32, then cast to the benchmark dtype."""
    device = torch.device(cfg.device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + index)
    y = torch.multinomial(counts.double(), cfg.B, replacement=True, generator=gen)
    dgen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + index)
    W = torch.randn(cfg.C, cfg.D, device=device, generator=dgen) / math.sqrt(cfg.D)
    y = y.to(device)
    X = torch.randn(cfg.B, cfg.D, device=device, generator=dgen)
    X += SIGNAL * F.normalize(W[y], dim=1)
    dtype = cfg.torch_dtype
    return InputSet(X.to(dtype).requires_grad_(True), W.to(dtype).requires_grad_(True), y)


@dataclass
class Case:
    """One row family of the benchmark (one implementation of one group's loss)."""

    group: str  # "dbm-bs/cosine", "plain-ce/linear", "gemm-floor"
    impl: str  # "reference", "compile", "triton", "cuda", "cpu", "row:<name>", ...
    kind: str  # "margin", "plain-ce" or "floor"
    loss: Optional[str] = None
    head: Optional[str] = None
    fn: Optional[Callable] = None  # fn(X, W, y) -> scalar loss
    fn_aux: Optional[Callable] = None  # fn_aux(X, W, y) -> (loss, MarginAux)
    skip: Optional[str] = None  # reason this case does not run here
    note: str = ""
    compiled: bool = False

    @property
    def is_baseline(self) -> bool:
        """The eager implementation the group's speed-up is measured against."""
        return self.impl in ("reference", "torch-ce")


def _on(device, tables: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tables.items()}


def _module_fns(module, **options):
    def fn(X, W, y):
        return module(X, y, W, **options)

    def fn_aux(X, W, y):
        return module(X, y, W, return_aux=True, **options)

    return fn, fn_aux


def row_kernel_fns(kernel: RowKernel, kwargs: dict):
    spec_fields = {f.name for f in dataclasses.fields(MarginLossSpec)}
    spec = MarginLossSpec(**{k: v for k, v in kwargs.items() if k in spec_fields})
    tables = LossTables(**{k: v for k, v in kwargs.items() if k in LossTables._fields})

    def fn_aux(X, W, y):
        loss, lse, pred, hard = fused_margin_cross_entropy(kernel, X, y, W, None, spec, tables)
        return loss, fm.MarginAux(lse, pred, hard)

    def fn(X, W, y):
        return fn_aux(X, W, y)[0]

    return fn, fn_aux


#: the correctness check's references (float64 and the run dtype) walk the classes in chunks when the
#: class weights in float64 exceed this many bytes (e.g. the face-1m preset: 4 GiB, where the eager
#: reference's normalised copies and gradients of W in float64 would not fit a 24 GiB machine)
CHUNKED_TRUTH_BYTES = 1 << 30


def truth_class_chunk(rows: int, num_classes: int, dim: int) -> Optional[int]:
    """``class_chunk`` of the check's references: None (the eager reference, one B x C pass) unless the
    float64 class weights exceed :data:`CHUNKED_TRUTH_BYTES`; then the reference backend's own chunked
    path (eager torch over class chunks, tested against the unchunked reference in tests/paths/test_lean.py)."""
    if num_classes * dim * 8 <= CHUNKED_TRUTH_BYTES:
        return None
    return auto_chunk(rows, num_classes)


def _reference_module(loss, head, counts, device, class_chunk):
    module = LOSSES[loss].module(counts, head, "reference").to(device)
    if class_chunk is not None:
        module.options["class_chunk"] = int(class_chunk)
    return module


def reference_fn(loss: str, head: str, counts: torch.Tensor, device, class_chunk: Optional[int] = None):
    """The eager reference of a margin group (works in any dtype, float64 included): ``(fn, fn_aux)``;
    over chunks of ``class_chunk`` classes when given (:func:`truth_class_chunk`)."""
    return _module_fns(_reference_module(loss, head, counts, device, class_chunk))


def reference_rows_fn(
    loss: str, head: str, counts: torch.Tensor, device, class_chunk: Optional[int] = None
) -> Callable:
    """Per-row losses of the reference (``reduction="none"``)."""
    module = _reference_module(loss, head, counts, device, class_chunk)
    return lambda X, W, y: module(X, y, W, reduction="none")


def plain_ce_rows(X, W, y):
    return F.cross_entropy(X @ W.t(), y, reduction="none")


def tie_options(loss: str, counts: torch.Tensor, num_classes: int, head: str) -> dict:
    """Which argmax branches the loss takes (see :func:`fused_margin.bench.check.build_truth`)."""
    options = LOSSES[loss].kwargs(counts, num_classes, head)
    return {
        "argmax_ties": options.get("lambda_inst", 0.0) > 0 and options.get("hard_mode", "hard") == "hard",
        "strongest_wrong_ties": options.get("lambda_elm", 0.0) != 0,
    }


def plain_ce(X, W, y):
    """Plain softmax cross-entropy of the linear head, as a user writes it: ``F.cross_entropy(X W^T, y)``."""
    return F.cross_entropy(X @ W.t(), y)


def margin_cases(
    cfg: BenchConfig, loss: str, head: str, counts: torch.Tensor, compile_it: bool, status: dict
) -> List[Case]:
    """Reference, torch.compile, every fused backend and every extra row kernel, for one (loss, head)."""
    device = torch.device(cfg.device)
    group = f"{loss}/{head}"
    cases = []
    if "reference" in cfg.impls:
        fn, fn_aux = reference_fn(loss, head, counts, device)
        cases.append(Case(group, "reference", "margin", loss, head, fn, fn_aux, note="eager"))
    if "compile" in cfg.impls:
        if compile_it:
            fn, _ = reference_fn(loss, head, counts, device)
            cases.append(Case(group, "compile", "margin", loss, head, torch.compile(fn, dynamic=False), compiled=True))
        else:
            cases.append(
                Case(
                    group,
                    "compile",
                    "margin",
                    loss,
                    head,
                    skip="not compiled for this loss (--compile first compiles the first loss only)",
                )
            )
    for name in FUSED_BACKENDS:
        if name not in cfg.impls:
            continue
        if status.get(name) != "ok":
            cases.append(Case(group, name, "margin", loss, head, skip=status.get(name, "unknown backend")))
            continue
        fn, fn_aux = _module_fns(LOSSES[loss].module(counts, head, name).to(device), class_chunk=cfg.class_chunk)
        note = _lean_note(cfg, name)
        if name == "triton" and device.type == "cpu":
            note = "; ".join(
                filter(None, ["Triton interpreter (TRITON_INTERPRET=1): correct, but its time means nothing", note])
            )
        cases.append(Case(group, name, "margin", loss, head, fn, fn_aux, note=note))
    if "lean" in cfg.impls:
        chunk = auto_chunk(cfg.B, cfg.C)
        fn, fn_aux = _module_fns(LOSSES[loss].module(counts, head, "auto").to(device), class_chunk=chunk)
        cases.append(
            Case(
                group,
                "lean",
                "margin",
                loss,
                head,
                fn,
                fn_aux,
                note=f"class chunks of {chunk} ({_lean_kernel(device)} kernel)",
            )
        )
    for name, kernel in cfg.row_kernels.items():
        kwargs = _on(device, LOSSES[loss].kwargs(counts, cfg.C, head))
        fn, fn_aux = row_kernel_fns(kernel, kwargs)
        cases.append(Case(group, f"row:{name}", "margin", loss, head, fn, fn_aux, note="row kernel via fused.py"))
    return cases


def _lean_kernel(device) -> str:
    """The lean path's chunk kernel that backend='auto' picks on ``device``."""
    from fused_margin.backends import resolve_backend

    return resolve_backend("auto", device, torch.float32).name


def _lean_note(cfg: BenchConfig, name: str) -> str:
    """Which path a fused backend row takes at this shape (``class_chunk`` of the run)."""
    spec = MarginLossSpec(head="cosine")
    if uses_lean_path(cfg.class_chunk, True, spec, cfg.B, cfg.C):
        chunk = auto_chunk(cfg.B, cfg.C) if cfg.class_chunk == "auto" else cfg.class_chunk
        return f"lean path (class_chunk={cfg.class_chunk!r}: chunks of {chunk})"
    return ""


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def plain_ce_cases(cfg: BenchConfig) -> List[Case]:
    """Plain-CE anchors on the linear head: eager ``F.cross_entropy``, Liger-Kernel, cut-cross-entropy.
    A different loss (no margins): judged against float64 ``F.cross_entropy``, not the margin reference."""
    group, note = "plain-ce/linear", "plain CE: a different loss (no margin)"
    device = torch.device(cfg.device)
    cases = []
    if "torch-ce" in cfg.impls:
        cases.append(Case(group, "torch-ce", "plain-ce", None, "linear", plain_ce, note=note + ", eager"))
    if "liger" in cfg.impls:
        if not installed("liger_kernel"):
            cases.append(
                Case(group, "liger", "plain-ce", skip="Liger-Kernel is not installed (pip install liger-kernel)")
            )
        elif device.type != "cuda":
            cases.append(Case(group, "liger", "plain-ce", skip="Liger-Kernel's Triton kernels run on CUDA only"))
        else:
            module = importlib.import_module("liger_kernel.transformers").LigerFusedLinearCrossEntropyLoss()

            def liger(X, W, y):
                out = module(W, X, y)  # Liger's argument order: (lin_weight, input, target)
                return out[0] if isinstance(out, tuple) else out

            cases.append(Case(group, "liger", "plain-ce", None, "linear", liger, note=note))
    if "cce" in cfg.impls:
        if not installed("cut_cross_entropy"):
            cases.append(
                Case(
                    group, "cce", "plain-ce", skip="cut-cross-entropy is not installed (pip install cut-cross-entropy)"
                )
            )
        elif device.type != "cuda":
            cases.append(Case(group, "cce", "plain-ce", skip="cut-cross-entropy's kernels run on CUDA only"))
        else:
            linear_cross_entropy = importlib.import_module("cut_cross_entropy").linear_cross_entropy

            def cce(X, W, y):
                return linear_cross_entropy(X, W, y)

            cases.append(Case(group, "cce", "plain-ce", None, "linear", cce, note=note))
    return cases


def floor_case() -> Case:
    return Case("gemm-floor", "floor", "floor", note="3 GEMMs only: X W^T, G W, G^T X")
