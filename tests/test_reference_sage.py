"""sage_reference and quantize_per_block: INT8 quantization rules, smoothing, accuracy contract."""
import math

import pytest
import torch

import attnlib
from attnlib.inputs import to_bhsd
from attnlib.reference import flash_reference, sage_reference
from attnlib.reference.sage import quantize_per_block, round_half_away
from attnlib.testing import assert_verbose_allclose, make_qkv, metrics

# SageAttention's accuracy contract against exact attention (randn inputs)
COS_MIN, REL_L1_MAX = 0.999, 3e-2
# lse error comes from INT8 score noise: a few 1e-3 typically
LSE_ATOL = 5e-2


# -- quantization ---------------------------------------------------------------------------
def test_round_half_away_from_zero():
    y = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997, -0.49999997, 1.4, -1.6, 0.0, 126.5])
    want = torch.tensor([1., -1., 2., -2., 3., -3., 0., 0., 1., -2., 0., 127.])
    assert torch.equal(round_half_away(y), want)
    assert torch.equal(round_half_away(y.double()), want.double())


def test_quantize_ties_and_exact_delta():
    # max|x| = 127 -> delta = 1 exactly, so x / delta keeps the ties
    x = torch.tensor([127.0, 0.5, -0.5, 2.5, -2.5, 1.4, -1.6, 0.0])[:, None]
    xi, delta = quantize_per_block(x, block=8)
    assert xi.dtype == torch.int8 and delta.dtype == torch.float32
    assert delta.shape == (1, 1) and delta.item() == 1.0
    assert xi.flatten().tolist() == [127, 1, -1, 3, -3, 1, -2, 0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_scales_are_ieee_quotients_on_every_device(device):
    """delta = max|x| / 127 and delta_v = max|v| / 448 as correctly rounded float32 quotients (the
    kernels use div_rn). PyTorch's CUDA division by a Python scalar multiplies by the reciprocal,
    one ulp off for these x: the H100 run of 2026-11-27 failed 40 bit-exact kernel tests on it."""
    from attnlib.reference.sage import divide_by_constant, quantize_v_fp8

    x = torch.rand(200_000, generator=torch.Generator().manual_seed(5)).add_(0.5)
    for c in (127.0, 448.0):
        want = (x.double() / c).float()
        assert not torch.equal(x * (1.0 / c), want)  # the reciprocal differs somewhere here
        assert torch.equal(divide_by_constant(x.to(device), c).cpu(), want)
    amax = x[:2048].reshape(32, 64)  # one block / one channel per row: its max is the scale
    _, delta = quantize_per_block(amax.to(device)[:, None, :], block=1, dim=-2)
    assert torch.equal(delta.flatten().cpu(), (amax.double().amax(-1) / 127).float())
    _, delta_v = quantize_v_fp8(amax.t().to(device))
    assert torch.equal(delta_v.flatten().cpu(), (amax.double().amax(-1) / 448).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_quantize_per_block_matches_definition(dtype):
    x = torch.randn(2, 3, 45, 16).to(dtype) * 3
    xi, delta = quantize_per_block(x, block=16)
    assert xi.shape == x.shape and delta.shape == (2, 3, 3, 1)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    for b in range(3):
        blk = x[:, :, 16 * b:16 * (b + 1)].to(ct)
        want_delta = (blk.abs().amax(dim=(-1, -2)) / 127).float()
        assert torch.equal(delta[:, :, b, 0], want_delta)  # delta = max|x| / 127, exactly
        y = blk / want_delta.to(ct)[..., None, None]
        want = (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp(-127, 127)
        assert torch.equal(xi[:, :, 16 * b:16 * (b + 1)].to(ct), want)
        assert xi[:, :, 16 * b:16 * (b + 1)].abs().amax(dim=(-1, -2)).eq(127).all()


def test_quantize_zero_block_and_other_dim():
    x = torch.randn(1, 1, 24, 8)
    x[:, :, 8:16] = 0
    xi, delta = quantize_per_block(x, block=8)
    assert delta[0, 0, 1, 0].item() == 0.0 and (xi[:, :, 8:16] == 0).all()
    assert delta[0, 0, 0, 0].item() > 0
    # quantizing along dim=-1 equals quantizing the transpose along -2
    xt = x.transpose(-1, -2).contiguous()
    xi_t, delta_t = quantize_per_block(xt, block=8, dim=-1)
    assert torch.equal(xi_t, xi.transpose(-1, -2)) and torch.equal(delta_t, delta)


def test_quantize_blocks_independent():
    x = torch.randn(1, 2, 40, 8)
    xi, delta = quantize_per_block(x, block=16)  # blocks [0,16) [16,32) [32,40)
    x2 = x.clone()
    x2[:, :, 16:32] *= 50.0
    xi2, delta2 = quantize_per_block(x2, block=16)
    for sl, b in ((slice(0, 16), 0), (slice(32, 40), 2)):
        assert torch.equal(xi[:, :, sl], xi2[:, :, sl]) and torch.equal(delta[:, :, b], delta2[:, :, b])
    assert not torch.equal(delta[:, :, 1], delta2[:, :, 1])


# -- an independent, loop-based float64 formula ------------------------------------------------
def _sage_loops(q, k, v, causal, scale, q_block, k_block):
    """Block-by-block float64 SageAttention with Python loops (two passes: row max, then PV)."""
    b_, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    c = scale * math.log2(math.e)
    out = torch.zeros(b_, hq, sq, dv, dtype=torch.float64)
    lse = torch.full((b_, hq, sq), -math.inf, dtype=torch.float64)

    def quant(blk):
        delta = torch.tensor((blk.abs().max() / 127).item(), dtype=torch.float32).double()
        if delta == 0:
            return torch.zeros_like(blk), delta
        y = blk / delta
        return (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp(-127, 127), delta

    for bi in range(b_):
        for h in range(hq):
            kh = k[bi, h // group].double()
            mean = kh.mean(dim=0)
            ks = kh - mean
            qh = q[bi, h].double() * c
            s = torch.full((sq, sk), -math.inf, dtype=torch.float64)
            for i0 in range(0, sq, q_block):
                qi, dq = quant(qh[i0:i0 + q_block])
                for j0 in range(0, sk, k_block):
                    ki, dk = quant(ks[j0:j0 + k_block])
                    s[i0:i0 + q_block, j0:j0 + k_block] = (qi @ ki.T) * dq * dk
            for i in range(sq):
                for j in range(sk):
                    if causal and j > i + sk - sq:
                        s[i, j] = -math.inf
                m = s[i].max()
                if m == -math.inf:
                    continue
                p = torch.exp2(s[i] - m)
                l = p.sum()
                p16 = p.half().double()
                out[bi, h, i] = (p16[:, None] * v[bi, h // group].half().double()).sum(0) / l
                lse[bi, h, i] = (m + math.log2(l)) * math.log(2) + scale * (q[bi, h, i].double() @ mean)
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
def test_matches_loop_formula(causal):
    q, k, v = make_qkv(1, 2, 37, 16, kv_heads=1, seq_k=29, dtype=torch.float64)
    out, lse = sage_reference(q, k, v, causal=causal, return_lse=True, q_block=16, k_block=8)
    ref, ref_lse = _sage_loops(q, k, v, causal, 16 ** -0.5, 16, 8)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert_verbose_allclose(out, ref, atol=1e-12, rtol=1e-12)
    assert_verbose_allclose(lse, ref_lse, atol=1e-12, rtol=1e-12, name="lse")


# -- algorithmic properties ----------------------------------------------------------------------
def test_smoothing_removes_key_bias():
    q, k, v = make_qkv(1, 2, 70, 32, seq_k=90, dtype=torch.float64)
    bias = 5.0 * torch.randn(1, 2, 1, 32, dtype=torch.float64)
    out, lse = sage_reference(q, k, v, return_lse=True)
    out_b, lse_b = sage_reference(q, k + bias, v, return_lse=True)
    # smoothing subtracts the bias exactly up to float64 rounding; at most a rare INT8 flip
    assert_verbose_allclose(out_b, out, atol=1e-6)
    shift = 32 ** -0.5 * (q @ bias.transpose(-1, -2)).squeeze(-1)  # lse sees the unsmoothed scores
    assert_verbose_allclose(lse_b, lse + shift, atol=1e-6, name="lse")


@pytest.mark.parametrize("k_bias", [0.0, 8.0])
@pytest.mark.parametrize("causal", [False, True])
def test_close_to_exact_attention(k_bias, causal):
    q, k, v = make_qkv(2, 2, 256, 64, k_bias=k_bias)
    out, lse = sage_reference(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = flash_reference(q, k, v, causal=causal, return_lse=True)
    m = metrics(out, ref)
    assert m["finite"] and m["cos_sim"] > COS_MIN and m["rel_l1"] < REL_L1_MAX, m
    assert_verbose_allclose(lse, ref_lse, atol=LSE_ATOL, name="lse")


def test_fp16_inputs():
    q, k, v = make_qkv(1, 2, 100, 64, dtype=torch.float16)
    out = sage_reference(q, k, v)
    assert out.dtype == torch.float16
    m = metrics(out, flash_reference(q.double(), k.double(), v.double()))
    assert m["cos_sim"] > COS_MIN and m["rel_l1"] < REL_L1_MAX, m


@pytest.mark.parametrize("seq_q,seq_k", [(1, 1), (1, 129), (17, 17), (129, 17), (129, 129)])
def test_odd_lengths(seq_q, seq_k):
    q, k, v = make_qkv(1, 2, seq_q, 64, seq_k=seq_k)
    out, lse = sage_reference(q, k, v, return_lse=True)
    ref, ref_lse = flash_reference(q, k, v, return_lse=True)
    m = metrics(out, ref)
    assert out.shape == ref.shape and m["finite"] and m["cos_sim"] > COS_MIN, m
    assert_verbose_allclose(lse, ref_lse, atol=LSE_ATOL, name="lse")


def test_gqa_equals_expanded_kv():
    q, k, v = make_qkv(1, 4, 80, 32, kv_heads=2, seq_k=70)
    kx, vx = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    for causal in (False, True):
        out, lse = sage_reference(q, k, v, causal=causal, return_lse=True)
        out_x, lse_x = sage_reference(q, kx, vx, causal=causal, return_lse=True)
        assert torch.equal(out, out_x) and torch.equal(lse, lse_x)


def test_fully_masked_rows():
    q, k, v = make_qkv(1, 2, 40, 32, seq_k=24, requires_grad=True)
    out, lse = sage_reference(q, k, v, causal=True, return_lse=True)
    # bottom-right causal: query i sees keys j <= i - 16, so rows 0..15 see nothing
    assert (out[:, :, :16] == 0).all() and torch.isneginf(lse[:, :, :16]).all()
    assert torch.isfinite(out[:, :, 16:]).all() and torch.isfinite(lse[:, :, 16:]).all()
    out.sum().backward()
    assert torch.isfinite(v.grad).all()  # q and k get no gradient through quantization
    assert q.grad is None and k.grad is None


# -- end to end through the dispatcher ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_attention_api_torch_backend(dtype, layout):
    q, k, v = make_qkv(1, 4, 50, 32, kv_heads=2, seq_k=70, dtype=dtype, layout=layout)
    out, lse = attnlib.attention(q, k, v, method="sage", backend="torch", layout=layout, causal=True,
                                 return_lse=True)
    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    ref, ref_lse = sage_reference(qb, kb, vb, causal=True, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.equal(to_bhsd(out, layout), ref) and torch.equal(lse, ref_lse)
    no_smooth = attnlib.sage_attention(q, k, v, layout=layout, smooth_k=False, backend="torch")
    ref_ns = sage_reference(qb, kb, vb, smooth_k=False)
    assert torch.equal(to_bhsd(no_smooth, layout), ref_ns)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("pv", ["fp16", "fp16_accum"])
def test_gqa_value_gradient_equals_expanded_kv(dtype, pv):
    """GQA's gradient into v: each query head's, then summed per kv head as repeat_interleave's
    backward sums (in float32, rounded once), bit for bit what the reference gives for V repeated
    by hand. A gather of kv heads per query head instead accumulates the query heads' half
    gradients one rounding at a time."""
    q, k, v = make_qkv(1, 8, 300, 32, kv_heads=2, seq_k=257, dtype=dtype, k_bias=3.0, seed=3)
    v.requires_grad_()
    dout = torch.randn(1, 8, 300, 32, generator=torch.Generator().manual_seed(4)).to(dtype)
    for causal in (False, True):
        out = sage_reference(q, k, v, causal=causal, pv=pv)
        kx, vx = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
        out_x = sage_reference(q, kx, vx, causal=causal, pv=pv)
        assert torch.equal(out, out_x)
        (dv,) = torch.autograd.grad(out, v, dout)
        (dv_x,) = torch.autograd.grad(out_x, v, dout)
        assert torch.equal(dv, dv_x), (dv.double() - dv_x.double()).abs().max()
