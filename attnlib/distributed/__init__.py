"""Sequence parallelism over torch.distributed: Ulysses all-to-all, ring attention, USP, and the
exact log-sum-exp merge of partial attention results. Works with NCCL and gloo."""
from .comm import SPGroups, make_groups
from .merge import merge_attention
from .ring import ring_attention
from .shard import usp_shard, usp_unshard, zigzag_shard, zigzag_unshard
from .ulysses import kv_replication, ulysses_attention, usp_attention

__all__ = [
    "merge_attention", "ulysses_attention", "ring_attention", "usp_attention", "make_groups", "SPGroups",
    "zigzag_shard", "zigzag_unshard", "usp_shard", "usp_unshard", "kv_replication",
]
