"""Sequence parallelism (attnlib.distributed) on CPU with gloo: one spawned job of 4 ranks runs
every distributed check on the whole world (group size 4), on two pairs at once (group size 2) or
on each rank alone (group size 1); the pytest tests below read back each check's result."""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist

import attnlib
from attnlib.distributed import (make_groups, merge_attention, ring_attention, ulysses_attention, usp_attention,
                                 usp_shard, usp_unshard, zigzag_shard, zigzag_unshard)
from attnlib.inputs import from_bhsd, to_bhsd
from attnlib.reference import flash_reference
from attnlib.reference._common import causal_mask, masked_softmax_attention
from attnlib.testing import assert_flash_rule, make_qkv, metrics
from spawn_job import run_job

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

HEAD_DIM = 8
SEQ = {1: 8, 2: 16, 4: 32}    # total tokens by group size: 2P chunks of 4 for zigzag
JOB_TIMEOUT_S = 150


# -- helpers run inside the workers -----------------------------------------------------------
def _full_problem(world, *, heads=4, kv_heads=None, seq_k=None, seed=0):
    """The same full-sequence problem on every rank (bshd, fp32) and fixed upstream gradients for
    out and lse. Only the test holds the full sequence, to shard it and to check against."""
    q, k, v = make_qkv(1, heads, SEQ[world], HEAD_DIM, kv_heads=kv_heads, seq_k=seq_k, layout="bshd", seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=gen)
    dlse = torch.randn(q.shape[0], q.shape[1], q.shape[2], generator=gen).transpose(1, 2)  # (B, H, S)
    return q, k, v, dout, dlse


def _reference(q, k, v, dout, dlse, causal, dtype):
    """Full-sequence out, lse and grads of q, k, v (bshd) in ``dtype``; the loss includes lse."""
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = flash_reference(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), causal=causal,
                               return_lse=True)
    out = out.transpose(1, 2)
    loss = (out * dout.to(dtype)).sum() + (0 if dlse is None else (lse * dlse.to(dtype)).sum())
    loss.backward()
    return out.detach(), lse.detach(), qq.grad, kk.grad, vv.grad


def _check_sp(world, attn, shard, *, causal, heads=4, kv_heads=None, seq_k=None, with_lse=False, seed=0,
              dtype=torch.float32):
    """attn(q, k, v) on this rank's shards (in ``dtype``) == the float64 reference's shards, forward
    and backward, within flash_attn's rule against PyTorch in ``dtype``."""
    q, k, v, dout, dlse = _full_problem(world, heads=heads, kv_heads=kv_heads, seq_k=seq_k, seed=seed)
    dlse = dlse if with_lse else None
    ref64 = _reference(q, k, v, dout, dlse, causal, torch.float64)
    ref32 = _reference(q, k, v, dout, dlse, causal, dtype)
    ql, kl, vl = (shard(t, 1).detach().to(dtype).requires_grad_() for t in (q, k, v))
    res = attn(ql, kl, vl)
    out, lse = res if with_lse else (res, None)
    loss = (out * shard(dout, 1)).sum()
    if with_lse:
        loss = loss + (lse * shard(dlse, 2)).sum()
    loss.backward()
    got = [("out", out, 1), ("dq", ql.grad, 1), ("dk", kl.grad, 1), ("dv", vl.grad, 1)]
    refs = [ref64[0], ref64[2], ref64[3], ref64[4]], [ref32[0], ref32[2], ref32[3], ref32[4]]
    if with_lse:
        got.append(("lse", lse, 2))
        refs[0].append(ref64[1])
        refs[1].append(ref32[1])
    for (name, x, dim), r64, r32 in zip(got, *refs):
        assert x is not None, f"{name} missing"
        assert_flash_rule(x, shard(r64, dim), shard(r32, dim), name=name)


def _contiguous(rank, world):
    return lambda x, dim: x.chunk(world, dim=dim)[rank]


def _zigzag(rank, world):
    return lambda x, dim: zigzag_shard(x, rank, world, dim)


def _expect_value_error(fn, *words):
    try:
        fn()
    except ValueError as e:
        msg = str(e)
        missing = [w for w in words if w not in msg]
        assert not missing, f"error message lacks {missing}: {msg}"
        return
    raise AssertionError("no ValueError raised")


# -- the checks (name -> fn(rank, world)); all ranks run the same sequence of collectives -------
def check_ulysses(rank, world, group):
    f = lambda q, k, v: ulysses_attention(q, k, v, group=group, backend="torch")  # noqa: E731
    _check_sp(world, f, _contiguous(rank, world), causal=False)


def check_ulysses_causal_gqa_lse(rank, world, group):
    # 8 query heads on 2 kv heads: on 4 ranks each kv head is replicated twice
    f = lambda q, k, v: ulysses_attention(q, k, v, group=group, backend="torch", causal=True,
                                                    return_lse=True)  # noqa: E731
    _check_sp(world, f, _contiguous(rank, world), causal=True, heads=8, kv_heads=2, with_lse=True, seed=1)


def check_ulysses_bhsd(rank, world, group):
    def f(q, k, v):
        out = ulysses_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), group=group,
                                backend="torch", layout="bhsd")
        return out.transpose(1, 2)
    _check_sp(world, f, _contiguous(rank, world), causal=False, seed=2)


def check_ring(rank, world, group):
    f = lambda q, k, v: ring_attention(q, k, v, group=group, backend="torch")  # noqa: E731
    _check_sp(world, f, _contiguous(rank, world), causal=False, heads=4, kv_heads=2, seed=3)


def check_ring_causal_zigzag_lse(rank, world, group):
    f = lambda q, k, v: ring_attention(q, k, v, group=group, backend="torch", causal=True,  # noqa: E731
                                       return_lse=True)  # noqa: E731
    _check_sp(world, f, _zigzag(rank, world), causal=True, heads=4, kv_heads=2, with_lse=True, seed=4)


def check_ring_causal_contiguous(rank, world, group):
    f = lambda q, k, v: ring_attention(q, k, v, group=group, backend="torch", causal=True,  # noqa: E731
                                       zigzag=False)  # noqa: E731
    _check_sp(world, f, _contiguous(rank, world), causal=True, seed=5)


def _usp_check(rank, world, causal, seed):
    groups = make_groups(2, world // 2)
    shard = lambda x, dim: usp_shard(x, ulysses_rank=groups.ulysses_rank, ulysses_size=2,  # noqa: E731
                                     ring_rank=groups.ring_rank, ring_size=world // 2, dim=dim, zigzag=causal)
    f = lambda q, k, v: usp_attention(q, k, v, ulysses_group=groups.ulysses, ring_group=groups.ring,  # noqa: E731
                                      backend="torch", causal=causal, return_lse=causal)
    _check_sp(world, f, shard, causal=causal, with_lse=causal, seed=seed)


def check_usp(rank, world, group):
    _usp_check(rank, world, False, 6)


def check_usp_causal_lse(rank, world, group):
    _usp_check(rank, world, True, 7)


def check_errors(rank, world, group):
    q, k, v = make_qkv(1, 4, 4 + rank, HEAD_DIM, layout="bshd", seed=0)   # uneven shards
    _expect_value_error(lambda: ulysses_attention(q, k, v, group=group, backend="torch"),
                        "same shape", "rank 0", "seq_q=4")
    _expect_value_error(lambda: ring_attention(q, k, v, group=group, backend="torch"),
                        "same shape", "rank 1", "seq_q=5")
    q, k, v = make_qkv(1, 3, 4, HEAD_DIM, layout="bshd", seed=0)           # 3 heads over 2 or 4 ranks
    _expect_value_error(lambda: ulysses_attention(q, k, v, group=group), "ulysses_attention", "query heads (3)",
                        f"group size ({world})", "usp_attention")
    q, k, v = make_qkv(1, 4, 3, HEAD_DIM, layout="bshd", seed=0)           # odd zigzag shard
    _expect_value_error(lambda: ring_attention(q, k, v, group=group, causal=True), "even")
    _expect_value_error(lambda: make_groups(3, dist.get_world_size()), "must divide the world size")
    _expect_value_error(lambda: make_groups(0, 2), "positive")


def check_ulysses_causal_bottom_right(rank, world, group):
    # Sq > Sk under causal: the first Sq - Sk queries (the first half of the ranks') see no key:
    # out 0, lse -inf
    f = lambda q, k, v: ulysses_attention(q, k, v, group=group, backend="torch", causal=True,  # noqa: E731
                                          return_lse=True)
    _check_sp(world, f, _contiguous(rank, world), causal=True, seq_k=SEQ[world] // 2, with_lse=True, seed=11)


def check_ring_cross_lengths(rank, world, group):
    f = lambda q, k, v: ring_attention(q, k, v, group=group, backend="torch", return_lse=True)  # noqa: E731
    _check_sp(world, f, _contiguous(rank, world), causal=False, seq_k=SEQ[world] // 2, with_lse=True, seed=12)


def check_ring_causal_zigzag_bf16(rank, world, group):
    # bf16 shards travel as bf16; steps merge in float32 and the output is rounded once
    f = lambda q, k, v: ring_attention(q, k, v, group=group, backend="torch", causal=True,  # noqa: E731
                                       return_lse=True)
    _check_sp(world, f, _zigzag(rank, world), causal=True, with_lse=True, seed=13, dtype=torch.bfloat16)


def check_group_of_one(rank, world, group):
    # a group of one rank: no exchange, the local attention on the whole sequence
    whole = lambda x, dim: x  # noqa: E731
    for fn, kw in ((ulysses_attention, {}), (ring_attention, {}), (ring_attention, {"zigzag": False})):
        f = lambda q, k, v: fn(q, k, v, group=group, backend="torch", causal=True, return_lse=True, **kw)  # noqa: E731
        _check_sp(world, f, whole, causal=True, heads=4, kv_heads=2, with_lse=True, seed=14)


def check_usp_beside_data_parallel(rank, world, group):
    """make_groups tiles the world with SP blocks of ulysses_size x ring_size ranks (the rest of
    the world is data or CFG parallel): each block runs its own copy of the problem."""
    for u, r in ((2, 1), (1, 2)):
        groups = make_groups(u, r)
        shard = lambda x, dim: usp_shard(x, ulysses_rank=groups.ulysses_rank, ulysses_size=u,  # noqa: E731
                                         ring_rank=groups.ring_rank, ring_size=r, dim=dim, zigzag=True)
        f = lambda q, k, v: usp_attention(q, k, v, ulysses_group=groups.ulysses, ring_group=groups.ring,  # noqa: E731
                                          backend="torch", causal=True, return_lse=True)
        _check_sp(u * r, f, shard, causal=True, with_lse=True, seed=15)
    _expect_value_error(lambda: make_groups(3, 1), "ulysses_size x ring_size", "divide the world size")


def check_usp_groups_must_cross(rank, world, group):
    """Ulysses and ring groups that share more than this rank (both left None: the world twice)
    would attend one rank's heads to another's: refused before any exchange."""
    q, k, v = (_contiguous(rank, world)(t, 1) for t in make_qkv(1, 4, SEQ[world], HEAD_DIM, layout="bshd"))
    _expect_value_error(lambda: usp_attention(q, k, v, ulysses_group=None, ring_group=None, backend="torch"),
                        "usp_attention", "share ranks")
    _expect_value_error(lambda: usp_attention(q, k, v, ulysses_group=group, ring_group=group, backend="torch"),
                        "usp_attention", "share ranks")


def check_packed_qkv(rank, world, group):
    # q, k, v as strided views of one packed (B, S, 3, H, D) projection, as DiT blocks make them
    for fn in (ulysses_attention, ring_attention):
        f = lambda q, k, v: fn(*torch.stack([q, k, v], dim=2).unbind(2), group=group, backend="torch")  # noqa: E731
        _check_sp(world, f, _contiguous(rank, world), causal=False, seed=16)


def check_disagreeing_ranks_raise_together(rank, world, group):
    """One rank's shard breaks a rule that the others' shards keep: every rank raises the shape
    table at once, none waits in a collective for the rank that gave up (each call gets its own
    group with a short timeout, so a rank left waiting fails fast and leaves no pending op)."""
    odd = rank == world - 1
    cases = [  # (function, kwargs, q/k/v shapes on this rank as (heads, seq_q, seq_k))
        (ring_attention, {"causal": True}, (4, 5 if odd else 4, 5 if odd else 4)),   # odd zigzag shard
        (ring_attention, {"causal": True}, (4, 4, 6 if odd else 4)),                   # seq_q != seq_k
        (ulysses_attention, {}, (2 if odd else 4, 4, 4)),                              # heads % world
    ]
    for fn, kw, (heads, sq, sk) in cases:
        quick = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=10))
        q, k, v = make_qkv(1, heads, sq, HEAD_DIM, seq_k=sk, layout="bshd", seed=0)
        _expect_value_error(lambda: fn(q, k, v, group=quick, backend="torch", **kw), "same shape",
                            f"rank {world - 1}")


def check_ulysses_block_sparse_per_head_mask(rank, world, group):
    """A per-head block_mask covers all Hq heads, as single-process attention takes it; each rank
    applies the rows of its own heads (a rank-local mask of Hq/P heads is accepted too)."""
    heads, seq = 4, SEQ[world]
    q, k, v = make_qkv(1, heads, seq, HEAD_DIM, layout="bshd", seed=8)
    nb = seq // 4
    mask = torch.rand(1, heads, nb, nb, generator=torch.Generator().manual_seed(8)) > 0.5
    for h in range(heads):
        mask[:, h, :, h % nb] = True   # no query block without a key block
    opts = dict(method="block_sparse", block_size=(4, 4), backend="torch")
    ref = attnlib.attention(q, k, v, layout="bshd", block_mask=mask, **opts)
    shard = _contiguous(rank, world)
    ql, kl, vl = (shard(t, 1) for t in (q, k, v))
    out = ulysses_attention(ql, kl, vl, group=group, block_mask=mask, **opts)
    torch.testing.assert_close(out, shard(ref, 1))
    local = mask.chunk(world, dim=1)[rank]
    torch.testing.assert_close(ulysses_attention(ql, kl, vl, group=group, block_mask=local, **opts), shard(ref, 1))
    _expect_value_error(lambda: ulysses_attention(ql, kl, vl, group=group, block_mask=mask[:, :3], **opts),
                        "block_mask", f"{heads} query heads")


def check_double_backward_is_refused(rank, world, group):
    """autograd.grad(create_graph=True) gives the right first gradient and a graph whose backward
    raises, never a gradient that silently drops out of a gradient penalty."""
    shard = _contiguous(rank, world)
    q, k, v = make_qkv(1, 4, SEQ[world], HEAD_DIM, layout="bshd", seed=9)
    # ulysses' local attention: attnlib's op refuses ("double backward"); fp32 CPU training runs
    # torch SDPA with its own autograd (kernels/flash_sdpa.py), whose backward has no derivative
    for fn, refusal in ((ulysses_attention, ("double backward", "is not implemented")),
                        (ring_attention, ("differentiate twice",))):
        ql = shard(q, 1).requires_grad_()
        out = fn(ql, shard(k, 1), shard(v, 1), group=group, backend="torch")
        plain, = torch.autograd.grad((out ** 2).sum(), ql, retain_graph=True)
        g, = torch.autograd.grad((out ** 2).sum(), ql, create_graph=True)
        torch.testing.assert_close(g, plain, atol=0, rtol=0)
        assert g.requires_grad, f"{fn.__name__}: the gradient of a create_graph backward is a constant"
        try:
            (g ** 2).sum().backward()
        except RuntimeError as e:
            assert any(r in str(e) for r in refusal), f"{fn.__name__}: {e}"
        else:
            raise AssertionError(f"{fn.__name__}: a double backward ran")


def check_methods_refused_early(rank, world, group):
    shard = _contiguous(rank, world)
    full = make_qkv(1, 4, SEQ[world], HEAD_DIM, layout="bshd", seed=10)
    exact = flash_reference(*(t.double().transpose(1, 2) for t in full)).transpose(1, 2)
    q, k, v = (shard(t, 1) for t in full)
    # sage over the ring keeps sage's accuracy contract against exact attention ...
    m = metrics(ring_attention(q, k, v, group=group, method="sage", backend="torch"), shard(exact, 1))
    assert m["cos_sim"] >= 0.999 and m["rel_l1"] <= 0.02, m
    # ... and is forward-only, as sage_attention (which refuses inputs that require grad)
    qg = q.clone().requires_grad_()
    _expect_value_error(lambda: ring_attention(qg, k, v, group=group, method="sage", backend="torch"),
                        "method='sage'", "forward-only")
    groups = make_groups(world, 1)
    _expect_value_error(lambda: usp_attention(q, k, v, ulysses_group=groups.ulysses, ring_group=groups.ring,
                                              method="linear", backend="torch"), "usp_attention", "'linear'")


def check_ring_overlap(rank, world, group):
    """The next shard's receive is posted before each local attention (forward) and block
    gradient (backward) runs, and waited for only afterwards."""
    from attnlib.distributed import comm, ring

    events = []
    orig = comm.post_exchange, comm.wait_all, ring._block_attention, ring._block_grads

    def post(ops):
        assert any(op.op is dist.irecv for op in ops), "exchange posts no receive"
        events.append("post")
        return orig[0](ops)

    def wait(reqs):
        events.append("wait")
        return orig[1](reqs)

    def attn(*a, **kw):
        events.append("compute")
        return orig[2](*a, **kw)

    def grads(*a, **kw):
        events.append("compute")
        return orig[3](*a, **kw)

    comm.post_exchange, comm.wait_all, ring._block_attention, ring._block_grads = post, wait, attn, grads
    try:
        q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 4, HEAD_DIM, layout="bshd", seed=rank))
        out = ring_attention(q, k, v, group=group, backend="torch")
        fwd = list(events)
        events.clear()
        out.sum().backward()
        bwd = list(events)
    finally:
        comm.post_exchange, comm.wait_all, ring._block_attention, ring._block_grads = orig
    # forward: P-1 times (post, compute, wait), then the last compute
    assert fwd == ["post", "compute", "wait"] * (world - 1) + ["compute"], fwd
    # backward per step: post K/V, compute, [wait dK/dV], post dK/dV, wait K/V; the K/V post
    # always comes before the compute of that step
    steps = 0
    for j, e in enumerate(bwd):
        if e == "compute":
            steps += 1
            if steps < world:
                assert bwd[j - 1] == "post", bwd
    assert steps == world, bwd


WORLD = 4
# name -> (check, group sizes): size 4 runs on the default group, size 2 on the pairs {0, 1} and
# {2, 3} at once (so the peers of a subgroup must be addressed by their global ranks), size 1 on
# a group of each rank alone
CHECKS = {
    "ulysses": (check_ulysses, (2, 4)),
    "ulysses_causal_gqa_lse": (check_ulysses_causal_gqa_lse, (2, 4)),
    "ulysses_bhsd": (check_ulysses_bhsd, (2,)),
    "ring": (check_ring, (2, 4)),
    "ring_causal_zigzag_lse": (check_ring_causal_zigzag_lse, (2, 4)),
    "ring_causal_contiguous": (check_ring_causal_contiguous, (4,)),
    "usp_2x2": (check_usp, (4,)),
    "usp_2x2_causal_lse": (check_usp_causal_lse, (4,)),
    "errors": (check_errors, (2, 4)),
    "ring_overlap": (check_ring_overlap, (2, 4)),
    "ulysses_causal_bottom_right": (check_ulysses_causal_bottom_right, (2, 4)),
    "ring_cross_lengths": (check_ring_cross_lengths, (2, 4)),
    "ring_causal_zigzag_bf16": (check_ring_causal_zigzag_bf16, (4,)),
    "group_of_one": (check_group_of_one, (1,)),
    "packed_qkv": (check_packed_qkv, (2,)),
    "usp_beside_data_parallel": (check_usp_beside_data_parallel, (4,)),
    "usp_groups_must_cross": (check_usp_groups_must_cross, (4,)),
    "disagreeing_ranks_raise_together": (check_disagreeing_ranks_raise_together, (4,)),
    "ulysses_block_sparse_per_head_mask": (check_ulysses_block_sparse_per_head_mask, (2, 4)),
    "double_backward_is_refused": (check_double_backward_is_refused, (2,)),
    "methods_refused_early": (check_methods_refused_early, (4,)),
}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]   # every rank creates every group
    solos = [dist.new_group([r]) for r in range(world)]
    results = {}
    for name, (fn, sizes) in CHECKS.items():
        for size in sizes:
            group = None if size == world else pairs[rank // 2] if size == 2 else solos[rank]
            t0 = time.perf_counter()
            try:
                fn(dist.get_rank(group), size, group)
                results[f"{name}[{size}]"] = {"ok": True, "s": time.perf_counter() - t0}
            except Exception:  # report, keep going: the other checks still run in step
                results[f"{name}[{size}]"] = {"ok": False, "error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned_results():
    return run_job(_worker, WORLD, JOB_TIMEOUT_S, prefix="attnlib-sp-")


@pytest.mark.parametrize("size,name", [(w, n) for n, (_, ws) in CHECKS.items() for w in ws])
def test_distributed_check(spawned_results, size, name):
    results, failure = spawned_results
    if len(results) < WORLD:
        pytest.fail(failure or f"only ranks {sorted(results)} reported")
    key = f"{name}[{size}]"
    errors = [f"rank {r}:\n{res[key]['error']}" for r, res in results.items() if not res[key]["ok"]]
    assert not errors, "\n".join(errors)


# -- single-process tests ---------------------------------------------------------------------
def _partial(q, k, v, mask, keys):
    """Attention of q over the key subset ``keys`` under the global mask; empty set -> (0, -inf)."""
    b, h, sq, _ = q.shape
    if len(keys) == 0:
        return q.new_zeros(b, h, sq, v.shape[-1]), q.new_full((b, h, sq), float("-inf"))
    scores = (q @ k[:, :, keys].transpose(-1, -2)) * q.shape[-1] ** -0.5
    return masked_softmax_attention(scores, v[:, :, keys], mask[:, keys])


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_merge_attention_equals_full(layout):
    gen = torch.Generator().manual_seed(0)
    for trial in range(4):
        # bottom-right causal with Sq > Sk: the first rows see no key at all
        q, k, v = make_qkv(2, 3, 12, 16, seq_k=8, dtype=torch.float64, seed=trial, requires_grad=True)
        mask = causal_mask(12, 8, "cpu")
        ref_out, ref_lse = flash_reference(q, k, v, causal=True, return_lse=True)
        ref_grads = torch.autograd.grad(ref_out.sum() + ref_lse[torch.isfinite(ref_lse)].sum(), (q, k, v))
        owner = torch.randint(0, 4, (8,), generator=gen)
        owner[owner == 3] = 2   # part 3 stays empty
        parts = [_partial(q, k, v, mask, (owner == i).nonzero().flatten()) for i in range(4)]
        outs = [from_bhsd(o, layout) for o, _ in parts]
        out, lse = merge_attention(outs, [l for _, l in parts], layout=layout)
        out_b = to_bhsd(out, layout)
        torch.testing.assert_close(out_b, ref_out, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-10)
        assert torch.isneginf(lse[..., :4]).all() and (out_b[:, :, :4] == 0).all()
        grads = torch.autograd.grad(out.sum() + lse[torch.isfinite(lse)].sum(), (q, k, v))
        for name, g, r in zip("qkv", grads, ref_grads):
            assert torch.isfinite(g).all(), f"d{name} has NaN/inf"
            torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8)


def test_merge_attention_fp32_and_errors():
    q, k, v = make_qkv(1, 2, 6, 8, seed=3)
    full, full_lse = flash_reference(q, k, v, return_lse=True)
    a = flash_reference(q, k[:, :, :2], v[:, :, :2], return_lse=True)
    b = flash_reference(q, k[:, :, 2:], v[:, :, 2:], return_lse=True)
    out, lse = merge_attention([a[0], b[0]], [a[1], b[1]])
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one lse per output"):
        merge_attention([a[0]], [a[1], b[1]])
    with pytest.raises(ValueError, match="part 1"):
        merge_attention([a[0], b[0][:, :1]], [a[1], b[1]])
    with pytest.raises(ValueError, match="lse"):
        merge_attention([a[0], b[0]], [a[1], b[1]], layout="bshd")
    with pytest.raises(TypeError, match=r"outs\[1\] must be a torch.Tensor, got str"):
        merge_attention([a[0], "x"], [a[1], b[1]])
    with pytest.raises(TypeError, match=r"lses\[0\] must be a torch.Tensor"):
        merge_attention([a[0], b[0]], [None, b[1]])
    with pytest.raises(TypeError, match=r"lses\[1\] must be floating point, got torch.int32"):
        merge_attention([a[0], b[0]], [a[1], b[1].int()])
    with pytest.raises(TypeError, match=r"outs\[0\] must be floating point"):
        merge_attention([a[0].long(), b[0]], [a[1], b[1]])
    with pytest.raises(ValueError, match=r"out must be 4-D"):   # was an IndexError
        merge_attention([a[0][0, 0]] * 2, [a[1][0, 0]] * 2)
    # the lse dtype follows the lses (float32 unless they are float64), with one part or several
    for n in (1, 2):
        _, l = merge_attention([a[0].double()] * n, [a[1]] * n)
        assert l.dtype == torch.float32, (n, l.dtype)


@pytest.mark.parametrize("lse_dtype", [torch.float16, torch.float32, torch.float64])
def test_merge_attention_of_one_part_returns_new_tensors(lse_dtype):
    q, k, v = make_qkv(1, 2, 6, 8, seed=4, requires_grad=True)
    o, l = flash_reference(q, k, v, return_lse=True)
    l = l.to(lse_dtype)
    out, lse = merge_attention([o], [l])
    assert out is not o and lse is not l
    assert out.data_ptr() != o.data_ptr() and lse.data_ptr() != l.data_ptr()
    assert torch.equal(out, o) and lse.dtype == (torch.float64 if lse_dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lse, l.to(lse.dtype), atol=0, rtol=0)
    out.detach().add_(1)  # the caller's tensors are untouched by writes into the result
    assert torch.equal(o, flash_reference(q, k, v))
    assert torch.autograd.grad(out.sum(), q)[0].shape == q.shape  # still differentiable


def test_zigzag_and_usp_shard_roundtrip():
    x = torch.arange(2 * 16 * 3).view(2, 16, 3)
    shards = [zigzag_shard(x, r, 4, 1) for r in range(4)]
    assert shards[0][0, :, 0].tolist() == [0, 3, 42, 45]  # tokens 0, 1 (chunk 0) and 14, 15 (chunk 7)
    assert torch.equal(zigzag_unshard(shards, 1), x)
    for zigzag in (False, True):
        parts = [usp_shard(x, ulysses_rank=g % 2, ulysses_size=2, ring_rank=g // 2, ring_size=2, dim=1,
                           zigzag=zigzag) for g in range(4)]
        assert torch.equal(usp_unshard(parts, ulysses_size=2, ring_size=2, dim=1, zigzag=zigzag), x)
    with pytest.raises(ValueError, match="multiple of 6"):
        zigzag_shard(x, 0, 3, 1)


def test_sp_model_prints_rows(capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "sp_model.py")
    spec = importlib.util.spec_from_file_location("sp_model", path)
    sp_model = importlib.util.module_from_spec(spec)
    sys.modules["sp_model"] = sp_model  # dataclasses look their module up there
    spec.loader.exec_module(sp_model)
    assert sp_model.main([]) == 0
    text = capsys.readouterr().out
    assert "not a measurement" in text
    for needle in ("wan2.1-14b-720p-81f", "hunyuanvideo-720p-129f", "ulysses", "ring", "usp"):
        assert needle in text
    assert sp_model.main(["--workload", "flux.1-1024", "--machines", "1", "--gpus", "4"]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.strip().startswith(("ulysses", "ring"))]
    assert len(rows) == 2 and "%" in rows[0]


def test_ulysses_head_slice_keeps_the_block_index_cache(monkeypatch):
    """The per-rank slice of a block_mask is one object per (mask, heads), so the index cache hits
    on the next layer or step, sees in-place writes to the mask, and is dropped with the mask."""
    import gc

    monkeypatch.setenv("ATTNLIB_BLOCK_INDEX_CACHE", "1")

    from attnlib.block_mask import INDEX_CACHE, cached_row_index
    from attnlib.distributed import ulysses

    mask = torch.zeros(1, 4, 3, 3, dtype=torch.bool)
    mask[..., 0] = True
    a = ulysses._head_slice(mask, 2, 2)
    assert a is ulysses._head_slice(mask, 2, 2) and torch.equal(a, mask[:, 2:])
    INDEX_CACHE.clear()
    first = cached_row_index(a)
    assert cached_row_index(ulysses._head_slice(mask, 2, 2)) is first and INDEX_CACHE.hits == 1
    mask[0, 3, 1, 2] = True   # seen through the shared version counter: sorted again
    assert cached_row_index(ulysses._head_slice(mask, 2, 2)) is not first and INDEX_CACHE.misses == 2
    key = id(mask)
    del mask, a, first
    gc.collect()
    assert key not in ulysses._HEAD_SLICES
    INDEX_CACHE.clear()
