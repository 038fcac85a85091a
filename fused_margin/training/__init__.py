"""Training procedures built on the loss (the second layer of docs/design.md): the DRW schedule, MARC
calibration, MetaLAD's logit perturbation, long-tailed data helpers and the digits demo
(``python -m fused_margin.training.demo``). The kernels and the loss live in the package root."""

from fused_margin.training.data import (
    balanced_indices,
    class_counts_of,
    dataset_labels,
    long_tailed_indices,
    long_tailed_subset,
    shot_accuracy,
    shot_groups,
)
from fused_margin.training.drw import DRWSchedule
from fused_margin.training.marc import MARC
from fused_margin.training.metalad import ClassStatistics, MetaLAD, pair_perturbation_terms

__all__ = [
    "DRWSchedule",
    "MARC",
    "ClassStatistics",
    "MetaLAD",
    "pair_perturbation_terms",
    "long_tailed_indices",
    "long_tailed_subset",
    "balanced_indices",
    "dataset_labels",
    "class_counts_of",
    "shot_groups",
    "shot_accuracy",
]
