"""Sequence parallelism (attnlib.distributed) on CPU with gloo: one spawned job of 4 ranks runs
every distributed check on the whole world (group size 4) and on two pairs at once (group size 2);
the pytest tests below read back each check's result."""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnlib.distributed import (make_groups, merge_attention, ring_attention, ulysses_attention, usp_attention,
                                 usp_shard, usp_unshard, zigzag_shard, zigzag_unshard)
from attnlib.reference import flash_reference
from attnlib.reference._common import causal_mask, masked_softmax_attention
from attnlib.testing import assert_flash_rule, make_qkv

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

HEAD_DIM = 8
SEQ = {2: 16, 4: 32}          # total tokens by group size: 2P chunks of 4 for zigzag
JOB_TIMEOUT_S = 150


# -- helpers run inside the workers -----------------------------------------------------------
def _full_problem(world, *, heads=4, kv_heads=None, seed=0):
    """The same full-sequence problem on every rank (bshd, fp32) and fixed upstream gradients for
    out and lse. Only the test holds the full sequence, to shard it and to check against."""
    q, k, v = make_qkv(1, heads, SEQ[world], HEAD_DIM, kv_heads=kv_heads, layout="bshd", seed=seed)
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


def _check_sp(world, attn, shard, *, causal, heads=4, kv_heads=None, with_lse=False, seed=0):
    """attn(q, k, v) on this rank's shards == the float64 reference's shards, forward and backward."""
    q, k, v, dout, dlse = _full_problem(world, heads=heads, kv_heads=kv_heads, seed=seed)
    dlse = dlse if with_lse else None
    ref64 = _reference(q, k, v, dout, dlse, causal, torch.float64)
    ref32 = _reference(q, k, v, dout, dlse, causal, torch.float32)
    ql, kl, vl = (shard(t, 1).detach().requires_grad_() for t in (q, k, v))
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
    _expect_value_error(lambda: ulysses_attention(q, k, v, group=group), "query heads (3)",
                        f"group size ({world})")
    q, k, v = make_qkv(1, 4, 3, HEAD_DIM, layout="bshd", seed=0)           # odd zigzag shard
    _expect_value_error(lambda: ring_attention(q, k, v, group=group, causal=True), "even")
    _expect_value_error(lambda: make_groups(3, dist.get_world_size()), "must equal the world size")
    _expect_value_error(lambda: make_groups(0, 2), "positive")


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
# {2, 3} at once (so the peers of a subgroup must be addressed by their global ranks)
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
}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]   # every rank creates every group
    results = {}
    for name, (fn, sizes) in CHECKS.items():
        for size in sizes:
            group = None if size == world else pairs[rank // 2]
            t0 = time.perf_counter()
            try:
                fn(dist.get_rank(group), size, group)
                results[f"{name}[{size}]"] = {"ok": True, "s": time.perf_counter() - t0}
            except Exception:  # report, keep going: the other checks still run in step
                results[f"{name}[{size}]"] = {"ok": False, "error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def run_job(world=WORLD, timeout_s=JOB_TIMEOUT_S):
    """Spawn ``world`` gloo ranks that run every check; return ({rank: results}, failure or None)."""
    tmp = tempfile.mkdtemp(prefix="attnlib-sp-")
    ctx = mp.start_processes(_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world, join=False,
                             start_method="spawn")
    deadline, failure = time.monotonic() + timeout_s, None
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                failure = f"job timed out after {timeout_s} s"
                break
    except Exception as e:  # a worker died
        failure = f"job failed: {e}"
    results = {}
    for rank in range(world):
        path = os.path.join(tmp, f"rank{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[rank] = json.load(f)
    return results, failure


@pytest.fixture(scope="module")
def spawned_results():
    return run_job()


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
        outs = [o if layout == "bhsd" else o.transpose(1, 2) for o, _ in parts]
        out, lse = merge_attention(outs, [l for _, l in parts], layout=layout)
        out_b = out if layout == "bhsd" else out.transpose(1, 2)
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
