"""AsymRnR Triton kernels (attnlib.triton_kernels.asymrnr) against the torch reference.

On CPU under TRITON_INTERPRET=1 at small shapes (fp32, fp16: the interpreter's bf16 tl.dot is
wrong, so bf16 is GPU-only). Matching: the chosen destination equals the reference's except at
near-ties, where both candidates' reference similarities agree within 1e-5 relative (fp32; 2e-3
for fp16, which the reference computes from the same fp16 values in fp32); scores within the same
bound. Gathers are exact copies; the mean merge within 1e-6 (fp32 atomics in any order).
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch

import attnlib
from attnlib import dispatch
from attnlib.asymrnr import AsymRnR, match, partition, plan_reduction, reduce, restore
from attnlib.inputs import to_bhsd
from attnlib.reference.asymrnr import asymrnr_match_reference, asymrnr_similarity
from attnlib.testing import assert_verbose_allclose, make_qkv, metrics

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# named kernel configs (BLOCK_M, BLOCK_N, warps, stages, RUNNING) besides the launcher's own (None):
# both ways of keeping the best destination, with tiles narrower than n_dst
CPU_CONFIGS = [None, (16, 16, 1, 1, 1), (16, 32, 1, 1, 0), (32, 16, 1, 1, 1)]


def check_match(x, part, metric, rtol, config=None):
    from attnlib.triton_kernels.asymrnr.match import match_fwd

    node, score = match_fwd(x, part.src, part.dst, metric, config=config)
    ref_node, ref_score = asymrnr_match_reference(x, part.src, part.dst, metric)
    assert node.dtype == torch.int64 and node.shape == ref_node.shape
    sim = asymrnr_similarity(x.index_select(2, part.src), x.index_select(2, part.dst), metric)
    scale = ref_score.abs().clamp_min(1.0)
    picked = sim.gather(-1, node.unsqueeze(-1)).squeeze(-1)
    # a different destination only where it is as good as the reference's pick
    bad = (node != ref_node) & ((ref_score - picked).abs() > rtol * scale)
    assert not bool(bad.any()), f"{int(bad.sum())} sources matched to a clearly worse destination"
    assert bool(((score - ref_score).abs() <= rtol * scale).all()), \
        f"score error {((score - ref_score).abs() / scale).max().item():.3g} > {rtol}"
    return (node != ref_node).float().mean().item()


@pytest.mark.parametrize("config", CPU_CONFIGS, ids=str)
@pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
@pytest.mark.parametrize("grid,stride,head_dim,layout", [
    ((3, 4, 5), (2, 2, 2), 16, "bhsd"),
    ((2, 7, 9), (1, 2, 2), 24, "bshd"),   # head-dim tail, n_dst not a multiple of the tile, strided view
])
def test_match_equals_reference(metric, grid, stride, head_dim, layout, config):
    n = grid[0] * grid[1] * grid[2]
    x = make_qkv(2, 2, n, head_dim, seed=1, layout=layout, device=DEVICE)[0]
    xb = to_bhsd(x, layout)
    part = partition(grid, stride, seed=3, device=DEVICE)
    assert check_match(xb, part, metric, rtol=1e-5, config=config) == 0.0  # no near-ties in these seeded inputs


@pytest.mark.parametrize("config", CPU_CONFIGS, ids=str)
@pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
def test_match_exact_ties_pick_the_first_destination(metric, config):
    """Destinations that are exact copies of one another tie for every source: the kernel picks
    the lowest destination index, within a tile and across tiles, as torch's max does. The second
    half of the destinations ties among itself and beats the first half for some sources, so the
    first maximum is not always destination 0 (nor in the first tile or slot)."""
    from attnlib.triton_kernels.asymrnr.match import match_fwd

    grid = (4, 8, 10)  # 320 tokens, stride 2: 40 destinations, each half wider than a 16-column tile
    part = partition(grid, seed=5, device=DEVICE)
    # small integers: every dot product is exact in any summation order (the interpreter's
    # np.matmul blocks the columns of one product differently, so equal columns of random floats
    # can differ in their last bit there and an exact tie would not be one)
    gen = torch.Generator().manual_seed(6)
    x = torch.randint(-3, 4, (1, 2, 320, 16), generator=gen).float().to(DEVICE)
    half = part.n_dst // 2
    x[:, :, part.dst[:half]] = x[:, :, part.dst[:1]]         # destinations 0..half-1 one row
    x[:, :, part.dst[half:]] = x[:, :, part.dst[half:half + 1]]  # the rest another
    node, _ = match_fwd(x, part.src, part.dst, metric, config=config)
    ref_node, _ = asymrnr_match_reference(x, part.src, part.dst, metric)
    assert torch.equal(node, ref_node)
    assert set(node.unique().tolist()) == {0, half}


def test_match_fp16():
    x = make_qkv(1, 2, 60, 32, seed=2, dtype=torch.float16, device=DEVICE)[0]
    check_match(x, partition((3, 4, 5), device=DEVICE), "euclidean", rtol=2e-3)


@pytest.mark.parametrize("mode", ["replace", "mean"])
def test_reduce_restore_equal_reference(mode):
    T = 5
    q = make_qkv(1, 3, 60 + T, 24, seed=4, layout="bshd", device=DEVICE)[0].transpose(1, 2)
    part = partition((3, 4, 5), seed=1, text_tokens=T, text_side="start", device=DEVICE)
    plan = plan_reduction(part, match(q, part, backend="torch"), 0.5)
    got, want = reduce(q, plan, mode=mode, backend="triton"), reduce(q, plan, mode=mode, backend="torch")
    if mode == "replace":
        assert torch.equal(got, want)
    else:
        assert_verbose_allclose(got, want, atol=1e-6)
    out = torch.full((1, 60 + T, 3, 24), float("nan"), device=DEVICE).transpose(1, 2)  # caller's bshd layout, poisoned
    back = restore(got, plan, out=out, backend="triton")
    assert back.data_ptr() == out.data_ptr()
    assert torch.equal(back, restore(got, plan, backend="torch"))


def test_dispatcher_triton_equals_torch_pieces():
    q, k, v = make_qkv(1, 4, 60, 16, kv_heads=2, seed=5, layout="bshd", device=DEVICE)
    kw = dict(method="asymrnr", grid=(3, 4, 5), q_ratio=0.5, kv_ratio=0.3, layout="bshd")
    ex = attnlib.explain(q, k, v, **kw)
    assert ex.chosen is not None and ex.chosen.name == "asymrnr-triton", str(ex)
    got = attnlib.attention(q, k, v, **kw)
    want = attnlib.attention(q, k, v, backend="torch", **kw)
    assert_verbose_allclose(got, want, atol=2e-5)
    rnr = AsymRnR((3, 4, 5), mode="mean", backend="triton")
    assert_verbose_allclose(rnr.attention(q, k, v, layout="bshd"),
                            AsymRnR((3, 4, 5), mode="mean", backend="torch").attention(q, k, v, layout="bshd"),
                            atol=2e-5)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_ratio_zero_is_exactly_full_attention(layout):
    """Nothing removed: the Triton pipeline (dispatcher kernel and module) is the inner attention
    itself, bit for bit."""
    q, k, v = make_qkv(2, 4, 60, 16, kv_heads=2, seed=8, layout=layout, device=DEVICE)
    kw = dict(method="asymrnr", grid=(3, 4, 5), q_ratio=0.0, kv_ratio=0.0, layout=layout)
    assert attnlib.explain(q, k, v, **kw).chosen.name == "asymrnr-triton"
    full = attnlib.attention(q, k, v, layout=layout)
    assert torch.equal(attnlib.attention(q, k, v, **kw), full)
    rnr = AsymRnR((3, 4, 5), q_ratio=0.0, kv_ratio=0.0, backend="triton")
    assert torch.equal(rnr.attention(q, k, v, layout=layout), full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_restore_exact_at_kept_and_copies_at_removed(dtype):
    """Triton match, reduce and restore, checked token by token: a kept token's row comes back
    unchanged, a removed one gets its destination's row, into a caller's strided (bshd) out."""
    B, H, n, D = 2, 3, 60, 24
    x = make_qkv(B, H, n, D, seed=9, dtype=dtype, device=DEVICE)[0]
    p = partition((3, 4, 5), seed=1, device=DEVICE)
    m = match(x, p, backend="triton")
    plan = plan_reduction(p, m, 0.5)
    y = reduce(x, plan, backend="triton")
    out = torch.full((B, n, H, D), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
    back = restore(y, plan, out=out, backend="triton")
    assert back.data_ptr() == out.data_ptr()
    n_rm = plan.n_removed
    assert n_rm > 0
    for b in range(B):
        for h in range(H):
            removed = p.src[m.order[b, h, :n_rm]]
            dsts = p.dst[m.node[b, h, m.order[b, h, :n_rm]]]
            kept = torch.ones(n, dtype=torch.bool, device=DEVICE)
            kept[removed] = False
            assert torch.equal(y[b, h], x[b, h, kept]), "reduce keeps the kept rows, in order"
            assert torch.equal(back[b, h, kept], x[b, h, kept]), "kept tokens take their own row"
            assert torch.equal(back[b, h, removed], x[b, h, dsts]), "removed tokens copy their destination"


def test_inner_sage_on_triton():
    """inner_method "sage" on the Triton path runs sage-triton: at ratio 0 its output bit for
    bit, within sage's contract (cos >= 0.999, rel L1 <= 0.02) of exact attention; reduced, within
    that contract of the same reduction with flash inside."""
    from attnlib.reference import flash_reference

    q, k, v = make_qkv(1, 4, 60, 64, kv_heads=2, seed=10, device=DEVICE)
    assert attnlib.explain(q, k, v, method="sage").chosen.name == "sage-triton"
    kw = dict(method="asymrnr", grid=(3, 4, 5), q_ratio=0.0, kv_ratio=0.0, inner_method="sage")
    assert attnlib.explain(q, k, v, **kw).chosen.name == "asymrnr-triton"
    got = attnlib.attention(q, k, v, **kw)
    assert torch.equal(got, attnlib.sage_attention(q, k, v))
    m = metrics(got, flash_reference(q.double(), k.double(), v.double()))
    assert m["cos_sim"] >= 0.999 and m["rel_l1"] <= 0.02, m
    kw.update(q_ratio=0.5, kv_ratio=0.3)
    m = metrics(attnlib.attention(q, k, v, **kw), attnlib.attention(q, k, v, **{**kw, "inner_method": "flash"}))
    assert m["cos_sim"] >= 0.999 and m["rel_l1"] <= 0.02 and m["max_abs"] > 0, m


def test_triton_kernel_has_no_backward_and_says_so():
    q, k, v = make_qkv(1, 2, 60, 16, seed=6, device=DEVICE, requires_grad=True)
    ex = attnlib.explain(q, k, v, method="asymrnr", grid=(3, 4, 5))
    assert ex.chosen.name == "asymrnr-torch"
    assert any("backward" in r for r in ex.reasons["asymrnr-triton"])


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's bf16 limit concerns CPU tensors")
def test_bf16_cpu_pieces_are_refused_on_triton():
    """The interpreter computes tl.dot on bf16 operands wrongly (the matching kernel has one):
    a forced backend="triton" on bf16 CPU tensors raises and says why; auto takes torch."""
    x = make_qkv(1, 2, 60, 16, seed=7, dtype=torch.bfloat16)[0]
    p = partition((3, 4, 5), seed=1)
    with pytest.raises(ValueError, match="bf16 under the Triton interpreter"):
        match(x, p, backend="triton")
    ex = attnlib.explain(x, x, x, method="asymrnr", grid=(3, 4, 5))
    assert ex.chosen.name == "asymrnr-torch"
    assert any("bf16" in r for r in ex.reasons["asymrnr-triton"])


# ---------------------------------------------------------------------------------------------
# GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_match_gpu_wan_like(dtype):
    from attnlib.triton_kernels.asymrnr.match import CANDIDATES_16BIT

    grid = (6, 30, 52)  # a slice of Wan2.1's 21 x 30 x 52 grid
    x = make_qkv(1, 4, 6 * 30 * 52, 128, seed=7, dtype=dtype, device="cuda")[0]
    part = partition(grid, device="cuda")
    # the launcher's config, then (bf16: each candidate compiles per dtype, and the GPU test
    # budget is short) every config the autotuner may pick
    for config in [None] + (CANDIDATES_16BIT if dtype == torch.bfloat16 else []):
        mism = check_match(x, part, "euclidean", rtol=1e-5 if dtype == torch.float32 else 3e-3, config=config)
        assert mism < 0.02, config


@pytest.mark.gpu
def test_asymrnr_gpu_end_to_end_bf16():
    from bench.bench_asymrnr import video_latents

    grid = (8, 16, 16)
    q, k, v = video_latents(grid, heads=4, head_dim=64, dtype=torch.bfloat16, device="cuda")
    q32, k32, v32 = (t.float() for t in (q, k, v))
    kw = dict(method="asymrnr", grid=grid, q_ratio=0.5, kv_ratio=0.3)
    inner = []
    real_select = dispatch.select
    with mock.patch.object(dispatch, "select", lambda inp, backend="auto": (
            lambda kern: inner.append(kern.name) or kern)(real_select(inp, backend))):
        got = attnlib.attention(q, k, v, **kw)
    # the inner attention, asked for no lse, runs on torch SDPA (cuDNN: the H200's fastest)
    assert inner == ["asymrnr-triton", "flash-torch-sdpa"], inner
    assert attnlib.explain(q, k, v, **kw).chosen.name == "asymrnr-triton"
    want = attnlib.attention(q32, k32, v32, backend="torch", **kw)
    m = metrics(got, want)
    assert m["cos_sim"] > 0.99, m
