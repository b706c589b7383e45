"""Review of method sage's public entry points (attnlib.sage_attention, attention(method="sage"),
the sageattention compat module): defects found and fixed, each test failing without its fix.

- sageattn_qk_int8_pv_fp8_cuda_sm90(..., smooth_v=True) raised Python's "got multiple values for
  argument 'smooth_v'" from inside the compat module (it passed smooth_v=False positionally and
  forwarded the caller's keyword too); the keyword is now honoured and checked.
- smooth_v on float64 inputs subtracted V's mean and added it back in float32: the float64 sage
  (the reference path) lost ~half a float32 ulp of the mean (0.03 for a mean of 1e6).
- A NaN or inf in Q or K gave a finite output on the Triton (and CUDA) kernels: their INT8 block
  scale took a max that drops NaN, and the non-finite value was clamped into INT8. The block's scale
  is now NaN, as the reference's (torch's amax propagates NaN), so the rows reading it are NaN.
"""
import pytest
import torch

from attnlib.compat.sageattention import sageattn_qk_int8_pv_fp16_cuda, sageattn_qk_int8_pv_fp8_cuda, \
    sageattn_qk_int8_pv_fp8_cuda_sm90
from attnlib.reference.flash import flash_reference


def _qkv(b, hq, hkv, sq, sk, d, dtype, seed=0, v_mean=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64) + v_mean
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("tensor_layout", ["HND", "NHD"])
def test_sm90_entry_point_takes_smooth_v(tensor_layout):
    """smooth_v=True on the sm90 entry point runs what sageattn_qk_int8_pv_fp8_cuda runs with it
    (V's mean of 40 removed before fp8 and added back), close to exact float64 attention."""
    q, k, v = _qkv(1, 4, 2, 45, 70, 32, torch.float32, seed=1, v_mean=40.0)
    if tensor_layout == "NHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, tensor_layout=tensor_layout, is_causal=True, smooth_v=True)
    same = sageattn_qk_int8_pv_fp8_cuda(q, k, v, tensor_layout=tensor_layout, is_causal=True, smooth_v=True)
    assert torch.equal(out, same)
    bh = (lambda t: t) if tensor_layout == "HND" else (lambda t: t.transpose(1, 2))
    exact = flash_reference(*(bh(t).double() for t in (q, k, v)), causal=True)
    # fp8 P and V (3 mantissa bits) of the centred V, INT8 scores: within 0.15 of values ~1
    assert (bh(out).double() - exact).abs().max() < 0.15
    # the default (no smoothing) still takes no smooth_v; a non-bool one is refused by name
    assert torch.equal(sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, tensor_layout=tensor_layout, is_causal=True),
                       sageattn_qk_int8_pv_fp8_cuda(q, k, v, tensor_layout=tensor_layout, is_causal=True))
    with pytest.raises(TypeError, match="smooth_v must be a bool"):
        sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, tensor_layout=tensor_layout, smooth_v=1)


@pytest.mark.parametrize("tensor_layout,causal", [("HND", True), ("NHD", False)])
def test_smooth_v_float64_stays_float64(tensor_layout, causal):
    """V + 1e6 with smooth_v gives the output for V plus 1e6 to float64 precision (the centred V
    is the same up to float64 rounding); in float32 the mean's rounding cost ~0.03. GQA, seq_q >
    seq_k causal (rows that see no key stay 0, without the mean)."""
    mu = 1e6
    q, k, v = _qkv(2, 4, 2, 50, 30, 16, torch.float64, seed=2)
    if tensor_layout == "NHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    kw = dict(tensor_layout=tensor_layout, is_causal=causal, smooth_v=True)
    base = sageattn_qk_int8_pv_fp16_cuda(q, k, v, **kw)
    shifted = sageattn_qk_int8_pv_fp16_cuda(q, k, v + mu, **kw)
    assert shifted.dtype == torch.float64
    sees = torch.arange(50) >= (50 - 30 if causal else 0)
    sees = sees.view(-1, 1) if tensor_layout == "HND" else sees.view(-1, 1, 1)
    assert (shifted - mu * sees - base).abs().max() < 1e-6
    # and the float64 result is float64 sage: close to exact attention on the shifted V
    bh = (lambda t: t) if tensor_layout == "HND" else (lambda t: t.transpose(1, 2))
    exact = flash_reference(bh(q), bh(k), bh(v + mu), causal=causal)
    assert (bh(shifted) - exact).nan_to_num(0.0).abs().max() < 0.05


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_is_not_hidden(backend, where, value):
    """One NaN or inf element in head 0 of q, k or v: every kernel's output is non-finite in
    head 0 (exact attention's is: all rows for k and v, the row for q; sage's per-block INT8 scale
    spreads it to the block) and finite in the untouched head 1. The Triton and CUDA kernels gave a
    finite head 0 for q and k."""
    import attnlib
    from attnlib.dispatch import kernels

    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if backend == "triton" and not torch.cuda.is_available():
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton kernels run on a CPU only under TRITON_INTERPRET=1")
    if not any(k.backend == backend and not k.unavailable_reasons() for k in kernels("sage")):
        pytest.skip(f"no available sage-{backend} kernel")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device) for t in _qkv(1, 2, 2, 80, 80, 64, torch.float16, seed=4))
    {"q": q, "k": k, "v": v}[where][0, 0, 5, 3] = value
    out = attnlib.attention(q, k, v, method="sage", backend=backend)
    assert not torch.isfinite(out[0, 0]).all(), "a non-finite input gave a finite output"
    if where != "q":  # every row reads the broken key/value
        assert (~torch.isfinite(out[0, 0])).any(-1).all()
    else:
        assert not torch.isfinite(out[0, 0, 5]).all()
    assert torch.isfinite(out[0, 1]).all()
