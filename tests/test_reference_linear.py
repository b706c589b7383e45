"""linear_reference against an explicit-loop float64 formula; feature maps, causal alignment, grads."""
import pytest
import torch
import torch.nn.functional as F

import attnlib
import attnlib.reference.linear as linear_mod
from attnlib.inputs import to_bhsd
from attnlib.reference import linear_reference
from attnlib.reference.linear import feature_map_fn
from attnlib.testing import assert_verbose_allclose, make_qkv

MAPS = ["elu", "relu", "softmax", "identity"]
# identity can put a denominator near 0, so outputs are compared relatively too
RTOL64, ATOL64 = 1e-9, 1e-11
RTOL32, ATOL32 = 1e-4, 1e-5

_PHI = {  # written out independently of the module's table
    "elu": lambda x: torch.where(x > 0, x + 1, torch.exp(x)),
    "relu": lambda x: x.clamp_min(0),
    "softmax": lambda x: torch.exp(x - x.max()) / torch.exp(x - x.max()).sum(),
    "identity": lambda x: x,
}


def _loop_formula(q, k, v, feature_map, causal, eps=1e-6):
    b_, hq, sq, _ = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    phi = _PHI[feature_map]
    out = torch.zeros(b_, hq, sq, dv, dtype=torch.float64)
    for b in range(b_):
        for h in range(hq):
            hk = h // (hq // hkv)
            for i in range(sq):
                fq = phi(q[b, h, i].double())
                num = torch.zeros(dv, dtype=torch.float64)
                den = torch.zeros((), dtype=torch.float64)
                seen = False
                for j in range(sk):
                    if causal and j > i + sk - sq:
                        continue
                    a = fq @ phi(k[b, hk, j].double())
                    num = num + a * v[b, hk, j].double()
                    den = den + a
                    seen = True
                if seen:
                    out[b, h, i] = num / (den + eps)
    return out


def test_feature_map_fn():
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(feature_map_fn("elu")(x), F.elu(x) + 1, atol=1e-15, rtol=0)
    assert torch.equal(feature_map_fn("elu")(-x.abs()), torch.exp(-x.abs()))  # exp below 0: no cancellation
    assert feature_map_fn("elu")(torch.tensor(-30.0)) > 0
    assert torch.equal(feature_map_fn("relu")(x), F.relu(x))
    assert torch.allclose(feature_map_fn("softmax")(x).sum(-1), torch.ones(3, dtype=torch.float64))
    assert feature_map_fn("identity")(x) is x
    assert (feature_map_fn("elu")(x) > 0).all()
    with pytest.raises(ValueError, match="feature_map"):
        feature_map_fn("cosine")


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(13, 13), (7, 19), (19, 7), (1, 17)])
def test_matches_loop_formula(feature_map, causal, seq_q, seq_k, monkeypatch):
    monkeypatch.setattr(linear_mod, "_CHUNK", 5)  # several prefix-sum chunks, ragged last one
    q, k, v = make_qkv(1, 4, seq_q, 8, kv_heads=2, seq_k=seq_k, head_dim_v=6, dtype=torch.float64)
    out = linear_reference(q, k, v, feature_map=feature_map, causal=causal)
    ref = _loop_formula(q, k, v, feature_map, causal)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    assert_verbose_allclose(out, ref, atol=ATOL64, rtol=RTOL64)
    if causal and seq_q > seq_k:  # bottom-right: the first seq_q - seq_k queries see no key
        assert (out[:, :, :seq_q - seq_k] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_float32_default_chunking(causal):
    # 600 keys: three chunks of the default prefix-sum size; masked quadratic form as the reference
    q, k, v = make_qkv(1, 2, 300, 16, seq_k=600)
    out = linear_reference(q, k, v, causal=causal)
    pq, pk = F.elu(q.double()) + 1, F.elu(k.double()) + 1
    a = pq @ pk.transpose(-1, -2)
    if causal:
        a = a * (torch.arange(600)[None, :] <= torch.arange(300)[:, None] + 300)
    ref = (a @ v.double()) / (a.sum(-1, keepdim=True) + 1e-6)
    assert out.dtype == torch.float32
    assert_verbose_allclose(out, ref, atol=ATOL32, rtol=RTOL32)


def test_eps_zero_rows_without_keys_are_zero():
    q, k, v = make_qkv(1, 2, 9, 8, seq_k=4, requires_grad=True)
    out = linear_reference(q, k, v, causal=True, eps=0.0)
    assert (out[:, :, :5] == 0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("feature_map", ["elu", "softmax"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(feature_map, causal):
    q, k, v = make_qkv(1, 2, 5, 3, kv_heads=1, seq_k=6, head_dim_v=2, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: linear_reference(q, k, v, feature_map=feature_map, causal=causal)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_attention_api_torch_backend(dtype, layout):
    q, k, v = make_qkv(1, 4, 11, 8, kv_heads=2, seq_k=14, dtype=dtype, layout=layout)
    out = attnlib.attention(q, k, v, method="linear", backend="torch", layout=layout, causal=True,
                            feature_map="relu", eps=1e-3)
    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    ref = _loop_formula(qb, kb, vb, "relu", True, eps=1e-3)
    assert out.dtype == dtype and out.shape == q.shape
    rtol, atol = (RTOL64, ATOL64) if dtype == torch.float64 else (RTOL32, ATOL32)
    assert_verbose_allclose(to_bhsd(out, layout), ref, atol=atol, rtol=rtol)
    out2 = attnlib.linear_attention(q, k, v, layout=layout, backend="torch")  # defaults: elu, non-causal
    ref2 = _loop_formula(qb, kb, vb, "elu", False)
    assert_verbose_allclose(to_bhsd(out2, layout), ref2, atol=atol, rtol=rtol)


def test_attention_api_backward_matches_reference():
    q, k, v = make_qkv(1, 4, 11, 8, kv_heads=2, seq_k=14, layout="bshd", requires_grad=True)
    out = attnlib.attention(q, k, v, method="linear", backend="torch", layout="bshd", causal=True)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref = linear_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    grads_ref = torch.autograd.grad((ref * g.transpose(1, 2)).sum(), (q, k, v))
    for name, ga, gr in zip("qkv", grads, grads_ref):
        assert_verbose_allclose(ga, gr, atol=ATOL32, rtol=RTOL32, name=f"d{name}")


@pytest.mark.parametrize("causal", [False, True])
def test_zero_denominator_rows_are_zero(causal):
    # relu with eps = 0: a row whose phi(q) is all zero has numerator and denominator 0; it gives 0
    # (as the Triton kernels do), not NaN, and passes no gradient
    q, k, v = make_qkv(1, 2, 9, 8, seq_k=12, dtype=torch.float64, seed=2)
    q[:, :, ::2] = -q[:, :, ::2].abs() - 0.1
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = linear_reference(q, k, v, feature_map="relu", causal=causal, eps=0.0)
    assert (out[:, :, ::2] == 0).all() and torch.isfinite(out).all()
    ref = _loop_formula(q, k, v, "relu", causal, eps=0.0)
    assert_verbose_allclose(out[:, :, 1::2], ref[:, :, 1::2], atol=ATOL64, rtol=RTOL64)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[:, :, ::2] == 0).all()
