"""block_sparse_reference against exact attention and an independent per-row float64 formula."""
import math

import pytest
import torch

import attnlib
from attnlib.inputs import to_bhsd
from attnlib.reference import block_sparse_reference, flash_reference
from attnlib.testing import assert_verbose_allclose, make_qkv

# float64 vs float64: only summation order differs
ATOL64 = 1e-12
ATOL32 = 2e-6


def _loop_formula(q, k, v, block_mask, block_size, causal, scale):
    """Float64, token mask built element by element, softmax row by row (autograd-friendly)."""
    b_, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    bq, bk = block_size
    outs, lses = [], []
    for b in range(b_):
        for h in range(hq):
            mb = block_mask[b if block_mask.shape[0] > 1 else 0, h if block_mask.shape[1] > 1 else 0]
            kh, vh = k[b, h // (hq // hkv)].double(), v[b, h // (hq // hkv)].double()
            for i in range(sq):
                keys = [j for j in range(sk)
                        if mb[i // bq, j // bk] and (not causal or j <= i + sk - sq)]
                if not keys:
                    outs.append(torch.zeros(v.shape[-1], dtype=torch.float64))
                    lses.append(torch.tensor(-math.inf, dtype=torch.float64))
                    continue
                s = (kh[keys] @ q[b, h, i].double()) * scale
                outs.append(torch.softmax(s, dim=0) @ vh[keys])
                lses.append(torch.logsumexp(s, dim=0))
    out = torch.stack(outs).reshape(b_, hq, sq, v.shape[-1])
    return out, torch.stack(lses).reshape(b_, hq, sq)


def _random_mask(shape, density=0.5, empty_row=True):
    mask = torch.rand(shape) < density
    if empty_row:
        mask[..., 0, :] = False  # a query block with nothing allowed
    return mask


def test_all_ones_equals_flash():
    q, k, v = make_qkv(2, 4, 100, 32, kv_heads=2, seq_k=90)
    for causal in (False, True):
        mask = torch.ones(1, 1, math.ceil(100 / 64), math.ceil(90 / 32), dtype=torch.bool)
        out, lse = block_sparse_reference(q, k, v, mask, block_size=(64, 32), causal=causal, return_lse=True)
        ref, ref_lse = flash_reference(q, k, v, causal=causal, return_lse=True)
        assert_verbose_allclose(out, ref, atol=ATOL32)
        assert_verbose_allclose(lse, ref_lse, atol=ATOL32, name="lse")


@pytest.mark.parametrize("mask_bh", [(1, 1), (2, 1), (1, 4), (2, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_random_mask_matches_loop_formula(mask_bh, causal):
    bq, bk = 16, 8
    q, k, v = make_qkv(2, 4, 37, 16, kv_heads=2, seq_k=45, dtype=torch.float64)  # ragged tails
    mask = _random_mask((*mask_bh, math.ceil(37 / bq), math.ceil(45 / bk)))
    out, lse = block_sparse_reference(q, k, v, mask, block_size=(bq, bk), causal=causal, return_lse=True)
    ref, ref_lse = _loop_formula(q, k, v, mask, (bq, bk), causal, 16 ** -0.5)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert_verbose_allclose(out, ref, atol=ATOL64)
    assert_verbose_allclose(lse, ref_lse, atol=ATOL64, name="lse")
    assert (out[:, :, :bq] == 0).all() and torch.isneginf(lse[:, :, :bq]).all()  # empty query block


def test_float32_and_scale():
    q, k, v = make_qkv(1, 2, 50, 32, seq_k=70)
    mask = _random_mask((1, 2, 4, 3), empty_row=False)
    out, lse = block_sparse_reference(q, k, v, mask, block_size=(16, 32), scale=0.3, return_lse=True)
    ref, ref_lse = _loop_formula(q, k, v, mask, (16, 32), False, 0.3)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_verbose_allclose(out, ref, atol=ATOL32)
    assert_verbose_allclose(lse, ref_lse, atol=ATOL32, name="lse")


def test_per_head_masks_differ():
    q, k, v = make_qkv(1, 2, 32, 16)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[0, 0, :, 0] = True  # head 0 sees key block 0 only
    mask[0, 1, :, 1] = True  # head 1 sees key block 1 only
    out = block_sparse_reference(q, k, v, mask, block_size=(16, 16))
    ref0 = flash_reference(q[:, :1], k[:, :1, :16], v[:, :1, :16])
    ref1 = flash_reference(q[:, 1:], k[:, 1:, 16:], v[:, 1:, 16:])
    assert_verbose_allclose(out[:, :1], ref0, atol=ATOL32)
    assert_verbose_allclose(out[:, 1:], ref1, atol=ATOL32)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_loop_formula(causal):
    q, k, v = make_qkv(1, 4, 21, 8, kv_heads=2, seq_k=27, dtype=torch.float64, requires_grad=True)
    mask = _random_mask((1, 4, 3, 4))
    out, lse = block_sparse_reference(q, k, v, mask, block_size=(8, 8), causal=causal, return_lse=True)
    ref, ref_lse = _loop_formula(q, k, v, mask, (8, 8), causal, 8 ** -0.5)
    w = torch.randn_like(out)
    fin = torch.isfinite(ref_lse)
    w_lse = torch.randn_like(lse)
    loss = (out * w).sum() + (lse.where(fin, 0) * w_lse).sum()
    loss_ref = (ref * w).sum() + (ref_lse.where(fin, 0) * w_lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    grads_ref = torch.autograd.grad(loss_ref, (q, k, v))
    for name, g, gr in zip("qkv", grads, grads_ref):
        assert torch.isfinite(g).all(), name
        assert_verbose_allclose(g, gr, atol=1e-10, name=f"d{name}")


def test_gradients_finite_with_empty_rows_fp32():
    q, k, v = make_qkv(1, 2, 40, 16, seq_k=24, requires_grad=True)
    mask = _random_mask((1, 2, 3, 2))
    out, lse = block_sparse_reference(q, k, v, mask, block_size=(16, 16), causal=True, return_lse=True)
    assert torch.isneginf(lse[:, :, :16]).all()
    (out.sum() + lse.where(torch.isfinite(lse), 0).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_attention_api_torch_backend(dtype, layout):
    q, k, v = make_qkv(2, 4, 50, 32, kv_heads=2, seq_k=70, dtype=dtype, layout=layout)
    mask = _random_mask((2, 1, 4, 3))
    out, lse = attnlib.attention(q, k, v, method="block_sparse", backend="torch", layout=layout, causal=True,
                                 return_lse=True, block_mask=mask, block_size=(16, 32))
    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    ref, ref_lse = _loop_formula(qb, kb, vb, mask, (16, 32), True, 32 ** -0.5)
    atol = ATOL64 if dtype == torch.float64 else ATOL32
    assert out.dtype == dtype and out.shape == q.shape
    assert_verbose_allclose(to_bhsd(out, layout), ref, atol=atol)
    assert_verbose_allclose(lse, ref_lse, atol=atol, name="lse")


def test_attention_api_backward_matches_reference():
    q, k, v = make_qkv(1, 4, 40, 16, kv_heads=2, seq_k=50, layout="bshd", requires_grad=True)
    mask = _random_mask((1, 1, 3, 4))
    out = attnlib.attention(q, k, v, method="block_sparse", backend="torch", layout="bshd", causal=True,
                            block_mask=mask, block_size=(16, 16))
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref = block_sparse_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                                 block_size=(16, 16), causal=True)
    grads_ref = torch.autograd.grad((ref * g.transpose(1, 2)).sum(), (q, k, v))
    for name, ga, gr in zip("qkv", grads, grads_ref):
        assert torch.isfinite(ga).all(), name
        assert_verbose_allclose(ga, gr, atol=ATOL32, name=f"d{name}")


@pytest.mark.parametrize("bad", [
    "not a tensor", torch.ones(1, 1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool),
    torch.ones(1, 1, 3, 2, dtype=torch.bool), torch.ones(1, 1, 2, 3, dtype=torch.bool),
    torch.ones(3, 1, 2, 2, dtype=torch.bool), torch.ones(1, 4, 2, 2, dtype=torch.bool)])
def test_reference_and_attention_refuse_a_mask_alike(bad):
    """One shape rule (reference._common.check_block_mask_shape) for the ground truth and the
    dispatcher: the same error type and message for every bad mask (B 2, Hq 2, 100/70 tokens in
    blocks of 64 -> 2 x 2 blocks)."""
    q, k, v = make_qkv(2, 2, 100, 32, seq_k=70, dtype=torch.float32, seed=3)
    with pytest.raises((TypeError, ValueError)) as ref_err:
        block_sparse_reference(q, k, v, bad, block_size=(64, 64))
    with pytest.raises(type(ref_err.value)) as api_err:
        attnlib.attention(q, k, v, method="block_sparse", block_mask=bad, block_size=(64, 64))
    assert "block_mask" in str(ref_err.value)
    assert str(api_err.value).startswith(str(ref_err.value))
