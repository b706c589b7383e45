"""The flash reference against an independent float64 formula and against torch SDPA."""
import math

import pytest
import torch

import attnlib
from attnlib.reference import flash_reference
from attnlib.testing import assert_verbose_allclose, make_qkv


def loop_attention(q, k, v, causal, scale):
    """Row-by-row float64 attention with python loops: independent of the reference's code."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, sq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b, hq, sq), -math.inf, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(sq):
                last = i + sk - sq if causal else sk - 1
                if last < 0:
                    continue
                s = [float(q[bi, h, i].double() @ k[bi, kh, j].double()) * scale for j in range(last + 1)]
                mx = max(s)
                w = [math.exp(x - mx) for x in s]
                tot = sum(w)
                out[bi, h, i] = sum(wj * v[bi, kh, j].double() for j, wj in enumerate(w)) / tot
                lse[bi, h, i] = mx + math.log(tot)
    return out, lse


@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (17, 40), (40, 17), (129, 127)])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_loop_formula(sq, sk, causal):
    q, k, v = make_qkv(1, 4, sq, 16, kv_heads=2, seq_k=sk, dtype=torch.float64)
    out, lse = flash_reference(q, k, v, causal=causal, scale=0.3, return_lse=True)
    ref_out, ref_lse = loop_attention(q, k, v, causal, 0.3)
    assert_verbose_allclose(out, ref_out, atol=1e-10, name="out")
    assert_verbose_allclose(lse, ref_lse, atol=1e-10, name="lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_torch_sdpa(dtype, causal):
    q, k, v = make_qkv(2, 6, 129, 32, kv_heads=3, dtype=dtype)
    out = flash_reference(q, k, v, causal=causal)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert_verbose_allclose(out, ref, atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_fully_masked_rows_give_zero_and_minus_inf_and_finite_grads():
    q, k, v = make_qkv(1, 2, 20, 16, seq_k=5, dtype=torch.float64, requires_grad=True)
    out, lse = flash_reference(q, k, v, causal=True, return_lse=True)
    # query i sees keys j <= i - 15: rows 0..14 see nothing
    assert torch.equal(out[:, :, :15], torch.zeros_like(out[:, :, :15]))
    assert torch.isinf(lse[:, :, :15]).all() and (lse[:, :, :15] < 0).all()
    assert torch.isfinite(lse[:, :, 15:]).all()
    (out.sum() + lse[:, :, 15:].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_public_api_torch_backend_layouts(layout):
    q, k, v = make_qkv(2, 4, 33, 16, kv_heads=1, seq_k=45, layout=layout, dtype=torch.float32)
    out, lse = attnlib.flash_attention(q, k, v, causal=True, layout=layout, return_lse=True, backend="torch")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 4, 33) and lse.dtype == torch.float32
    tr = (lambda t: t.transpose(1, 2)) if layout == "bshd" else (lambda t: t)
    ref, ref_lse = loop_attention(tr(q), tr(k), tr(v), True, 16 ** -0.5)
    assert_verbose_allclose(tr(out), ref, atol=2e-5)
    assert_verbose_allclose(lse, ref_lse, atol=2e-5)


def test_reference_gradients_match_float64_autograd_of_loop_free_formula():
    q, k, v = make_qkv(1, 2, 9, 8, seq_k=11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: flash_reference(a, b, c, causal=True), (q, k, v))
