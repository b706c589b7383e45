"""Review of method block_sparse: index forms that FlexAttention would run differently from any
bool mask (a key block listed twice in a row), the float64 ground truth checking its mask as
attention() does, and a Triton case with more key blocks than one 16-slot row of the index
form holds (CPU: TRITON_INTERPRET=1, fp32; bf16 tl.dot is wrong in the interpreter)."""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.block_mask import block_mask_to_index, index_to_block_mask
from attnlib.reference import block_sparse_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rand_mask(shape, density, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen) < density


# ---- index form -> bool mask --------------------------------------------------------------------
def test_index_to_block_mask_rejects_a_key_block_listed_twice():
    """A row listing key block 1 twice is what FlexAttention would attend twice (its keys counted
    twice in the softmax); the converter used to return the deduplicated mask without a word."""
    num = torch.tensor([[[2, 3]]], dtype=torch.int32)
    idx = torch.tensor([[[[1, 1, 0], [2, 0, 1]]]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"kv_indices .*key block 1 2 times in row \(0, 0, 0\)"):
        index_to_block_mask(num, idx)
    idx[0, 0, 0, 1] = 0  # distinct, in any order: accepted
    assert torch.equal(index_to_block_mask(num, idx), torch.tensor([[[[True, True, False], [True, True, True]]]]))


def test_index_to_block_mask_rejects_more_listed_blocks_than_key_blocks():
    """kv_num_blocks 3 with num_key_blocks 2 (slots 3): every listed index in range, so only the
    count can say what is wrong; it was silently read as the union of the listed blocks."""
    num = torch.tensor([[[3]]], dtype=torch.int64)
    idx = torch.tensor([[[[1, 0, 1]]]], dtype=torch.int64)
    with pytest.raises(ValueError, match=r"kv_num_blocks must be at most 2 .*got 3 at \(0, 0, 0\)"):
        index_to_block_mask(num, idx, num_key_blocks=2)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 4, 1), (1, 2, 3, 40)])
def test_index_round_trip_still_exact(shape):
    m = rand_mask(shape, 0.5, seed=sum(shape))
    num, idx = block_mask_to_index(m)
    assert torch.equal(index_to_block_mask(num, idx), m)
    # the column form of the transpose lists the same pairs
    assert torch.equal(index_to_block_mask(*block_mask_to_index(m.transpose(-1, -2).contiguous())),
                       m.transpose(-1, -2))


# ---- the float64 ground truth ------------------------------------------------------------------
@pytest.mark.parametrize("mask,exc", [
    (torch.ones(1, 1, 4, 3, dtype=torch.bool), ValueError),   # one query block too many: was cut
    (torch.ones(1, 1, 3, 4, dtype=torch.bool), ValueError),   # one key block too many: was cut
    (torch.ones(2, 1, 3, 3, dtype=torch.bool), ValueError),   # batch 2 for a batch-1 call
    (torch.ones(1, 1, 3, 3), TypeError),                      # float: was cast, 0.5 or -inf meaning "on"
    (torch.ones(1, 1, 3, 3, dtype=torch.uint8), TypeError),
])
def test_reference_checks_its_mask_as_attention_does(mask, exc):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    with pytest.raises(exc, match="block_mask"):
        block_sparse_reference(q, k, v, mask, block_size=(16, 16))
    with pytest.raises(exc, match="block_mask"):  # the public call refuses the same mask
        attnlib.block_sparse_attention(q, k, v, mask, block_size=(16, 16))
    # a well-formed broadcast mask is still taken, and equals the dense per-head one
    good = rand_mask((1, 1, 3, 3), 0.6, seed=6)
    torch.testing.assert_close(block_sparse_reference(q, k, v, good, block_size=(16, 16)),
                               block_sparse_reference(q, k, v, good.expand(1, 2, 3, 3), block_size=(16, 16)),
                               rtol=0, atol=0)


# ---- Triton: a row of the index form wider than 16 slots ----------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_triton_many_key_blocks(causal):
    """19 key blocks (the kernels' SLOTS = 32), GQA, seq_q != seq_k, ragged tails, a per-head
    mask with some rows all off: fp32 forward, lse and gradients within 2e-5 of float64."""
    pytest.importorskip("triton")  # on CPU conftest sets TRITON_INTERPRET=1
    gen = torch.Generator().manual_seed(11 + causal)
    q = torch.randn(1, 2, 37, 16, generator=gen).to(DEVICE).requires_grad_()
    k, v = (torch.randn(1, 1, 300, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    mask = rand_mask((1, 2, 3, 19), 0.3, seed=12).to(DEVICE)
    mask[0, 1, 1] = False  # a query block with nothing allowed
    out, lse = attnlib.block_sparse_attention(q, k, v, mask, block_size=(16, 16), causal=causal, return_lse=True,
                                              backend="triton")
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = block_sparse_reference(*leaves, mask, block_size=(16, 16), causal=causal, return_lse=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and bool(torch.isinf(lse[0, 1, 16:32]).all())
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=2e-5, rtol=0)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, leaves, dout.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=0, msg=name)
