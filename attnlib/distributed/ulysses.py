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
import weakref
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..dispatch import check_method
from ..inputs import check_layout, validate_qkv
from . import comm
from .ring import check_ring_method, require_initialized, ring_attention

# method options indexed by query head on dim 1, which the local attention must see for its own heads
_HEAD_INDEXED_OPTIONS = ("block_mask",)


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


# id(option tensor) -> (weak reference to it, {(start, count): slice}); an entry leaves with its tensor
_HEAD_SLICES: dict = {}


def _head_slice(t: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """``t[:, start:start + count]``, the same tensor object on every call for one ``t``, so the
    block-index cache (keyed by mask object and version) still hits across layers and steps.
    Cut from ``t.detach()``: it shares t's version counter (in-place writes to t are seen) and
    holds no reference to t itself, so t and, through the weak reference, its entry die together."""
    key = id(t)
    entry = _HEAD_SLICES.get(key)
    if entry is None or entry[0]() is not t:
        def drop(ref, key=key):
            if _HEAD_SLICES.get(key, (None,))[0] is ref:
                del _HEAD_SLICES[key]
        entry = _HEAD_SLICES[key] = (weakref.ref(t, drop), {})
    memo = entry[1]
    if (start, count) not in memo:
        memo[(start, count)] = t.detach().narrow(1, start, count)
    return memo[(start, count)]


def _local_head_options(options: dict, *, heads_q: int, rank: int, world: int, what: str) -> dict:
    """Options indexed by query head (block_mask) for this rank's heads [rank H/P, (rank+1) H/P):
    given for all Hq heads, each rank takes its rows; one head (for every head) or this rank's Hq/P
    pass as they are; anything else is refused here, before any exchange, naming the global count."""
    local = heads_q // world
    out = dict(options)
    for name in _HEAD_INDEXED_OPTIONS:
        t = options.get(name)
        if world == 1 or not isinstance(t, torch.Tensor) or t.dim() != 4:
            continue  # the method's own validation judges it
        h = t.shape[1]
        if h == heads_q:
            out[name] = _head_slice(t, rank * local, local)
        elif h not in (1, local):
            raise ValueError(f"{what}: {name} must cover all {heads_q} query heads (each rank applies the "
                             f"{local} of its own), this rank's {local}, or 1 head for all; got {h} heads "
                             f"(shape {tuple(t.shape)})")
    return out


def _ulysses(q, k, v, *, group, layout: str, local: Callable, return_lse: bool, what: str,
             agreed: Optional[Callable[[], None]] = None):
    """all-to-all (seq -> heads), ``local(q, k, v) -> (out, lse)`` in ``layout``, all-to-all back.
    ``agreed()`` runs the caller's own checks once the ranks agree on the shapes, before any exchange."""
    layout = check_layout(layout)
    qb, kb, vb = validate_qkv(q, k, v, layout)
    world = comm.group_size(group)
    # the shapes are agreed first: a rule checked on one rank's shape alone (heads % world) would
    # let that rank raise while the others wait for it in the next collective
    comm.check_same_shapes(what, {
        "batch": qb.shape[0], "heads_q": qb.shape[1], "heads_kv": kb.shape[1], "seq_q": qb.shape[2],
        "seq_k": kb.shape[2], "head_dim": qb.shape[3], "head_dim_v": vb.shape[3],
        "dtype": qb.dtype}, group, qb.device)
    if qb.shape[1] % world:
        raise ValueError(f"{what}: Ulysses splits heads over the group: query heads ({qb.shape[1]}) must be a "
                         f"multiple of the group size ({world}); a smaller Ulysses group with ring attention "
                         f"across groups (usp_attention, make_groups) or ring_attention alone has no such limit")
    if agreed is not None:
        agreed()
    rep = kv_replication(qb.shape[1], kb.shape[1], world)
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
    all-to-alls. A per-head option (block_mask) is given as for single-process attention, over
    all Hq heads (or one head for all), and each rank applies its own heads' rows. Returns this
    rank's output shard (and lse (B, Hq, S/P) with ``return_lse``).
    """
    require_initialized("ulysses_attention")
    comm.require_member(group, "ulysses_attention")
    check_method(method)
    from ..api import attention

    qb, _, _ = validate_qkv(q, k, v, check_layout(layout))
    local_options: dict = {}

    def agreed():  # after the shape agreement: a rank whose head count breaks a rule raises with all the others
        local_options.update(_local_head_options(method_options, heads_q=qb.shape[1], rank=comm.group_rank(group),
                                                 world=comm.group_size(group), what="ulysses_attention"))

    def local(q, k, v):
        r = attention(q, k, v, method=method, backend=backend, layout=layout, causal=causal, scale=scale,
                      return_lse=return_lse, **local_options)
        return r if return_lse else (r, None)

    return _ulysses(q, k, v, group=group, layout=layout, local=local, return_lse=return_lse,
                    what="ulysses_attention", agreed=agreed)


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ulysses_group: Optional[dist.ProcessGroup],
                  ring_group: Optional[dist.ProcessGroup], method: str = "flash", backend: str = "auto",
                  layout: str = "bshd", causal: bool = False, scale: Optional[float] = None,
                  return_lse: bool = False):
    """Ulysses inside ``ulysses_group``, ring attention across ``ring_group`` (from :func:`make_groups`;
    the two groups must cross in this rank alone).

    Shard the sequence with :func:`usp_shard` (``zigzag=causal``): each ring rank's part of
    the sequence (zigzag when causal) is cut into ulysses_size contiguous pieces. Hq must be a
    multiple of the Ulysses group size. Returns this rank's output shard in the input's
    layout (and lse (B, Hq, S/P) with ``return_lse``).
    """
    require_initialized("usp_attention")
    comm.require_member(ulysses_group, "usp_attention (ulysses_group)")
    comm.require_member(ring_group, "usp_attention (ring_group)")
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v))
    check_ring_method(method, "usp_attention", needs_grad)  # before the first exchange
    shared = set(comm.group_ranks(ulysses_group)) & set(comm.group_ranks(ring_group))
    if len(shared) > 1:  # the ring would treat another rank's heads (or the same tokens) as new keys
        raise ValueError(f"usp_attention: ulysses_group and ring_group share ranks {sorted(shared)}; they must "
                         f"cross in this rank alone (None means the world for either): build them with "
                         f"make_groups")
    # the ring attends its ranks' queries to each other's keys, so they must hold the same heads: one
    # place in Ulysses groups of one size (groups that cross in one rank may still pair other heads)
    qb, _, _ = validate_qkv(q, k, v, check_layout(layout))
    comm.check_same_shapes("usp_attention (ring group)", {
        "ulysses_size": comm.group_size(ulysses_group), "ulysses_rank": comm.group_rank(ulysses_group)},
        ring_group, qb.device, rule="the ranks of a ring group must hold the same heads, so the same rank in "
                                    "Ulysses groups of the same size (make_groups builds such groups)")

    def local(q, k, v):
        return ring_attention(q, k, v, group=ring_group, method=method, backend=backend, layout=layout,
                              causal=causal, zigzag=True, scale=scale, return_lse=True)

    return _ulysses(q, k, v, group=ulysses_group, layout=layout, local=local, return_lse=return_lse,
                    what="usp_attention (ulysses group)")
