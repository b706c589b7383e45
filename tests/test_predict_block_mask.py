"""attnlib.predict_block_mask (SpargeAttn mean-pool predictor): properties of the masks it
returns, and the Triton pooling/scoring (interpreter on CPU) against the torch path."""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.predict import _diagonal_blocks, _visible_blocks, block_scores
from attnlib.reference import block_sparse_reference
from attnlib.testing import make_qkv

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("seq_q,seq_k", [(70, 90), (90, 40)])  # (90, 40) causal: the first query blocks see nothing
def test_triton_scores_match_torch(seq_q, seq_k):
    """The kernel's probabilities (its own softmax over key blocks, over more than one 16-block
    chunk) equal the torch path's; rows that see no key block are all 0, the others sum to 1."""
    q, k, _ = make_qkv(2, 4, seq_q, 40, kv_heads=2, seq_k=seq_k, device=DEVICE, seed=1, k_bias=3.0)
    for causal in (False, True):
        a = block_scores(q, k, (16, 2), 40 ** -0.5, causal, use_triton=True)  # 45 or 20 key blocks
        b = block_scores(q, k, (16, 2), 40 ** -0.5, causal, use_triton=False)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        sees = _visible_blocks(a.shape[2], a.shape[3], (16, 2), seq_q, seq_k, causal, q.device).any(-1)
        torch.testing.assert_close(a.sum(-1), sees.to(a.dtype).expand_as(a[..., 0]))
        assert (not causal or seq_q <= seq_k) or not bool(sees.all()), "the case must hold rows that see nothing"


def test_blocks_larger_than_the_pooling_tile_pool_with_torch():
    """A block whose (block, head_dim) tile passes Triton's limit (8193 x 128: 2**21 elements after
    padding; Triton raised "numel exceeds triton maximum") pools with torch, same probabilities."""
    q, k, _ = make_qkv(1, 1, 9000, 128, seq_k=300, device=DEVICE, seed=2)
    a = block_scores(q, k, (8193, 64), 128 ** -0.5, False, use_triton=True)
    b = block_scores(q, k, (8193, 64), 128 ** -0.5, False, use_triton=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("block_size", [(24, 24), (16, 40), (3, 5)])
def test_block_size_not_a_power_of_two(block_size):
    # the Triton mean pool runs its rows over the next power of two, masked to the block
    q, k, _ = make_qkv(1, 2, 70, 32, seq_k=90, device=DEVICE, seed=7, k_bias=2.0)
    for causal in (False, True):
        a = block_scores(q, k, block_size, 32 ** -0.5, causal, use_triton=True)
        b = block_scores(q, k, block_size, 32 ** -0.5, causal, use_triton=False)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    m = attnlib.predict_block_mask(q, k, block_size=block_size, topk=1.0, causal=True)
    mq, mk = -(-70 // block_size[0]), -(-90 // block_size[1])
    assert torch.equal(m, _visible_blocks(mq, mk, block_size, 70, 90, True, q.device).expand_as(m))


@pytest.mark.parametrize("causal", [False, True])
def test_topk_one_gives_every_visible_block(causal):
    q, k, _ = make_qkv(1, 2, 100, 32, seq_k=130, device=DEVICE, seed=2)
    m = attnlib.predict_block_mask(q, k, block_size=(16, 16), topk=1.0, causal=causal)
    assert m.shape == (1, 2, 7, 9) and m.dtype == torch.bool
    assert torch.equal(m, _visible_blocks(7, 9, (16, 16), 100, 130, causal, q.device).expand_as(m))


def test_topk_count_per_row():
    q, k, _ = make_qkv(1, 2, 64, 32, seq_k=160, device=DEVICE, seed=3)
    m = attnlib.predict_block_mask(q, k, block_size=(16, 16), topk=0.3)
    assert torch.all(m.sum(-1) == 3)  # ceil(0.3 * 10)


@pytest.mark.parametrize("causal", [False, True])
def test_larger_cdf_threshold_never_selects_fewer(causal):
    q, k, _ = make_qkv(2, 2, 96, 32, seq_k=96, device=DEVICE, seed=4)
    prev = None
    for t in (0.0, 0.2, 0.5, 0.8, 0.95, 1.0):
        m = attnlib.predict_block_mask(q * 3, k, block_size=(16, 16), cdf_threshold=t, causal=causal)
        if prev is not None:
            assert torch.all(m >= prev), t  # a superset
        prev = m
    assert torch.equal(prev, _visible_blocks(6, 6, (16, 16), 96, 96, causal, q.device).expand_as(prev))


def test_cdf_reaches_threshold_with_fewest_blocks():
    q, k, _ = make_qkv(1, 1, 64, 32, device=DEVICE, seed=5)
    p = block_scores(q, k, (16, 16), 32 ** -0.5, False, use_triton=False)
    m = attnlib.predict_block_mask(q, k, block_size=(16, 16), cdf_threshold=0.6)
    kept = torch.where(m, p, 0.0).sum(-1)
    assert torch.all(kept >= 0.6 - 1e-6)
    # dropping the least probable kept block falls below the threshold
    least = torch.where(m, p, float("inf")).amin(-1)
    assert torch.all(kept - least < 0.6)


@pytest.mark.parametrize("causal", [False, True])
def test_sink_and_diagonal_kept_and_causal_respected(causal):
    q, k, _ = make_qkv(1, 2, 80, 32, seq_k=112, device=DEVICE, seed=6)
    m = attnlib.predict_block_mask(q, k, block_size=(16, 16), topk=0.0, causal=causal, keep_sink=True,
                                   keep_diagonal=True)
    vis = _visible_blocks(5, 7, (16, 16), 80, 112, causal, q.device)
    diag = _diagonal_blocks(5, 7, (16, 16), 80, 112, q.device)
    assert torch.all(m[..., 0])
    assert torch.equal(m, (diag | (torch.arange(7, device=q.device) == 0)[None, :]).expand_as(m) & vis)
    assert not torch.any(m & ~vis)
    # the predicted mask runs through block_sparse_attention and gives the reference's answer
    v = make_qkv(1, 2, 112, 32, device=DEVICE, seed=16)[0]
    out = attnlib.block_sparse_attention(q, k, v, m, block_size=(16, 16), causal=causal)
    ref = block_sparse_reference(q.double(), k.double(), v.double(), m, block_size=(16, 16), causal=causal)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def test_bad_arguments_are_named():
    q, k, _ = make_qkv(1, 1, 32, 16, device=DEVICE)
    with pytest.raises(ValueError, match="exactly one"):
        attnlib.predict_block_mask(q, k, block_size=(16, 16))
    with pytest.raises(ValueError, match="topk"):
        attnlib.predict_block_mask(q, k, block_size=(16, 16), topk=1.5)
    with pytest.raises(TypeError, match="cdf_threshold"):
        attnlib.predict_block_mask(q, k, block_size=(16, 16), cdf_threshold="0.5")
    with pytest.raises(ValueError, match="block_size"):
        attnlib.predict_block_mask(q, k, block_size=(16,), topk=0.5)
    with pytest.raises(TypeError, match="keep_sink"):
        attnlib.predict_block_mask(q, k, block_size=(16, 16), topk=0.5, keep_sink=1)
    # scale follows attention()'s rule (attnlib.inputs.check_scale): a finite positive number or None
    with pytest.raises(TypeError, match="scale"):
        attnlib.predict_block_mask(q, k, block_size=(16, 16), topk=0.5, scale="x")
    for bad in (float("nan"), float("inf"), 0.0, -0.5):
        with pytest.raises(ValueError, match="scale"):
            attnlib.predict_block_mask(q, k, block_size=(16, 16), topk=0.5, scale=bad)
    assert attnlib.predict_block_mask(q, k, block_size=(16, 16), topk=0.5, scale=0.1).shape == (1, 1, 2, 2)
