"""Ulysses (DeepSpeed-Ulysses, Jacobs et al. 2023) and USP (Fang & Zhao, "USP: A Unified Sequence
Parallelism Approach", 2024) attention.

Ulysses: each rank holds S/P tokens of all H heads. An all-to-all over the group turns that
into all S tokens of H/P heads, attention runs locally (any attnlib method, the whole
sequence per head), and a second all-to-all restores the sequence sharding. Per rank it moves
q, k, v and out once each, (P-1)/P of the local shard every time.

USP: Ulysses inside a group of U ranks and ring attention across R such groups: the
all-to-all gathers the group's part of the sequence for H/U heads, ring attention runs that
part against the other groups' parts, the all-to-all scatters back.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..dispatch import check_method
from ..inputs import check_layout, validate_qkv
from . import comm
from .ring import require_initialized, ring_attention


def kv_replication(heads_q: int, heads_kv: int, world: int) -> int:
    """How many copies of each K/V head the all-to-all needs so every rank gets whole GQA groups.

    The kv heads are repeated (in place, as ``expand_kv`` does) up to lcm(heads_kv, world)
    heads: that count splits evenly over the ranks and still divides heads_q, and query head h
    keeps reading a copy of kv head h // (heads_q // heads_kv). With heads_kv a multiple of the
    group size nothing is copied.
    """
    if heads_q % world:
        raise ValueError(f"Ulysses splits heads over the group: query heads ({heads_q}) must be a "
                         f"multiple of the group size ({world})")
    target = math.lcm(heads_kv, world)
    if heads_q % target:  # cannot happen when heads_q % heads_kv == 0 == heads_q % world
        raise ValueError(f"cannot spread {heads_kv} kv heads over {world} ranks for {heads_q} query heads")
    return target // heads_kv


def _ulysses(q, k, v, *, group, layout: str, local: Callable, return_lse: bool, what: str):
    """all-to-all (seq -> heads), ``local(q, k, v) -> (out, lse)`` in ``layout``, all-to-all back."""
    layout = check_layout(layout)
    qb, kb, vb = validate_qkv(q, k, v, layout)
    world = comm.group_size(group)
    rep = kv_replication(qb.shape[1], kb.shape[1], world)
    comm.check_same_shapes(what, {
        "batch": qb.shape[0], "heads_q": qb.shape[1], "heads_kv": kb.shape[1], "seq_q": qb.shape[2],
        "seq_k": kb.shape[2], "head_dim": qb.shape[3], "head_dim_v": vb.shape[3]}, group, qb.device)
    head_dim, seq_dim = (1, 2) if layout == "bhsd" else (2, 1)
    if rep > 1:
        k, v = (t.repeat_interleave(rep, dim=head_dim) for t in (k, v))
    q, k, v = (comm.all_to_all(t, group, scatter_dim=head_dim, gather_dim=seq_dim) for t in (q, k, v))
    out, lse = local(q, k, v)
    out = comm.all_to_all(out, group, scatter_dim=seq_dim, gather_dim=head_dim)
    if not return_lse:
        return out
    return out, comm.all_to_all(lse, group, scatter_dim=2, gather_dim=1)  # lse is (B, H, S)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      group: Optional[dist.ProcessGroup] = None, method: str = "flash", backend: str = "auto",
                      layout: str = "bshd", causal: bool = False, scale: Optional[float] = None,
                      return_lse: bool = False, **method_options: Any):
    """Attention over a sequence sharded across ``group`` (default: world), by head all-to-all.

    Each rank passes its contiguous shard (rank r holds tokens [r S/P, (r+1) S/P)): q
    (B, S/P, Hq, D), k, v (B, S/P, Hkv, D) for layout "bshd" ((B, H, S/P, D) for "bhsd"),
    the same shape on every rank. Hq must be a multiple of P; kv heads are replicated as
    needed (:func:`kv_replication`). The local attention is ``attnlib.attention`` with
    ``method``, ``backend``, ``causal``, ``scale`` and ``method_options`` on the whole sequence
    of Hq/P heads, so its backward is the method's own, and autograd runs through the
    all-to-alls. Returns this rank's output shard (and lse (B, Hq, S/P) with ``return_lse``).
    """
    require_initialized("ulysses_attention")
    check_method(method)
    from ..api import attention

    def local(q, k, v):
        r = attention(q, k, v, method=method, backend=backend, layout=layout, causal=causal, scale=scale,
                      return_lse=return_lse, **method_options)
        return r if return_lse else (r, None)

    return _ulysses(q, k, v, group=group, layout=layout, local=local, return_lse=return_lse,
                    what="ulysses_attention")


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ulysses_group: Optional[dist.ProcessGroup],
                  ring_group: Optional[dist.ProcessGroup], method: str = "flash", backend: str = "auto",
                  layout: str = "bshd", causal: bool = False, scale: Optional[float] = None,
                  return_lse: bool = False):
    """Ulysses inside ``ulysses_group``, ring attention across ``ring_group`` (from :func:`make_groups`).

    Shard the sequence with :func:`usp_shard` (``zigzag=causal``): each ring rank's part of
    the sequence (zigzag when causal) is cut into ulysses_size contiguous pieces. Hq must be a
    multiple of the Ulysses group size. Returns this rank's output shard in the input's
    layout (and lse (B, Hq, S/P) with ``return_lse``).
    """
    require_initialized("usp_attention")
    check_method(method)

    def local(q, k, v):
        return ring_attention(q, k, v, group=ring_group, method=method, backend=backend, layout=layout,
                              causal=causal, zigzag=True, scale=scale, return_lse=True)

    return _ulysses(q, k, v, group=ulysses_group, layout=layout, local=local, return_lse=return_lse,
                    what="usp_attention (ulysses group)")
