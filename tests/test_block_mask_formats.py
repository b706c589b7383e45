"""Block-mask formats: bool mask <-> row index form <-> column form round trips, token-mask
reduction, FlexAttention BlockMask conversion, and clear errors for bad input."""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.block_mask import (block_mask_from_token_mask, block_mask_to_col_index, block_mask_to_index,
                                index_to_block_mask, to_flex_block_mask)
from attnlib.reference import block_sparse_reference
from attnlib.reference._common import block_mask_to_tokens


def rand_mask(shape, density, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1, 1, 5, 7), (2, 3, 4, 4), (2, 1, 1, 9)])
def test_round_trips(shape, density):
    m = rand_mask(shape, density, seed=int(density * 10) + shape[-1])
    num, idx = block_mask_to_index(m)
    assert num.dtype == idx.dtype == torch.int32
    assert num.shape == shape[:3] and idx.shape == shape
    assert torch.equal(num, m.sum(-1).int())
    for row_m, row_n, row_i in zip(m.reshape(-1, shape[-1]), num.reshape(-1), idx.reshape(-1, shape[-1])):
        listed = row_i[:row_n].tolist()
        assert listed == sorted(listed) == torch.nonzero(row_m).flatten().tolist()
        assert sorted(row_i.tolist()) == list(range(shape[-1]))  # a permutation: unlisted slots in range
    assert torch.equal(index_to_block_mask(num, idx), m)
    cnum, cidx = block_mask_to_col_index(m)
    assert cnum.shape == (shape[0], shape[1], shape[3]) and cidx.shape == (shape[0], shape[1], shape[3], shape[2])
    assert torch.equal(index_to_block_mask(cnum, cidx).transpose(-1, -2), m)


def test_token_mask_reduction():
    tok = torch.zeros(2, 1, 37, 50, dtype=torch.bool)
    tok[0, 0, 3, 49] = True   # block (0, 3) with block (16, 16), in the ragged key tail
    tok[1, 0, 36, 0] = True   # ragged query tail
    bm = block_mask_from_token_mask(tok, (16, 16))
    assert bm.shape == (2, 1, 3, 4)
    want = torch.zeros_like(bm)
    want[0, 0, 0, 3] = True
    want[1, 0, 2, 0] = True
    assert torch.equal(bm, want)
    # any-reduction covers the token mask; re-expanding a block mask gives it back
    m = rand_mask((1, 2, 3, 4), 0.5, seed=1)
    assert torch.equal(block_mask_from_token_mask(block_mask_to_tokens(m, (16, 16), 40, 60), (16, 16)), m)
    assert block_mask_from_token_mask(torch.ones(20, 20, dtype=torch.bool), (16, 16)).shape == (1, 1, 2, 2)


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="block_mask"):
        block_mask_to_index(torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="block_mask"):
        block_mask_to_index(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        block_mask_from_token_mask([[True]], (16, 16))
    with pytest.raises(ValueError, match="block_size"):
        block_mask_from_token_mask(torch.ones(4, 4, dtype=torch.bool), (0, 16))
    with pytest.raises(ValueError, match="kv_indices"):
        index_to_block_mask(torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 3, 4, dtype=torch.int32))



def test_index_to_block_mask_rejects_out_of_range_index_forms():
    num, idx = block_mask_to_index(rand_mask((1, 2, 3, 5), 0.5, seed=4))
    num[0, 1, 2], idx[0, 1, 2, 0] = 1, 5  # a listed key block past Mk = 5
    with pytest.raises(ValueError, match=r"kv_indices .*\[0, 5\).* 5 at \(0, 1, 2, 0\)"):
        index_to_block_mask(num, idx)
    idx[0, 1, 2, 0] = -1
    with pytest.raises(ValueError, match="kv_indices"):
        index_to_block_mask(num, idx)
    with pytest.raises(ValueError, match="kv_indices"):  # in range of the slots, not of num_key_blocks
        index_to_block_mask(num, idx.clamp(0, 4), num_key_blocks=3)
    idx[0, 1, 2, 0] = 0
    for bad in (-1, 6):
        n = num.clone()
        n[0, 0, 1] = bad
        with pytest.raises(ValueError, match="kv_num_blocks"):
            index_to_block_mask(n, idx)
    with pytest.raises(TypeError, match="num_key_blocks"):
        index_to_block_mask(num, idx, num_key_blocks=5.0)
    with pytest.raises(ValueError, match="num_key_blocks"):
        index_to_block_mask(num, idx, num_key_blocks=-1)
    # unlisted slots may hold anything (e.g. padding); a wider Mk keeps the listed blocks
    n = torch.zeros_like(num)
    assert not index_to_block_mask(n, torch.full_like(idx, 99)).any()
    m = index_to_block_mask(num, idx, num_key_blocks=8)
    assert m.shape == (1, 2, 3, 8) and torch.equal(m[..., :5], index_to_block_mask(num, idx)) and not m[..., 5:].any()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", [False, True])
def test_flex_block_mask_matches_reference(causal):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, s, 16, generator=gen, dtype=torch.float64) for s in (48, 64, 64))
    m = rand_mask((1, 2, 3, 4), 0.6, seed=4)
    m[..., 0] = True  # flex gives NaN-free output only where each row sees something
    if causal:
        m[..., 1] = True
    bm = to_flex_block_mask(m, (16, 16), seq_q=48, seq_k=64, causal=causal)
    kv_num, kv_idx = block_mask_to_index(m)
    if not causal:
        assert torch.equal(bm.full_kv_num_blocks, kv_num)
    out = flex.flex_attention(q, k, v, block_mask=bm)
    ref = block_sparse_reference(q, k, v, m, block_size=(16, 16), causal=causal)
    torch.testing.assert_close(out, ref)
    assert attnlib.to_flex_block_mask is to_flex_block_mask
    assert attnlib.block_mask_from_token_mask is block_mask_from_token_mask


# ---- the index-form cache (block_mask.INDEX_CACHE) ----------------------------------------------
def _cache_case(seed=21):
    from attnlib.testing import make_qkv

    q, k, v = make_qkv(1, 2, 50, 16, seq_k=70, requires_grad=True, seed=seed)
    m = rand_mask((1, 2, 4, 5), 0.5, seed)
    m[..., 0] = True
    return q, k, v, m


def _check_against_reference(out, q, k, v, m):
    ref = block_sparse_reference(*(t.detach().double() for t in (q, k, v)), m, block_size=(16, 16))
    torch.testing.assert_close(out.detach().double(), ref, atol=1e-5, rtol=1e-5)


@pytest.fixture
def index_cache():
    from attnlib.block_mask import INDEX_CACHE

    INDEX_CACHE.clear()
    yield INDEX_CACHE
    INDEX_CACHE.clear()


def test_index_cache_reuses_forms_and_sees_writes(index_cache):
    """Forward builds the row form, backward reuses it and builds the column form once, a second
    call sorts nothing; an in-place write to the mask is seen (the answer follows the new mask)."""
    pytest.importorskip("triton")
    q, k, v, m = _cache_case()
    ex = attnlib.explain(q, k, v, method="block_sparse", block_mask=m, block_size=(16, 16))
    if ex.chosen.name != "block_sparse-triton":
        pytest.skip(f"the cache serves the Triton / CUDA kernels; chosen here: {ex.chosen.name}")
    out = attnlib.block_sparse_attention(q, k, v, m, block_size=(16, 16))
    out.sum().backward()
    assert (index_cache.hits, index_cache.misses) == (1, 2)
    out = attnlib.block_sparse_attention(q, k, v, m, block_size=(16, 16))
    assert (index_cache.hits, index_cache.misses) == (2, 2)
    _check_against_reference(out, q, k, v, m)
    m[0, 1, 2] = ~m[0, 1, 2]  # in place: bumps the version counter
    out = attnlib.block_sparse_attention(q, k, v, m, block_size=(16, 16))
    assert index_cache.misses == 3
    _check_against_reference(out, q, k, v, m)


def test_index_cache_never_matches_another_mask(index_cache):
    """A freed mask's id may be reused by a new tensor: the weak reference makes that a miss."""
    from attnlib.block_mask import cached_row_index

    for seed in range(6):  # each mask dies before the next is made: ids are likely reused
        m = rand_mask((1, 1, 3, 6), 0.5, seed)
        got = cached_row_index(m)
        want = block_mask_to_index(m)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), f"seed {seed}"
        del m
    assert index_cache.hits == 0


def test_index_cache_skips_inference_tensors_and_can_be_off(index_cache, monkeypatch):
    from attnlib.block_mask import cached_col_index

    with torch.inference_mode():
        m = rand_mask((1, 1, 3, 6), 0.5, 1)
    for _ in range(2):
        cached_col_index(m)
    assert (index_cache.hits, index_cache.misses) == (0, 0)
    monkeypatch.setenv("ATTNLIB_BLOCK_INDEX_CACHE", "0")
    m = rand_mask((1, 1, 3, 6), 0.5, 2)
    for _ in range(2):
        got = cached_col_index(m)
    assert (index_cache.hits, index_cache.misses) == (0, 0)
    assert all(torch.equal(a, b) for a, b in zip(got, block_mask_to_col_index(m)))


@pytest.mark.gpu
def test_index_cache_and_cuda_graph_replay_with_a_new_mask(index_cache):
    """A call captured in a CUDA graph must sort its mask inside the graph (no cache during
    capture): a new mask copied into the graph's static mask, then a replay, follows the new mask."""
    from attnlib.testing import make_qkv

    q, k, v = make_qkv(1, 2, 256, 64, dtype=torch.float16, device="cuda", seed=31)
    m = torch.ones(1, 2, 4, 4, dtype=torch.bool, device="cuda")
    new = rand_mask((1, 2, 4, 4), 0.5, 32).cuda()
    new[..., 0] = True
    attnlib.block_sparse_attention(q, k, v, m, block_size=(64, 64), backend="triton")  # compile, fill the cache
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attnlib.block_sparse_attention(q, k, v, m, block_size=(64, 64), backend="triton")
    m.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    ref = block_sparse_reference(*(t.double() for t in (q, k, v)), new, block_size=(64, 64))
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)


def test_index_cache_sees_copy_into_the_same_mask(index_cache):
    """copy_ bumps the version counter: the same mask object refilled (a static buffer reused
    across steps) is sorted again, and the kernel follows the new content."""
    from attnlib.block_mask import cached_col_index, cached_row_index

    m = rand_mask((1, 2, 3, 5), 0.5, 40)
    new = rand_mask((1, 2, 3, 5), 0.5, 41)
    cached_row_index(m)
    cached_col_index(m)
    m.copy_(new)
    assert all(torch.equal(a, b) for a, b in zip(cached_row_index(m), block_mask_to_index(new)))
    assert all(torch.equal(a, b) for a, b in zip(cached_col_index(m), block_mask_to_col_index(new)))
    assert (index_cache.hits, index_cache.misses) == (0, 4)
    q, k, v, m = _cache_case(seed=42)
    attnlib.block_sparse_attention(q, k, v, m, block_size=(16, 16))
    new = rand_mask(m.shape, 0.5, 43)
    new[..., 0] = True
    m.copy_(new)
    _check_against_reference(attnlib.block_sparse_attention(q, k, v, m, block_size=(16, 16)), q, k, v, new)


@pytest.mark.parametrize("write", ["data", "numpy"])
def test_index_cache_writes_past_the_version_counter_need_clear_or_off(index_cache, monkeypatch, write):
    """Writes through .data or a NumPy view keep the version counter (documented on IndexCache);
    INDEX_CACHE.clear() or ATTNLIB_BLOCK_INDEX_CACHE=0 makes them visible."""
    from attnlib.block_mask import cached_row_index

    def flip(m):
        version = m._version
        if write == "data":
            m.data[0, 0, 1] = ~m.data[0, 0, 1]
        else:
            m.numpy()[0, 0, 1] = ~m.numpy()[0, 0, 1]
        assert m._version == version  # the premise: nothing tells the cache

    def fresh(m):
        return all(torch.equal(a, b) for a, b in zip(cached_row_index(m), block_mask_to_index(m)))

    m = rand_mask((1, 1, 3, 6), 0.5, 44)
    cached_row_index(m)
    flip(m)
    index_cache.clear()
    assert fresh(m)
    monkeypatch.setenv("ATTNLIB_BLOCK_INDEX_CACHE", "0")
    flip(m)
    assert fresh(m)
    # end to end, with the cache on again: clear() after the write gives the new mask's answer
    monkeypatch.delenv("ATTNLIB_BLOCK_INDEX_CACHE")
    q, k, v, m = _cache_case(seed=45)
    attnlib.block_sparse_attention(q, k, v, m, block_size=(16, 16))
    m[0, 0, 2, 1] = True  # make the flipped pair visible first, so the flip removes a real block
    attnlib.block_sparse_attention(q, k, v, m, block_size=(16, 16))
    (m.data if write == "data" else torch.from_numpy(m.numpy()))[0, 0, 2, 1] = False
    index_cache.clear()
    _check_against_reference(attnlib.block_sparse_attention(q, k, v, m, block_size=(16, 16)), q, k, v, m)


@pytest.mark.parametrize("kw,exc,text", [
    (dict(causal="yes"), TypeError, "causal must be a bool"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(seq_q=True), TypeError, "seq_q must be an int"),
    (dict(seq_k=16.0), TypeError, "seq_k must be an int"),
    (dict(seq_q=-16), ValueError, "seq_q must be >= 0"),
])
def test_to_flex_block_mask_checks_its_arguments(kw, exc, text):
    pytest.importorskip("torch.nn.attention.flex_attention")
    args = dict(seq_q=16, seq_k=16, causal=False)
    args.update(kw)
    with pytest.raises(exc, match=text):
        to_flex_block_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), (16, 16), **args)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", [False, True])
def test_to_flex_block_mask_with_no_queries(causal):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    bm = to_flex_block_mask(torch.ones(1, 1, 0, 3, dtype=torch.bool), (16, 16), seq_q=0, seq_k=40, causal=causal)
    q, k = torch.randn(1, 1, 0, 16), torch.randn(1, 1, 40, 16)
    assert flex.flex_attention(q, k, k, block_mask=bm).shape == (1, 1, 0, 16)
