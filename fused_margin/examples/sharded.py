"""Class-sharded training on CPU with gloo, checked against a single-process run.

    python -m fused_margin.examples.sharded                       # spawns 2 ranks itself
    torchrun --nproc_per_node 3 -m fused_margin.examples.sharded  # or under torchrun

An MLP backbone under ``DistributedDataParallel`` feeds a :class:`fused_margin.distributed.
ShardedCosineClassifier` (the classes split across the ranks) trained with a DBM-BS loss on
scikit-learn's bundled digits (made long-tailed; no download). Each rank takes its share of every
batch. Rank 0 then trains the same model, from the same initial weights on the same batches, in one
process with :func:`fused_margin.margin_cross_entropy` on the whole classifier, and prints both loss
trajectories and their largest difference (float64 throughout, so they agree to rounding).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_margin as fm
from fused_margin.distributed import ShardedCosineClassifier


def _data(seed):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    keep, _ = fm.long_tailed_indices(y.numpy(), imbalance=10.0, seed=seed)
    keep = torch.as_tensor(keep, dtype=torch.int64)
    return x[keep], y[keep]


def _backbone(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).double()


def _loss_options(counts):
    return dict(
        scale=16.0,
        margin_type="additive_angular",
        lambda_inst=1.0,
        class_margins=fm.dbm_class_margins(counts, K=0.1).double(),
        logit_offset=fm.log_prior(counts).double(),
    )


def _batches(n, batch, steps, seed):
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(steps * batch // n + 1)])
    return [order[i * batch : (i + 1) * batch] for i in range(steps)]


def single_process(args):
    x, y = _data(args.seed)
    counts = torch.bincount(y, minlength=10)
    backbone = _backbone(args.seed)
    torch.manual_seed(args.seed + 1)
    weight = nn.Parameter(torch.randn(10, 32, dtype=torch.float64) * 0.01)
    opt = torch.optim.SGD(list(backbone.parameters()) + [weight], lr=args.lr, momentum=0.9)
    losses = []
    for idx in _batches(len(y), args.batch, args.steps, args.seed):
        loss = fm.margin_cross_entropy(backbone(x[idx]), y[idx], weight, **_loss_options(counts))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def sharded(rank, world, args):
    x, y = _data(args.seed)
    counts = torch.bincount(y, minlength=10)
    backbone = nn.parallel.DistributedDataParallel(_backbone(args.seed))
    head = ShardedCosineClassifier(32, 10, dtype=torch.float64)
    torch.manual_seed(args.seed + 1)
    head.load_full_weight(torch.randn(10, 32, dtype=torch.float64) * 0.01)  # the single run's initial weight
    opt = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=args.lr, momentum=0.9)
    losses = []
    for idx in _batches(len(y), args.batch, args.steps, args.seed):
        mine = idx.tensor_split(world)[rank]  # this rank's share of the batch (shares may differ by one)
        loss = head(backbone(x[mine]), y[mine], backbone_ddp=True, **_loss_options(counts))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _worker(rank, world, store, args):
    if store is not None:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    else:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        losses = sharded(rank, world, args)
        single = single_process(args) if rank == 0 else None
        dist.barrier()  # the ranks leave together: none tears the group down while another still uses it
        if rank == 0:
            print(f"{'step':>4} {'sharded (' + str(world) + ' ranks)':>22} {'single process':>16}")
            for step in range(0, args.steps, max(1, args.steps // 10)):
                print(f"{step:>4} {losses[step]:>22.10f} {single[step]:>16.10f}")
            diff = max(abs(a - b) for a, b in zip(losses, single))
            print(f"largest difference over {args.steps} steps: {diff:.3g}")
            if diff > 1e-8:
                raise SystemExit("the sharded run does not match the single-process run")
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2, help="ranks to spawn when not under torchrun (default 2)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args.world, os.path.join(tmp, "store"), args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
