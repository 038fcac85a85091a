"""A real long-tailed run on CPU: ``python -m fused_margin.training.demo [--quick] [--seeds 0 1 2] [--out table.md]``.

scikit-learn's bundled digits (8x8 images, 10 classes, 1,797 examples; no download) are split into a
balanced test set (``--test-per-class`` per class) and a pool from which a long-tailed training set is
drawn (exponential profile, head class = class 0, ``--imbalance`` = n_max / n_min). A small MLP with a
cosine classifier head (:class:`fused_margin.CosineClassifier`, scale 30) is trained with each method:

* ``CE``: softmax cross-entropy on ``30 cos``;
* ``LDAM-DRW``: :class:`fused_margin.LDAMLoss` (max margin 0.5) with :class:`fused_margin.training.drw.DRWSchedule`
  switching the class-balanced weights on at 80% of the epochs (Cao et al. 2019);
* ``DBM-CE``, ``DBM-BS``: :class:`fused_margin.DBMLoss`, plain and with the balanced-softmax offset (AAAI'25);
* ``ELM``: :class:`fused_margin.ELMLoss` (Kato & Hotta);
* ``MARC``: the ``CE`` model, frozen, calibrated by :class:`fused_margin.training.marc.MARC` (Wang et al. ACML'23);
* ``MetaLAD``: :class:`fused_margin.training.metalad.MetaLAD` with a balanced meta set drawn from the training set
  (Wu, "Rethinking Class Imbalance in Machine Learning").

Every method starts from the same initial weights for a given seed and sees the same batches' order
generator. Accuracy is reported overall and on the many / medium / few-shot classes (``--thresholds``:
``terciles`` of the training counts by default, since digits has at most ~130 training examples per class,
or ``100,20``), as mean +- standard deviation over the seeds. The schedule (SGD, momentum 0.9, weight decay
5e-4, learning rate x0.1 at 80% and 90% of the epochs) follows LDAM-DRW's CIFAR recipe, shortened.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

import fused_margin as fm
from fused_margin.training.data import balanced_indices, long_tailed_indices, shot_accuracy, shot_groups
from fused_margin.training.drw import DRWSchedule
from fused_margin.training.marc import MARC, progress_bar
from fused_margin.training.metalad import MetaLAD

METHODS = ("CE", "LDAM-DRW", "DBM-CE", "DBM-BS", "ELM", "MARC", "MetaLAD")
COLUMNS = ("overall", "many", "medium", "few")


@dataclass
class DemoConfig:
    """Everything a demo run depends on."""

    seeds: Sequence[int] = (0, 1, 2, 3, 4)
    imbalances: Sequence[float] = (10.0, 100.0)
    methods: Sequence[str] = METHODS
    epochs: int = 100
    batch_size: int = 32
    lr: float = 0.1
    weight_decay: float = 5e-4
    hidden: int = 128
    feature_dim: int = 64
    scale: float = 30.0
    test_per_class: int = 50
    meta_per_class: int = 10
    thresholds: object = "terciles"
    marc_epochs: int = 20
    marc_lr: float = 0.01
    progress: bool = True
    backend: str = "auto"


class Net(nn.Module):
    """MLP features (64 -> hidden -> feature_dim, ReLU) and a cosine classifier head; ``forward`` returns the
    features so that the loss fuses the classifier (``loss(features, y, weight=net.head.weight)``)."""

    def __init__(self, in_features: int, hidden: int, feature_dim: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim), nn.ReLU())
        self.head = fm.CosineClassifier(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def cosines(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    counts: np.ndarray
    meta_index: torch.Tensor = field(default=None)


def make_split(seed: int, imbalance: float, config: DemoConfig) -> Split:
    """Balanced test split, then a long-tailed training set from the rest (both seeded)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    test, pool = balanced_indices(y, config.test_per_class, seed=seed)
    lt, counts = long_tailed_indices(y[pool], imbalance, profile="exp", seed=seed)
    train = pool[lt]
    meta, _ = balanced_indices(y[train], config.meta_per_class, seed=seed)
    return Split(
        x[train], torch.from_numpy(y[train]), x[test], torch.from_numpy(y[test]), counts, torch.from_numpy(meta)
    )


def _milestones(epochs: int):
    return int(0.8 * epochs), int(0.9 * epochs)


def _batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def train_model(method: str, split: Split, seed: int, config: DemoConfig, desc: str) -> Net:
    """Train the network of ``seed`` with ``method``'s loss; returns it (eval mode)."""
    counts, E = split.counts, config.epochs
    torch.manual_seed(seed)
    net = Net(split.x_train.shape[1], config.hidden, config.feature_dim, len(counts))
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(_milestones(E)), gamma=0.1)
    generator = torch.Generator().manual_seed(seed)
    s, backend = config.scale, config.backend

    criterion = drw = metalad = None
    if method == "LDAM-DRW":
        criterion = fm.LDAMLoss(counts, max_m=0.5, scale=s, backend=backend)
        drw = DRWSchedule(counts, step=max(1, _milestones(E)[0]))
    elif method == "DBM-CE":
        criterion = fm.DBMLoss(counts, variant="ce", scale=s, backend=backend)
    elif method == "DBM-BS":
        criterion = fm.DBMLoss(counts, variant="bs", scale=s, backend=backend)
    elif method == "ELM":
        criterion = fm.ELMLoss(counts, max_m=0.5, scale=s, backend=backend)
    elif method == "MetaLAD":
        metalad = MetaLAD(counts, config.feature_dim, scale=s, warmup_epochs=E // 4, backend=backend)
        meta_x, meta_y = split.x_train[split.meta_index], split.y_train[split.meta_index]
    elif method != "CE":
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")

    bar = progress_bar(range(E), desc, config.progress)
    for epoch in bar:
        net.train()
        if drw is not None:
            drw.apply(criterion, epoch)
        total, seen = 0.0, 0
        for index in _batches(len(split.y_train), config.batch_size, generator):
            x, y = split.x_train[index], split.y_train[index]
            if metalad is not None:
                loss = metalad.train_step(net, x, y, optimizer, epoch, meta_x, meta_y)["loss"]
            else:
                features = net(x)
                if criterion is None:
                    loss_t = fm.margin_cross_entropy(features, y, net.head.weight, scale=s, backend=backend)
                else:
                    loss_t = criterion(features, y, weight=net.head.weight)
                optimizer.zero_grad(set_to_none=True)
                loss_t.backward()
                optimizer.step()
                loss = loss_t.item()
            total, seen = total + loss * len(index), seen + len(index)
        schedule.step()
        bar.set_postfix(loss=f"{total / seen:.3f}")
    net.eval()
    return net


def calibrate_marc(net: Net, split: Split, seed: int, config: DemoConfig, desc: str) -> MARC:
    """MARC's second stage on the frozen network: omega, beta over its cosines and classifier row norms.

    The cosine head scores with the normalised rows ``w_hat_j`` (the raw rows' norms never reach the
    output), so the row norms of the classifier it applies are all 1 and ``beta_j ||w_hat_j||`` is a
    per-class bias."""
    with torch.no_grad():
        cosines = net.cosines(split.x_train)
    norms = torch.ones(len(split.counts))
    marc = MARC(split.counts, scale=config.scale, backend=config.backend)
    marc.fit_on_logits(
        cosines,
        split.y_train,
        norms,
        batch_size=config.batch_size,
        seed=seed,
        epochs=config.marc_epochs,
        lr=config.marc_lr,
        progress=config.progress,
        desc=desc,
    )
    return marc


def evaluate(pred: torch.Tensor, split: Split, config: DemoConfig) -> Dict[str, float]:
    return shot_accuracy(pred.numpy(), split.y_test.numpy(), split.counts, config.thresholds)


def run_demo(config: DemoConfig, log=print) -> Dict[float, Dict[str, List[Dict[str, float]]]]:
    """Train every method on every (imbalance, seed); returns ``results[imbalance][method]`` = one accuracy
    dict per seed."""
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    results: Dict[float, Dict[str, List[Dict[str, float]]]] = {}
    for imbalance in config.imbalances:
        results[imbalance] = {m: [] for m in config.methods}
        for seed in config.seeds:
            split = make_split(seed, imbalance, config)
            groups = shot_groups(split.counts, config.thresholds)
            log(
                f"imbalance {imbalance:g}, seed {seed}: {len(split.y_train)} training examples, counts "
                f"{split.counts.tolist()}, groups many/medium/few = "
                f"{[int((groups == g).sum()) for g in ('many', 'medium', 'few')]}"
            )
            ce_net = None
            for method in config.methods:
                start = time.perf_counter()
                desc = f"imb {imbalance:g} seed {seed} {method}"
                if method == "MARC":
                    net = ce_net if ce_net is not None else train_model("CE", split, seed, config, desc + " (CE)")
                    marc = calibrate_marc(net, split, seed, config, desc)
                    with torch.no_grad():
                        cos = net.cosines(split.x_test)
                        pred = marc.calibrated_logits(cos, torch.ones(len(split.counts))).argmax(1)
                else:
                    net = train_model(method, split, seed, config, desc)
                    if method == "CE":
                        ce_net = net
                    with torch.no_grad():
                        pred = net.cosines(split.x_test).argmax(1)
                acc = evaluate(pred, split, config)
                results[imbalance][method].append(acc)
                log(
                    f"  {method:9s} "
                    + "  ".join(f"{k} {acc[k]:5.1f}" for k in COLUMNS)
                    + f"   ({time.perf_counter() - start:.1f} s)"
                )
    return results


def _cell(values: List[float]) -> str:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return "n/a"
    if arr.size == 1:
        return f"{arr[0]:.1f}"
    return f"{arr.mean():.1f} ± {arr.std(ddof=1):.1f}"


def format_table(results, config: DemoConfig) -> str:
    """A markdown table: one row per (imbalance, method), accuracy mean ± std (sample) over the seeds."""
    lines = [
        f"Digits, long-tailed (exponential profile), balanced test set of {config.test_per_class} per class; "
        f"{config.epochs} epochs; seeds {list(config.seeds)}; shot groups by {config.thresholds!r} of the "
        "training counts. Accuracy in %, mean ± std over seeds.",
        "",
        "| imbalance | method | overall | many | medium | few |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for imbalance, per_method in results.items():
        for method, runs in per_method.items():
            cells = [_cell([run[c] for run in runs]) for c in COLUMNS]
            lines.append(f"| {imbalance:g} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _thresholds(text: str):
    if text == "terciles":
        return text
    try:
        many, few = (float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--thresholds must be 'terciles' or 'MANY,FEW', got {text!r}") from err
    return many, few


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fused_margin.training.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="about a minute: seeds 0 1 2, imbalance 100")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2 3 4; quick: 0 1 2)")
    parser.add_argument("--imbalance", type=float, nargs="+", help="n_max / n_min (default 10 100; quick: 100)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods to compare (default: all)")
    parser.add_argument("--epochs", type=int, help="training epochs (default 100)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--thresholds",
        type=_thresholds,
        default="terciles",
        help="shot groups: 'terciles' (default) or 'MANY,FEW' training-count thresholds, e.g. 100,20",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--backend", default="auto", help="loss backend (default auto)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = parse_args(argv)
    config = DemoConfig(
        seeds=tuple(args.seeds or ((0, 1, 2) if args.quick else (0, 1, 2, 3, 4))),
        imbalances=tuple(args.imbalance or ((100.0,) if args.quick else (10.0, 100.0))),
        methods=tuple(args.methods or METHODS),
        epochs=args.epochs or 100,
        batch_size=args.batch_size,
        thresholds=args.thresholds,
        progress=not args.no_progress,
        backend=args.backend,
    )
    if config.epochs < 1 or config.batch_size < 1:
        raise SystemExit("--epochs and --batch-size must be >= 1")
    status = fm.available_backends("cpu", torch.float32)
    print("fused_margin backends on cpu/float32: " + ", ".join(f"{k}: {v}" for k, v in status.items()))
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run_demo(config)
    finally:
        torch.set_num_threads(threads)
    table = format_table(results, config)
    print()
    print(table)
    print(f"total time {time.perf_counter() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table)
        print(f"table written to {args.out}")
    return table


if __name__ == "__main__":
    main()
