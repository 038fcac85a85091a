"""fused_margin: fused kernels for margin-based softmax cross-entropy losses (docs/loss.md)."""
from fused_margin.backends import available_backends
from fused_margin.config import config, configure
from fused_margin.core.builders import (class_balanced_weights, dbm_class_margins, drw_weights, ldam_margins, log_prior,
                       long_tailed_counts, marc_weights)
from fused_margin.functional import (arcface_loss, balanced_softmax_loss, cosface_loss, dbm_loss, elm_loss, ldam_loss,
                         logit_adjusted_loss, margin_cross_entropy, set_sync_label_check)
from fused_margin.modules import (ArcFaceLoss, BalancedSoftmaxLoss, CosFaceLoss, CosineClassifier, DBMLoss, ELMLoss,
                      LDAMLoss, LogitAdjustedLoss, MarginLoss)
from fused_margin.core.spec import LossTables, MarginAux, MarginLossSpec
from fused_margin.training import (MARC, ClassStatistics, DRWSchedule, MetaLAD, balanced_indices, class_counts_of,
                       dataset_labels, long_tailed_indices, long_tailed_subset, pair_perturbation_terms, shot_accuracy,
                       shot_groups)

__version__ = "0.1.0"

__all__ = [
    "margin_cross_entropy", "set_sync_label_check", "dbm_loss", "ldam_loss", "elm_loss", "arcface_loss", "cosface_loss",
    "balanced_softmax_loss", "logit_adjusted_loss",
    "MarginLoss", "DBMLoss", "LDAMLoss", "ELMLoss", "ArcFaceLoss", "CosFaceLoss", "BalancedSoftmaxLoss",
    "LogitAdjustedLoss", "CosineClassifier",
    "ldam_margins", "dbm_class_margins", "log_prior", "class_balanced_weights", "drw_weights", "marc_weights",
    "long_tailed_counts",
    "MarginLossSpec", "LossTables", "MarginAux", "available_backends", "config", "configure",
    "DRWSchedule", "MARC", "ClassStatistics", "MetaLAD", "pair_perturbation_terms",
    "long_tailed_indices", "long_tailed_subset", "balanced_indices", "dataset_labels", "class_counts_of",
    "shot_groups", "shot_accuracy",
]
