"""The class-sharded margin loss on ``torch.distributed`` (the classifier split across ranks by class):
:func:`sharded_margin_cross_entropy`, :class:`ShardedCosineClassifier` and :func:`even_shards`. How it
works, what it costs and what it checks: :mod:`fused_margin.paths.sharded`."""

from fused_margin.paths.sharded import ShardedCosineClassifier, even_shards, sharded_margin_cross_entropy

__all__ = ["sharded_margin_cross_entropy", "ShardedCosineClassifier", "even_shards"]
