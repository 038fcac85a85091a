"""What the benchmark can run: shape presets, the losses (as users call them), dtypes and modes.

Each loss is described twice, on purpose: as the ``nn.Module`` preset a user trains with (used for the
named backends, the eager reference and ``torch.compile``) and as the keyword arguments of
:func:`fused_margin.margin_cross_entropy` that the preset stands for (used to run a bare
:class:`fused_margin.paths.fused.RowKernel`, e.g. a kernel under development, through the fused plumbing).
The correctness check judges both against the same float64 reference, so the two cannot drift apart
unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

import fused_margin as fm

#: named shapes ``(B, D, C)``: batch, feature size, classes.
PRESETS: Dict[str, Tuple[Tuple[int, int, int], str]] = {
    "inat": ((512, 2048, 8142), "iNaturalist 2018: ResNet-50 features, 8,142 classes"),
    "imagenet-lt": ((256, 2048, 1000), "ImageNet-LT: ResNet features, 1,000 classes"),
    "face": ((1024, 512, 100000), "face recognition: 512-d embeddings, 100K identities"),
    "face-1m": (
        (1024, 512, 1048576),
        "face recognition at 1M identities: a B x C fp32 matrix is 4 GiB, the "
        "fused rows take the lean path (on CPU: --backends cpu,lean,floor --input-sets 1; --C to scale down)",
    ),
    "vocab": ((8192, 4096, 128256), "large-vocabulary head (Llama-3 vocabulary)"),
    "cpu-small": ((256, 512, 8142), "the CPU default: iNat's classes, a small batch and feature size"),
    "tiny": ((16, 32, 64), "smoke tests"),
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwdbwd")
MODE_HELP = {
    "fwd": "forward (training forward: inputs require grad, the graph is kept)",
    "bwd": "backward only (the forward runs untimed before each repetition)",
    "fwdbwd": "forward + backward (gradients to features and class weights)",
}


@dataclass(frozen=True)
class LossDef:
    """A loss of the benchmark: its preset module and the margin_cross_entropy arguments it stands for.

    ``module(counts, head, backend)`` builds the preset; ``kwargs(counts, num_classes, head, dtype)`` gives
    the equivalent keyword arguments (tables on the CPU in ``dtype``, float32 by default as the modules'
    buffers, moved to the device by the caller; float64 to match a ``.double()`` module exactly).
    """

    title: str
    heads: Tuple[str, ...]
    module: Callable[[torch.Tensor, str, str], torch.nn.Module]
    kwargs: Callable[..., dict]


def _dbm(variant):
    def module(counts, head, backend):
        return fm.DBMLoss(counts, variant=variant, backend=backend)

    def kwargs(counts, num_classes, head, dtype=torch.float32):
        out = dict(
            head="cosine",
            scale=30.0,
            margin_type="additive_angular",
            lambda_inst=1.0,
            hard_mode="hard",
            class_margins=fm.dbm_class_margins(counts, 0.1, 1.0, "min", dtype=dtype),
        )
        if variant == "bs":
            out["logit_offset"] = fm.log_prior(counts, dtype=dtype)
        return out

    return module, kwargs


#: the scale of each head. ``s = 30`` is what LDAM/ELM/DBM train cosine classifiers with (cosines in
#: [-1, 1]); a linear head is trained at ``s = 1``: its logits are unnormalised (|logit| up to ~190 at the
#: default shape), and ``s = 30`` on them would put most ``exp`` values in the denormal range, which on
#: the CPU is many times slower and no training run would use (the eager LDAM-linear row took 139 ms
#: against 88 ms for the cosine one, inflating its speed-up).
HEAD_SCALE = {"cosine": 30.0, "linear": 1.0}


def _ldam(lambda_elm):
    """LDAM / ELM at ``HEAD_SCALE[head]`` (30 on the cosine head, 1 on the linear head)."""

    def module(counts, head, backend):
        if lambda_elm:
            return fm.ELMLoss(
                counts, max_m=0.5, lambda_elm=lambda_elm, scale=HEAD_SCALE[head], backend=backend, feature_head=head
            )
        return fm.LDAMLoss(counts, max_m=0.5, scale=HEAD_SCALE[head], backend=backend, feature_head=head)

    def kwargs(counts, num_classes, head, dtype=torch.float32):
        out = dict(
            head=head,
            scale=HEAD_SCALE[head],
            margin_type="additive_cosine",
            class_margins=fm.ldam_margins(counts, 0.5, dtype=dtype),
        )
        if lambda_elm:
            out["lambda_elm"] = lambda_elm
        return out

    return module, kwargs


def _constant(margin, scale, margin_type):
    cls = fm.ArcFaceLoss if margin_type == "additive_angular" else fm.CosFaceLoss

    def module(counts, head, backend):
        return cls(margin=margin, scale=scale, backend=backend)

    def kwargs(counts, num_classes, head, dtype=torch.float32):
        return dict(
            head="cosine",
            scale=scale,
            margin_type=margin_type,
            class_margins=torch.full((num_classes,), margin, dtype=dtype),
        )

    return module, kwargs


def _offset(tau):
    """Balanced softmax (tau None) or logit adjustment at ``HEAD_SCALE[head]``."""

    def module(counts, head, backend):
        scale = HEAD_SCALE[head]
        if tau is None:
            return fm.BalancedSoftmaxLoss(counts, backend=backend, feature_head=head, scale=scale)
        return fm.LogitAdjustedLoss(counts, tau=tau, backend=backend, feature_head=head, scale=scale)

    def kwargs(counts, num_classes, head, dtype=torch.float32):
        offset = (fm.log_prior(counts, dtype=torch.float64) * (1.0 if tau is None else float(tau))).to(dtype)
        return dict(head=head, scale=HEAD_SCALE[head], logit_offset=offset)

    return module, kwargs


LOSSES: Dict[str, LossDef] = {
    "dbm-ce": LossDef("DBM, CE variant (difficulty-aware balancing margin, AAAI'25)", ("cosine",), *_dbm("ce")),
    "dbm-bs": LossDef("DBM, balanced-softmax variant (AAAI'25)", ("cosine",), *_dbm("bs")),
    "ldam": LossDef(
        "LDAM (Cao et al., NeurIPS 2019), max_m 0.5, s 30 (cosine) / 1 (linear)", ("cosine", "linear"), *_ldam(0.0)
    ),
    "elm": LossDef(
        "ELM (Kato & Hotta), LDAM margins, lambda 1, s 30 (cosine) / 1 (linear)", ("cosine", "linear"), *_ldam(1.0)
    ),
    "arcface": LossDef(
        "ArcFace (Deng et al., CVPR 2019), m 0.5, s 64", ("cosine",), *_constant(0.5, 64.0, "additive_angular")
    ),
    "cosface": LossDef(
        "CosFace (Wang et al., CVPR 2018), m 0.35, s 64", ("cosine",), *_constant(0.35, 64.0, "additive_cosine")
    ),
    "bs": LossDef("balanced softmax (Ren et al., NeurIPS 2020)", ("linear", "cosine"), *_offset(None)),
    "la": LossDef("logit adjustment (Menon et al., ICLR 2021), tau 1", ("linear", "cosine"), *_offset(1.0)),
}

#: implementations that are not fused_margin backends: the eager/compiled reference, plain-CE anchors, floor.
FUSED_BACKENDS = ("triton", "cuda", "cpu")
PLAIN_CE = ("torch-ce", "liger", "cce")
ALL_IMPLS = ("reference", "compile") + FUSED_BACKENDS + ("lean",) + PLAIN_CE + ("floor",)
IMPL_HELP = {
    "reference": "the pure-PyTorch reference, eager (backend='reference'): the speed-up baseline",
    "compile": "torch.compile of the reference (compile time reported apart, not in the median)",
    "triton": "fused_margin Triton row kernels (backend='triton')",
    "cuda": "fused_margin C++/CUDA extension on CUDA tensors (backend='cuda')",
    "cpu": "fused_margin C++ CPU kernel (backend='cpu')",
    "lean": "fused_margin's memory-lean path forced on (backend='auto', class_chunk from the 64 MiB budget): "
    "class chunks, no B x C matrix, a fourth GEMM",
    "torch-ce": "plain CE anchor: F.cross_entropy(X @ W.T, y), eager (different loss: no margins)",
    "liger": "plain CE anchor: Liger-Kernel LigerFusedLinearCrossEntropyLoss (CUDA; different loss)",
    "cce": "plain CE anchor: Apple cut-cross-entropy linear_cross_entropy (CUDA; different loss)",
    "floor": "the three-GEMM floor: X W^T, then G W and G^T X, same shapes and dtype, nothing else",
}

DEFAULT_LOSSES = {"cuda": ("dbm-ce", "dbm-bs", "ldam", "elm", "arcface", "bs"), "cpu": ("dbm-bs", "ldam", "arcface")}


@dataclass
class BenchConfig:
    """One benchmark run (see ``python -m fused_margin.bench --help``)."""

    device: str = "cpu"
    B: int = 256
    D: int = 512
    C: int = 8142
    dtype: str = "fp32"
    modes: Tuple[str, ...] = ("fwdbwd",)
    losses: Tuple[str, ...] = DEFAULT_LOSSES["cpu"]
    heads: Tuple[str, ...] = ("cosine", "linear")
    impls: Tuple[str, ...] = ALL_IMPLS
    #: extra row kernels to run through the fused plumbing: name -> RowKernel
    row_kernels: Dict[str, object] = field(default_factory=dict)
    compile: str = "first"  # "all" | "first" | "none": which losses get a torch.compile row
    imbalance: float = 100.0
    seed: int = 0
    input_sets: int = 3
    target_time: float = 1.0  # seconds of timed repetitions per case and mode
    min_reps: int = 5
    max_reps: int = 100
    warmup: int = 2
    rounds: int = 1  # timing sweeps over every case (see --rounds)
    check_rows: Optional[int] = None  # rows of the correctness check (None: all rows up to 2**24 elements)
    preset: Optional[str] = None
    threads: Optional[int] = None  # torch.set_num_threads for the run (None: torch's default)
    class_chunk: object = "auto"  # class_chunk of the fused backend rows: "auto", "off" or classes per chunk

    def validate(self) -> None:
        for name in ("B", "D", "C"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.C < 2:
            raise ValueError(f"C must be at least 2, got {self.C}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        _subset("modes", self.modes, MODES)
        _subset("losses", self.losses, LOSSES)
        _subset("heads", self.heads, ("cosine", "linear"))
        _subset("impls", self.impls, ALL_IMPLS)
        if self.compile not in ("all", "first", "none"):
            raise ValueError(f"compile must be 'all', 'first' or 'none', got {self.compile!r}")
        if self.input_sets < 1:
            raise ValueError(f"input_sets must be >= 1, got {self.input_sets}")
        if not 1 <= self.min_reps <= self.max_reps:
            raise ValueError(f"need 1 <= min_reps <= max_reps, got {self.min_reps}, {self.max_reps}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {self.rounds!r}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the first call also measures compile time), got {self.warmup}")
        fm.functional.check_class_chunk(self.class_chunk)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def loss_heads(self) -> List[Tuple[str, str]]:
        """The (loss, head) pairs to run: each loss on the requested heads it supports."""
        return [(loss, head) for loss in self.losses for head in LOSSES[loss].heads if head in self.heads]


def _subset(name, values, allowed):
    if not values:
        raise ValueError(f"{name} is empty")
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{name}: unknown {bad}; choose from {sorted(allowed)}")
