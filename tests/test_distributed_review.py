"""Review regressions for attnlib.distributed on CPU with gloo: one spawned job of 4 ranks, in which
ranks 1..3 form an odd-sized subgroup (its peers are addressed by global rank) and rank 0 stays
outside it; the pytest tests below read back each check's result. Single-process tests follow."""
from __future__ import annotations

import datetime
import json
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from attnlib.distributed import (merge_attention, ring_attention, ulysses_attention, usp_attention, usp_shard,
                                 zigzag_shard)
from attnlib.inputs import from_bhsd, to_bhsd
from attnlib.reference import flash_reference
from attnlib.testing import assert_flash_rule, make_qkv
from spawn_job import run_job

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

WORLD = 4
SUB = [1, 2, 3]   # the odd subgroup; rank 0 is not in it
HEAD_DIM = 8
JOB_TIMEOUT_S = 120


def _quick_group(ranks):
    """A group whose collectives give up after a few seconds: a rank left waiting fails fast."""
    return dist.new_group(ranks, timeout=datetime.timedelta(seconds=10))


def _expect_value_error(fn, *words):
    try:
        fn()
    except ValueError as e:
        missing = [w for w in words if w not in str(e)]
        assert not missing, f"error message lacks {missing}: {e}"
        return
    raise AssertionError("no ValueError raised")


def _check_against_float64(attn, shard, *, world, heads, kv_heads, seq, causal, seed, layout="bshd"):
    """attn on this rank's shards == the float64 single-process reference's shards (out, lse, dq, dk,
    dv), with a loss on both out and lse, within flash_attn's rule against PyTorch in float32."""
    q, k, v = make_qkv(1, heads, seq, HEAD_DIM, kv_heads=kv_heads, layout="bhsd", seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    dout, dlse = torch.randn(q.shape, generator=gen), torch.randn(q.shape[:3], generator=gen)
    refs = {}
    for dtype in (torch.float64, torch.float32):
        qq, kk, vv = (t.to(dtype).requires_grad_() for t in (q, k, v))
        o, l = flash_reference(qq, kk, vv, causal=causal, return_lse=True)
        ((o * dout.to(dtype)).sum() + (l * dlse.to(dtype)).sum()).backward()
        refs[dtype] = {"out": o.detach(), "lse": l.detach(), "dq": qq.grad, "dk": kk.grad, "dv": vv.grad}
    ql, kl, vl = (from_bhsd(shard(t, 2), layout).detach().requires_grad_() for t in (q, k, v))
    out, lse = attn(ql, kl, vl, layout=layout)
    ((to_bhsd(out, layout) * shard(dout, 2)).sum() + (lse * shard(dlse, 2)).sum()).backward()
    got = {"out": to_bhsd(out, layout), "lse": lse, "dq": to_bhsd(ql.grad, layout), "dk": to_bhsd(kl.grad, layout),
           "dv": to_bhsd(vl.grad, layout)}
    for name, x in got.items():
        assert_flash_rule(x, shard(refs[torch.float64][name], 2), shard(refs[torch.float32][name], 2), name=name)


# -- the checks (name -> fn(rank, sub)); sub is the [1, 2, 3] group ---------------------------
def check_odd_world(rank, sub):
    """Three ranks: ring (zigzag causal, GQA) and Ulysses (6 query heads on 2 kv heads, each kv head
    copied 3 times), both layouts, out, lse and gradients against float64."""
    if rank not in SUB:
        return
    r, w = dist.get_rank(sub), len(SUB)
    contiguous = lambda x, dim: x.chunk(w, dim=dim)[r]  # noqa: E731
    zigzag = lambda x, dim: zigzag_shard(x, r, w, dim)  # noqa: E731
    for layout in ("bshd", "bhsd"):
        ring = lambda q, k, v, layout: ring_attention(q, k, v, group=sub, backend="torch", layout=layout,  # noqa: E731
                                                      causal=True, return_lse=True)
        _check_against_float64(ring, zigzag, world=w, heads=4, kv_heads=2, seq=4 * w, causal=True, seed=1,
                               layout=layout)
        uly = lambda q, k, v, layout: ulysses_attention(q, k, v, group=sub, backend="torch",  # noqa: E731
                                                        layout=layout, causal=True, return_lse=True)
        _check_against_float64(uly, contiguous, world=w, heads=6, kv_heads=2, seq=3 * w, causal=True, seed=2,
                               layout=layout)


def check_ring_empty_kv_shards(rank, sub):
    """K/V shards of no token (cross-attention to an empty context): every query row sees no key, so
    out 0, lse -inf and zero gradients, no NaN; the backward completes its exchanges, so the next
    call runs in step (it crashed on a reshape mid-ring and left the ranks out of step: its own group
    here, so that a failure leaves the other checks' groups alone)."""
    sub = _quick_group(SUB)
    if rank not in SUB:
        return
    r, w = dist.get_rank(sub), len(SUB)
    for seq_q in (2, 0):
        q, k, v = (t.requires_grad_() for t in make_qkv(1, 4, seq_q, HEAD_DIM, kv_heads=2, seq_k=0,
                                                        layout="bshd", seed=3 + r))
        out, lse = ring_attention(q, k, v, group=sub, backend="torch", return_lse=True)
        assert (out == 0).all() and torch.isneginf(lse).all(), (out, lse)
        (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
        for name, t in (("q", q), ("k", k), ("v", v)):
            assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all(), name
    _check_against_float64(
        lambda q, k, v, layout: ring_attention(q, k, v, group=sub, backend="torch", layout=layout, return_lse=True),
        lambda x, dim: x.chunk(w, dim=dim)[r], world=w, heads=4, kv_heads=2, seq=2 * w, causal=False, seed=4)


def check_non_member_refused(rank, sub):
    """A rank outside ``group`` is refused with a ValueError naming the group (torch gives its size and
    rank as -1: the ring ran no step and returned zeros). The members meanwhile run the group."""
    solo = [dist.new_group([r]) for r in range(WORLD)][rank]   # every rank creates every group
    if rank in SUB:
        r, w = dist.get_rank(sub), len(SUB)
        _check_against_float64(
            lambda q, k, v, layout: ring_attention(q, k, v, group=sub, backend="torch", layout=layout,
                                                   return_lse=True),
            lambda x, dim: x.chunk(w, dim=dim)[r], world=w, heads=3, kv_heads=1, seq=2 * w, causal=False, seed=5)
        return
    q, k, v = make_qkv(1, 3, 4, HEAD_DIM, layout="bshd", seed=5)
    _expect_value_error(lambda: ring_attention(q, k, v, group=sub, backend="torch"),
                        "ring_attention", "not a member of group", "global rank 0")
    _expect_value_error(lambda: ulysses_attention(q, k, v, group=sub, backend="torch"),
                        "ulysses_attention", "not a member of group")
    _expect_value_error(lambda: usp_attention(q, k, v, ulysses_group=sub, ring_group=solo, backend="torch"),
                        "usp_attention (ulysses_group)", "not a member of group")


def check_usp_ring_group_pairs_other_heads(rank, sub):
    """Ulysses groups {0, 1}, {2, 3} and ring groups {0, 3}, {1, 2} cross in one rank each, yet each
    ring pairs Ulysses rank 0 (heads 0, 1) with Ulysses rank 1 (heads 2, 3): the ring attended one
    rank's queries to another head's keys and returned wrong values without an error."""
    ulysses = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    rings = [dist.new_group([0, 3]), dist.new_group([1, 2])]
    ring = rings[0] if rank in (0, 3) else rings[1]
    q, k, v = (usp_shard(t, ulysses_rank=dist.get_rank(ulysses), ulysses_size=2, ring_rank=dist.get_rank(ring),
                         ring_size=2, dim=1) for t in make_qkv(1, 4, 16, HEAD_DIM, layout="bshd", seed=6))
    _expect_value_error(lambda: usp_attention(q, k, v, ulysses_group=ulysses, ring_group=ring, backend="torch"),
                        "usp_attention (ring group)", "same heads", "ulysses_rank=0", "ulysses_rank=1")


def check_ulysses_mask_heads_raise_together(rank, sub):
    """Ranks 1, 2 hold 3 query heads, rank 3 holds 6, with a 3-head block_mask: rank 3's mask rule
    failed before the shape agreement while the others waited for it there; now all three raise it."""
    quick = _quick_group(SUB)
    if rank not in SUB:
        return
    heads = 6 if rank == 3 else 3
    q, k, v = make_qkv(1, heads, 8, HEAD_DIM, layout="bshd", seed=7)
    mask = torch.ones(1, 3, 6, 6, dtype=torch.bool)
    _expect_value_error(lambda: ulysses_attention(q, k, v, group=quick, method="block_sparse", block_size=(4, 4),
                                                  backend="torch", block_mask=mask), "same shape", "heads_q=6")


def check_dtypes_disagree(rank, sub):
    """Rank 3 in float64, the others in float32: gloo aborted the processes on the exchange of
    buffers of different byte sizes; the shape agreement now names the dtypes on every rank."""
    dtype = torch.float64 if rank == 3 else torch.float32
    q, k, v = make_qkv(1, 4, 4, HEAD_DIM, layout="bshd", dtype=dtype, seed=8)
    for fn in (ring_attention, ulysses_attention):
        quick = _quick_group(list(range(WORLD)))
        _expect_value_error(lambda: fn(q, k, v, group=quick, backend="torch"), "same shape and dtype",
                            "dtype=float32", "rank 3", "dtype=float64")


CHECKS = {   # in this order; dtypes last: without the agreement it kills the processes
    "odd_world": check_odd_world,
    "ring_empty_kv_shards": check_ring_empty_kv_shards,
    "non_member_refused": check_non_member_refused,
    "usp_ring_group_pairs_other_heads": check_usp_ring_group_pairs_other_heads,
    "ulysses_mask_heads_raise_together": check_ulysses_mask_heads_raise_together,
    "dtypes_disagree": check_dtypes_disagree,
}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    sub = dist.new_group(SUB)
    results = {}
    for name, fn in CHECKS.items():
        t0 = time.perf_counter()
        try:
            fn(rank, sub)
            results[name] = {"ok": True, "s": time.perf_counter() - t0}
        except Exception:  # report, keep going: the other checks still run in step
            results[name] = {"ok": False, "error": traceback.format_exc()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:   # after each: a crash keeps the rest
            json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned_results():
    return run_job(_worker, WORLD, JOB_TIMEOUT_S, prefix="attnlib-sp-review-")


@pytest.mark.parametrize("name", list(CHECKS))
def test_distributed_review_check(spawned_results, name):
    results, failure = spawned_results
    missing = [r for r in range(WORLD) if name not in results.get(r, {})]
    if missing:
        pytest.fail(f"ranks {missing} did not report {name}: {failure}")
    errors = [f"rank {r}:\n{res[name]['error']}" for r, res in results.items() if not res[name]["ok"]]
    assert not errors, "\n".join(errors)


# -- single-process tests ---------------------------------------------------------------------
def test_usp_shard_refuses_ranks_outside_the_group():
    """A negative rank indexed the chunks from the end (another rank's tokens, no error); one past
    the end raised IndexError, a size of 0 ZeroDivisionError."""
    x = torch.arange(16).view(1, 16)
    ok = dict(ulysses_rank=0, ulysses_size=2, ring_rank=0, ring_size=2, dim=1)
    for zigzag in (False, True):
        for bad, words in (({"ulysses_rank": -1}, "ulysses_rank -1 outside [0, 2)"),
                           ({"ring_rank": -1}, "ring_rank -1 outside [0, 2)"),
                           ({"ulysses_rank": 2}, "ulysses_rank 2 outside [0, 2)"),
                           ({"ring_rank": 2}, "ring_rank 2 outside [0, 2)"),
                           ({"ulysses_size": 0}, "ulysses_size must be positive")):
            with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
                usp_shard(x, **{**ok, **bad}, zigzag=zigzag)
    with pytest.raises(TypeError, match="ring_rank must be an int, got float"):
        usp_shard(x, **{**ok, "ring_rank": 1.0})
    with pytest.raises(ValueError, match="world must be positive"):
        zigzag_shard(x, 0, 0, 1)


def test_merge_attention_refuses_parts_on_other_devices():
    o, l = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3)
    for outs, lses in (([o, o.to("meta")], [l, l]), ([o, o], [l, l.to("meta")])):
        with pytest.raises(ValueError, match=r"merge_attention: part 1 .* device of outs\[0\] \(cpu\)"):
            merge_attention(outs, lses)
