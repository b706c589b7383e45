"""AsymRnR (arXiv 2412.11706): asymmetric token reduction and restoration for video DiT attention.

    rnr = attnlib.asymrnr.AsymRnR(grid=(F, H, W), q_ratio=0.5, kv_ratio=0.3)
    out = rnr.attention(q, k, v, step=t, block=i)          # q, k, v with RoPE applied

or stateless through the dispatcher: ``attnlib.attention(q, k, v, method="asymrnr", grid=(F, H, W),
q_ratio=0.5, kv_ratio=0.3)``. The pieces: :func:`partition`, :func:`match`, :func:`plan_reduction`,
:func:`reduce`, :func:`restore`.
"""
from .match import Matches, match
from .module import AsymRnR, asymrnr_attention, reduced_attention
from .partition import Partition, partition
from .reduce import ReductionPlan, plan_reduction, reduce, restore
from .schedule import MatchCache, Schedule

__all__ = ["AsymRnR", "asymrnr_attention", "reduced_attention", "partition", "Partition", "match", "Matches",
           "plan_reduction", "ReductionPlan", "reduce", "restore", "Schedule", "MatchCache"]
