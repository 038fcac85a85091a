"""The correctness gate run before a case is timed (docs/loss.md section 8).

Every case computes the loss and its gradients to the features and the class weights on the first input
set (its first ``check_rows`` rows), and so does the group's reference twice: in float64 (the truth) and
in the benchmark dtype (what an eager user gets). With ``err(q) = ||q - q64|| / ||q64||`` for the loss
and each gradient, a case passes when every ``err <= 2 err_eager + floor(dtype)``: fp32 must agree with
float64 to about 1e-5, bf16/fp16 may be as wrong as the eager reference in that dtype but not much
worse. Cases that return the side outputs also need ``pred``/``hard`` equal to float64's on untied rows
(top-two gap of the base scores above a dtype tolerance). Where the loss branches on an argmax (DBM's
hard positives, ELM's strongest wrong class) rows with a near-tie there are left out of the check (their
label set to ignore_index): either branch is right for them. A NaN the reference lacks fails. A case
that fails is reported as WRONG and never timed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from fused_margin.core.spec import NORM_EPS

#: relative error floors by dtype (added to twice the eager reference's error).
ERROR_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-10}
#: a row is "tied" when its top-two base scores are closer than this times the row's largest |score|.
TIE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
QUANTITIES = ("loss", "grad_input", "grad_weight")


@dataclass
class Outputs:
    loss: torch.Tensor
    grad_input: torch.Tensor
    grad_weight: torch.Tensor
    pred: Optional[torch.Tensor] = None
    hard: Optional[torch.Tensor] = None


def run_outputs(fn: Callable, X: torch.Tensor, W: torch.Tensor, y: torch.Tensor, with_aux: bool) -> Outputs:
    """Loss, gradients to ``X`` and ``W`` and, with ``with_aux``, ``pred``/``hard`` of one call."""
    X = X.detach().requires_grad_(True)
    W = W.detach().requires_grad_(True)
    if with_aux:
        loss, aux = fn(X, W, y)
        pred, hard = aux.pred.detach(), aux.hard.detach()
    else:
        loss, pred, hard = fn(X, W, y), None, None
    grad_input, grad_weight = torch.autograd.grad(loss, (X, W))
    return Outputs(loss.detach(), grad_input, grad_weight, pred, hard)


def relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    """``||value - truth|| / ||truth||`` in float64; inf when ``value`` has a non-finite entry that
    ``truth`` does not."""
    value, truth = value.double(), truth.double()
    if bool((~torch.isfinite(value) & torch.isfinite(truth)).any()):
        return float("inf")
    scale = float(truth.norm())
    return float((value - truth).norm()) / (scale if scale > 0 else 1.0)


@dataclass
class Truth:
    """A group's float64 outputs, the eager reference's errors in the benchmark dtype, the check inputs
    (near-tied rows' labels set to ``ignore_index``), how many rows that ignores, and the rows whose
    ``pred`` is not tied."""

    outputs: Outputs
    eager_errors: Dict[str, float]
    dtype: torch.dtype
    inputs: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ignored_rows: int = 0
    untied: Optional[torch.Tensor] = None


def base_scores64(X: torch.Tensor, W: torch.Tensor, head: str) -> torch.Tensor:
    """The base scores in float64 (cosines for the cosine head, ``X W^T`` for the linear head)."""
    X = X.detach().double()
    if head == "cosine":
        X = F.normalize(X, dim=1, eps=NORM_EPS)
    # W in blocks of classes: no float64 copy of the whole C x D weight (4 GiB at the face-1m preset)
    out = torch.empty(X.shape[0], W.shape[0], dtype=torch.float64, device=X.device)
    step = max(1, (1 << 24) // max(1, W.shape[1]))
    for c0 in range(0, W.shape[0], step):
        w = W[c0 : c0 + step].detach().double()
        if head == "cosine":
            w = F.normalize(w, dim=1, eps=NORM_EPS)
        out[:, c0 : c0 + step] = X @ w.t()
    return out


def _top2_gap(z: torch.Tensor) -> torch.Tensor:
    top2 = z.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def build_truth(
    reference: Callable,
    reference_aux: Optional[Callable],
    reference_rows: Callable,
    head: str,
    X,
    W,
    y,
    *,
    argmax_ties: bool = False,
    strongest_wrong_ties: bool = False,
    ignore_index: int = -100,
) -> Truth:
    """Run the group's reference in float64 and in the inputs' dtype on the check inputs.

    ``reference_rows`` gives the per-row losses (``reduction="none"``): the eager error of the mean loss
    is taken as the larger of its actual error and the typical error of a mean of that many rows,
    ``||e_rows|| / N`` (the actual error of a mean can be near zero by luck, which would make the
    tolerance a coin toss).

    A loss that branches on an argmax of the base scores (DBM's hard-positive flag: ``argmax_ties``;
    ELM's strongest wrong class: ``strongest_wrong_ties``) is discontinuous where the top two scores
    tie, and there any rounding legitimately picks either branch. Such rows (top-two gap within
    ``TIE_TOLERANCE`` of the dtype) get ``ignore_index`` for the check, unless that would ignore all.
    """
    dtype = X.dtype
    z = base_scores64(X, W, head)
    tol = TIE_TOLERANCE[dtype] * z.abs().amax(1)
    untied = _top2_gap(z) > tol
    tied = torch.zeros_like(untied)
    if argmax_ties:
        tied |= ~untied
    if strongest_wrong_ties and z.shape[1] >= 3:
        wrong = z.scatter(1, y.clamp_min(0)[:, None], float("-inf"))
        tied |= _top2_gap(wrong) <= tol
    ignored = int(tied.sum())
    if 0 < ignored < y.shape[0]:
        y = torch.where(tied, torch.full_like(y, ignore_index), y)
    else:
        ignored = 0
    truth = run_outputs(reference_aux or reference, X.double(), W.double(), y, reference_aux is not None)
    eager = run_outputs(reference, X, W, y, False)
    errors = {q: relative_error(getattr(eager, q), getattr(truth, q)) for q in QUANTITIES}
    with torch.no_grad():
        rows64, rows = reference_rows(X.double(), W.double(), y).double(), reference_rows(X, W, y).double()
        kept = int((y != ignore_index).sum())
        typical = float((rows - rows64).norm()) / max(kept, 1) / max(abs(float(truth.loss)), 1e-30)
    errors["loss"] = max(errors["loss"], typical)
    return Truth(truth, errors, dtype, (X, W, y), ignored, untied if truth.pred is not None else None)


@dataclass
class Verdict:
    ok: bool
    detail: str
    errors: Dict[str, float] = field(default_factory=dict)
    tolerances: Dict[str, float] = field(default_factory=dict)
    pred_mismatch: Optional[int] = None

    @property
    def status(self) -> str:
        return "ok" if self.ok else "WRONG"


def judge(out: Outputs, truth: Truth) -> Verdict:
    """Compare one case's outputs with the group's truth (see the module docstring for the rule)."""
    floor = ERROR_FLOOR[truth.dtype]
    errors, tols, failures = {}, {}, []
    for q in QUANTITIES:
        err = relative_error(getattr(out, q), getattr(truth.outputs, q))
        tol = 2.0 * truth.eager_errors[q] + floor
        errors[q], tols[q] = err, tol
        if not err <= tol:  # also catches NaN
            failures.append(f"{q} rel err {err:.2e} > tol {tol:.2e}")
    mismatch = None
    if out.pred is not None and truth.untied is not None:
        keep = truth.untied
        differ = (out.pred != truth.outputs.pred) | (out.hard != truth.outputs.hard)
        mismatch = int((differ & keep).sum())
        if mismatch:
            failures.append(f"pred/hard differ from float64 on {mismatch} untied rows")
    detail = "; ".join(failures) if failures else "max rel err " + f"{max(errors.values()):.1e}"
    if truth.ignored_rows:
        detail += f" ({truth.ignored_rows} near-tied rows ignored)"
    return Verdict(not failures, detail, errors, tols, mismatch)
