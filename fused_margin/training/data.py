"""Long-tailed data utilities: a long-tailed subset of any labelled data set, a balanced meta split, and
many / medium / few-shot accuracy.

The subset follows the recipe of CIFAR-LT (Cao et al., LDAM, NeurIPS 2019) and ImageNet-LT (Liu et al.,
OLTR, CVPR 2019): class ``k`` of the chosen class order keeps ``n_k`` examples drawn at random (seeded),
with ``n_k`` from :func:`fused_margin.long_tailed_counts` (exponential, step or Pareto profile). Shot groups
follow the convention of Kang et al. (decoupling, ICLR 2020): many-shot classes have more than 100
training examples, few-shot fewer than 20, medium the rest; for small data sets ``"terciles"`` splits the
classes by rank of their training count instead.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from fused_margin.core import builders

__all__ = [
    "dataset_labels",
    "long_tailed_indices",
    "long_tailed_subset",
    "balanced_indices",
    "class_counts_of",
    "shot_groups",
    "shot_accuracy",
]

GROUPS = ("many", "medium", "few")


def _labels_array(labels, name: str = "labels") -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be >= 0, got {arr.min()}")
    return arr.astype(np.int64)


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return np.random.default_rng(int(seed))


def dataset_labels(dataset) -> np.ndarray:
    """The integer labels of a labelled data set: its ``targets`` or ``labels`` attribute (torchvision),
    the label tensor of a ``TensorDataset`` (its last tensor), else ``dataset[i][1]`` for every ``i``."""
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return _labels_array(getattr(dataset, attr), f"dataset.{attr}")
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return _labels_array(dataset.tensors[-1], "the TensorDataset's last tensor")
    return _labels_array([int(dataset[i][1]) for i in range(len(dataset))], "dataset[i][1]")


def class_counts_of(labels, num_classes: Optional[int] = None) -> np.ndarray:
    """Examples per class (``np.bincount``), length ``num_classes`` (default ``max(label) + 1``)."""
    arr = _labels_array(labels)
    return np.bincount(arr, minlength=0 if num_classes is None else num_classes)


def long_tailed_indices(
    labels,
    imbalance: float,
    profile: str = "exp",
    n_max: Optional[int] = None,
    seed: int = 0,
    class_order: Union[str, Sequence[int]] = "index",
    num_classes: Optional[int] = None,
    step_fraction: float = 0.5,
    pareto_alpha: float = 6.0,
) -> Tuple[np.ndarray, np.ndarray]:
    """Indices of a long-tailed subset of the examples with ``labels``, and its per-class counts.

    The ``k``-th class of ``class_order`` keeps ``n_k = long_tailed_counts(C, n_max, imbalance, profile)[k]``
    of its examples, drawn without replacement with ``seed``. ``class_order``: ``"index"`` (class 0 is
    the head, as CIFAR-LT), ``"random"`` (a seeded permutation) or an explicit permutation of the classes.
    ``n_max`` defaults to the smallest class size, so every class can fill its quota.

    Returns ``(indices, counts)``: sorted int64 indices into ``labels`` and the counts per class id (C).
    """
    arr = _labels_array(labels)
    C = int(arr.max()) + 1 if num_classes is None else int(num_classes)
    available = np.bincount(arr, minlength=C)
    if available.size != C:
        raise ValueError(f"labels go up to {available.size - 1} but num_classes is {C}")
    if np.any(available == 0):
        raise ValueError(f"class {int(np.flatnonzero(available == 0)[0])} has no examples in labels")
    rng = _rng(seed)
    if isinstance(class_order, str):
        if class_order == "index":
            order = np.arange(C)
        elif class_order == "random":
            order = rng.permutation(C)
        else:
            raise ValueError(f"class_order must be 'index', 'random' or a permutation, got {class_order!r}")
    else:
        order = np.asarray(class_order, dtype=np.int64)
        if order.shape != (C,) or not np.array_equal(np.sort(order), np.arange(C)):
            raise ValueError(f"class_order must be a permutation of range({C}), got {class_order!r}")
    if n_max is None:
        n_max = int(available.min())
    quota = builders.long_tailed_counts(C, int(n_max), imbalance, profile, step_fraction, pareto_alpha).numpy()
    counts = np.zeros(C, dtype=np.int64)
    counts[order] = quota
    short = np.flatnonzero(counts > available)
    if short.size:
        c = int(short[0])
        raise ValueError(f"n_max={n_max} asks class {c} for {counts[c]} examples but it has {available[c]}")
    chosen = [rng.choice(np.flatnonzero(arr == c), size=counts[c], replace=False) for c in range(C)]
    return np.sort(np.concatenate(chosen)).astype(np.int64), counts


def long_tailed_subset(dataset, imbalance: float, **options):
    """A ``torch.utils.data.Subset`` of ``dataset`` made long-tailed by :func:`long_tailed_indices`;
    returns ``(subset, counts)``."""
    indices, counts = long_tailed_indices(dataset_labels(dataset), imbalance, **options)
    return torch.utils.data.Subset(dataset, indices.tolist()), counts


def balanced_indices(
    labels, per_class: int, seed: int = 0, num_classes: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """A balanced split: ``min(per_class, n_c)`` examples of every class drawn with ``seed``.

    Returns ``(chosen, rest)``, sorted indices into ``labels``. Used for a balanced test split and for
    MetaLAD's small balanced meta set (which may be drawn from the training set, as in Meta-Weight-Net).
    """
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class must be an int >= 1, got {per_class!r}")
    arr = _labels_array(labels)
    C = int(arr.max()) + 1 if num_classes is None else int(num_classes)
    rng = _rng(seed)
    chosen = []
    for c in range(C):
        members = np.flatnonzero(arr == c)
        chosen.append(rng.choice(members, size=min(int(per_class), members.size), replace=False))
    chosen = np.sort(np.concatenate(chosen)).astype(np.int64)
    rest = np.setdiff1d(np.arange(arr.size), chosen).astype(np.int64)
    return chosen, rest


def shot_groups(class_counts, thresholds: Union[str, Tuple[float, float]] = (100, 20)) -> np.ndarray:
    """The shot group of every class from its training count: an array of ``"many"``, ``"medium"``,
    ``"few"``.

    ``thresholds=(many, few)``: many-shot ``n > many``, few-shot ``n < few``, medium otherwise (the standard
    ``(100, 20)``). ``"terciles"``: classes sorted by count (descending, ties by class index) and split
    into three nearly equal parts, the larger parts first, for data sets too small for absolute thresholds.
    """
    n = builders.as_class_counts(class_counts)
    if isinstance(thresholds, str):
        if thresholds != "terciles":
            raise ValueError(f"thresholds must be (many, few) or 'terciles', got {thresholds!r}")
        order = np.argsort(-n, kind="stable")
        groups = np.empty(n.size, dtype=object)
        for name, part in zip(GROUPS, np.array_split(order, 3)):
            groups[part] = name
        return groups.astype(str)
    many, few = thresholds
    if not few <= many:
        raise ValueError(f"thresholds must be (many, few) with few <= many, got {thresholds!r}")
    return np.where(n > many, "many", np.where(n < few, "few", "medium"))


def shot_accuracy(
    pred, target, class_counts, thresholds: Union[str, Tuple[float, float]] = (100, 20)
) -> Dict[str, float]:
    """Accuracy overall and per shot group, in percent.

    ``overall`` is the fraction of correct predictions; a group's accuracy is the mean over its classes of
    the per-class accuracy (as the decoupling code's ``shot_acc``; on a balanced test set the two agree).
    A group with no class, or whose classes have no test example, is NaN.
    """
    pred, target = _labels_array(pred, "pred"), _labels_array(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same length, got {pred.size} and {target.size}")
    groups = shot_groups(class_counts, thresholds)
    C = groups.size
    if target.size and target.max() >= C:
        raise ValueError(f"target holds class {target.max()} but class_counts has only {C} classes")
    correct = np.bincount(target, weights=(pred == target).astype(np.float64), minlength=C)
    tested = np.bincount(target, minlength=C)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = correct / tested
    result = {"overall": 100.0 * float((pred == target).mean()) if target.size else float("nan")}
    for name in GROUPS:
        members = (groups == name) & (tested > 0)
        result[name] = 100.0 * float(per_class[members].mean()) if members.any() else float("nan")
    return result
