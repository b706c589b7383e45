"""Triton linear attention (linear-triton): forward against the quadratic form and the recurrent
form, gradients against the float64 reference, feature maps, GQA, odd lengths, both layouts,
seq_q != seq_k (bottom-right causal), finiteness on long sequences and all-zero relu rows.

Accuracy contract (issue 6): relative RMSE against float64 <= 1e-3 for fp32 inputs, <= 5e-3
for fp16 (bf16 on GPU: 2e-2, its 8-bit mantissa); gradients the same per tensor.
"""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.reference import linear_reference
from attnlib.reference.linear import feature_map_fn
from attnlib.testing import make_qkv, poison_

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL_RMSE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_rmse(out, ref) -> float:
    o, r = out.detach().double(), ref.detach().double()
    return ((o - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def quadratic(q, k, v, feature, causal, eps=1e-6):
    """(phi(Q) phi(K)^T masked) V / rowsum, in float64: the N x N form."""
    phi = feature_map_fn(feature)
    group = q.shape[1] // k.shape[1]
    pq = phi(q.double())
    pk = phi(k.double()).repeat_interleave(group, 1)
    a = pq @ pk.transpose(-1, -2)
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        i = torch.arange(sq, device=q.device)[:, None]
        a = a * (torch.arange(sk, device=q.device)[None, :] <= i + sk - sq)
    den = a.sum(-1, keepdim=True) + eps
    return (a @ v.double().repeat_interleave(group, 1)) / den


def recurrent(q, k, v, feature, eps=1e-6):
    """Causal (seq_q == seq_k) by the token-by-token recurrence S_t = S_{t-1} + phi(k_t)^T v_t."""
    phi = feature_map_fn(feature)
    group = q.shape[1] // k.shape[1]
    pq, pk = phi(q.double()), phi(k.double()).repeat_interleave(group, 1)
    vd = v.double().repeat_interleave(group, 1)
    s = pq.new_zeros(*pq.shape[:2], pq.shape[-1], vd.shape[-1])
    z = pq.new_zeros(*pq.shape[:2], pq.shape[-1])
    outs = []
    for t in range(q.shape[2]):
        s = s + pk[:, :, t, :, None] * vd[:, :, t, None, :]
        z = z + pk[:, :, t]
        num = torch.einsum("bhd,bhde->bhe", pq[:, :, t], s)
        outs.append(num / ((pq[:, :, t] * z).sum(-1, keepdim=True) + eps))
    return torch.stack(outs, dim=2)


def bhsd(x, layout):
    return x if layout == "bhsd" else x.transpose(1, 2)


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, head_dim_v, layout)
SHAPES = [
    (1, 2, 2, 77, 77, 32, 32, "bhsd"),
    (2, 4, 2, 45, 130, 24, 40, "bshd"),   # GQA, seq_q < seq_k, odd dims
    (1, 4, 1, 130, 45, 64, 64, "bhsd"),   # MQA, seq_q > seq_k: causal rows without keys give 0
]


@pytest.mark.parametrize("feature", ["elu", "relu", "softmax", "identity"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}kv{}q{}k{}d{}v{}-{}".format(*s))
def test_forward_and_gradients_fp32(shape, causal, feature):
    b, hq, hkv, sq, sk, d, dv, layout = shape
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, head_dim_v=dv, device=DEVICE, layout=layout,
                       requires_grad=True, seed=sq + sk + d)
    if feature == "identity":  # keep the denominator away from 0: positive features
        q, k = (t.detach().abs().requires_grad_() for t in (q, k))
    assert attnlib.explain(q, k, v, method="linear", layout=layout, causal=causal,
                           feature_map=feature).chosen.name == "linear-triton"
    out = attnlib.linear_attention(q, k, v, feature_map=feature, causal=causal, layout=layout)
    leaves = [bhsd(t, layout).detach().double().requires_grad_() for t in (q, k, v)]
    ref = linear_reference(*leaves, feature_map=feature, causal=causal)
    quad = quadratic(*leaves, feature, causal)
    assert rel_rmse(bhsd(out, layout), quad) <= 1e-3
    assert rel_rmse(ref, quad) <= 1e-9
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(bhsd(dout, layout).double())
    for name, t, leaf in zip(("dq", "dk", "dv"), (q, k, v), leaves):
        assert torch.isfinite(t.grad).all(), name
        assert rel_rmse(bhsd(t.grad, layout), leaf.grad) <= 1e-3, name


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp16(causal):
    q, k, v = make_qkv(1, 4, 97, 64, kv_heads=2, dtype=torch.float16, device=DEVICE, requires_grad=True, seed=5)
    out = attnlib.linear_attention(q, k, v, causal=causal)
    assert out.dtype == torch.float16
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = linear_reference(*leaves, causal=causal)
    assert rel_rmse(out, ref) <= REL_RMSE[torch.float16]
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.double())
    for name, t, leaf in zip(("dq", "dk", "dv"), (q, k, v), leaves):
        assert rel_rmse(t.grad, leaf.grad) <= REL_RMSE[torch.float16], name


@pytest.mark.parametrize("seq", [1, 63, 64, 65, 150])
def test_causal_chunked_equals_recurrent(seq):
    q, k, v = make_qkv(1, 2, seq, 16, device=DEVICE, seed=seq)
    out = attnlib.linear_attention(q, k, v, causal=True, feature_map="elu")
    assert rel_rmse(out, recurrent(q, k, v, "elu")) <= 1e-5


def test_relu_all_zero_rows_are_finite():
    q, k, v = make_qkv(1, 2, 40, 32, device=DEVICE, requires_grad=True, seed=6)
    with torch.no_grad():
        q[:, :, 5:9] = -q[:, :, 5:9].abs() - 0.1   # phi(q) = 0 on these rows
        k[:, :, 30:] = -k[:, :, 30:].abs() - 0.1
    for causal in (False, True):
        for eps in (1e-6, 0.0):
            out = attnlib.linear_attention(q, k, v, feature_map="relu", causal=causal, eps=eps)
            assert torch.isfinite(out).all()
            assert torch.all(out[:, :, 5:9] == 0)
            out.sum().backward()
            assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
            for t in (q, k, v):
                t.grad = None


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_long_sequence_is_finite(causal):
    """fp16 at 8k keys: the fp32 state stays bounded (128k is a gpu test)."""
    q, k, v = make_qkv(1, 1, 64 if not causal else 8192, 16, seq_k=8192, dtype=torch.float16, device=DEVICE,
                       seed=7)
    out = attnlib.linear_attention(q, k, v * 100, causal=causal)
    assert torch.isfinite(out).all()


def test_launchers_write_every_element():
    from attnlib.triton_kernels.linear import kernels

    q, k, v = make_qkv(1, 4, 37, 40, kv_heads=2, seq_k=21, head_dim_v=24, device=DEVICE, seed=8)
    for causal in (False, True):
        out = poison_(torch.empty(1, 4, 37, 24))
        if causal:
            kernels.causal(q, k, v, out, "elu", offset=21 - 37, normalize=True, eps=1e-6)
        else:
            s, z = kernels.state(k, v, "elu")
            kernels.apply(q, s, z, out, "elu", 1e-6)
        assert torch.isfinite(out).all()


def test_bad_options_are_named():
    q, k, v = make_qkv(1, 2, 16, 32, device=DEVICE)
    with pytest.raises(ValueError, match="feature_map"):
        attnlib.linear_attention(q, k, v, feature_map="tanh")
    with pytest.raises(ValueError, match="eps"):
        attnlib.linear_attention(q, k, v, eps=-1.0)


# ---- GPU only --------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_128k_finite_and_accurate(dtype, causal):
    q, k, v = make_qkv(1, 2, 131072, 128, dtype=dtype, device="cuda", seed=9)
    out = attnlib.linear_attention(q, k, v, causal=causal)
    assert torch.isfinite(out).all()
    sl = slice(-256, None)  # check the last rows (longest prefix) against the float32 reference
    ref = linear_reference(q, k, v, causal=causal)
    assert rel_rmse(out[:, :, sl], ref[:, :, sl]) <= REL_RMSE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_gradients(dtype, causal):
    q, k, v = make_qkv(2, 8, 3000, 128, kv_heads=2, seq_k=3100, dtype=dtype, device="cuda", requires_grad=True,
                       seed=10)
    out = attnlib.linear_attention(q, k, v, causal=causal)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = linear_reference(*leaves, causal=causal)
    assert rel_rmse(out, ref) <= REL_RMSE[dtype]
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.double())
    for name, t, leaf in zip(("dq", "dk", "dv"), (q, k, v), leaves):
        assert rel_rmse(t.grad, leaf.grad) <= REL_RMSE[dtype], name
