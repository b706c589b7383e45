"""attnlib.SparseLinearAttention: zero-initialised projection (equals sparse attention over the
critical blocks), gradients for the projection against the float64 reference, a training step,
the returned block map, layouts / GQA / causal, and named errors for bad input."""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.reference import block_sparse_reference, sla_block_classes, sla_reference
from attnlib.testing import assert_sla_rule, make_qkv, sla_float64_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KW = dict(critical=0.25, negligible=0.25, block_size=(16, 16))


def test_zero_init_is_sparse_attention_and_returns_the_map():
    m = attnlib.SparseLinearAttention(16, **KW).to(DEVICE)
    assert torch.all(m.proj.weight == 0) and torch.all(m.proj.bias == 0)
    q, k, v = make_qkv(1, 4, 45, 16, kv_heads=2, seq_k=60, device=DEVICE, seed=1)
    out, block_map = m(q, k, v, causal=True, return_block_map=True)
    ref_map = sla_block_classes(q, k, causal=True, **KW)
    assert block_map.dtype == torch.int8 and torch.equal(block_map, ref_map)
    ref = block_sparse_reference(q.double(), k.double(), v.double(), ref_map == 1, block_size=(16, 16), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_projection_gradients_and_training_step(layout):
    torch.manual_seed(0)
    m = attnlib.SparseLinearAttention(16, feature_map="elu", **KW).to(DEVICE)
    q, k, v = make_qkv(1, 2, 40, 16, seq_k=50, device=DEVICE, layout=layout, requires_grad=True, seed=2)
    out = m(q, k, v, layout=layout)
    dout = torch.randn_like(out)
    out.backward(dout)
    tb = (lambda x: x) if layout == "bhsd" else (lambda x: x.transpose(1, 2))
    leaves = [tb(t).detach().double().requires_grad_() for t in (q, k, v)]
    w64, b64 = (p.detach().double().requires_grad_() for p in (m.proj.weight, m.proj.bias))
    ref = sla_reference(*leaves, w64, b64, feature_map="elu", **KW)
    ref.backward(tb(dout).double())
    for name, got, want in (("dW", m.proj.weight.grad, w64.grad), ("db", m.proj.bias.grad, b64.grad),
                            ("dq", tb(q.grad), leaves[0].grad), ("dk", tb(k.grad), leaves[1].grad),
                            ("dv", tb(v.grad), leaves[2].grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4, msg=name)
    assert m.proj.weight.grad.abs().sum() > 0  # the marginal branch trains from zero
    # one step moves the projection; the output then follows the reference with the new weights
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    with torch.no_grad():
        out2 = m(q, k, v, layout=layout)
        ref2 = sla_reference(*(tb(t).double() for t in (q, k, v)), m.proj.weight.double(), m.proj.bias.double(),
                             feature_map="elu", **KW)
    assert not torch.allclose(out2, out)
    torch.testing.assert_close(tb(out2).double(), ref2, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [(24, 24), (16, 24)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_block_map_for_block_sizes_the_kernels_do_not_take(block_size):
    """Block sizes sla-triton rejects (not powers of two) run on the reference, and so does the
    returned block map (the Triton classifier tiles a block as one power-of-two range)."""
    kw = dict(critical=0.25, negligible=0.25, block_size=block_size)
    m = attnlib.SparseLinearAttention(16, **kw).to(DEVICE)
    q, k, v = make_qkv(1, 2, 50, 16, seq_k=70, device=DEVICE, seed=6)
    out, block_map = m(q, k, v, causal=True, return_block_map=True)
    ref_map = sla_block_classes(q, k, causal=True, **kw)
    assert block_map.dtype == torch.int8 and torch.equal(block_map, ref_map)
    # zero-initialised projection: the output is sparse attention over the critical blocks
    ref = block_sparse_reference(q.double(), k.double(), v.double(), ref_map == 1, block_size=block_size, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out, m(q, k, v, causal=True))
    assert torch.equal(attnlib.sla_block_map(q, k, **kw), sla_block_classes(q, k, **kw))


def test_fp16_activations_with_fp32_parameters():
    """fp16 q, k, v with the module's float32 projection: out stays fp16, the parameters' gradients
    float32 (check_dtypes), and out with all five gradients (dq, dk, dv fp16; dW, db fp32) hold
    flash_attn's rule against the float64 reference given the same inputs and parameters; the
    baseline is the reference's formula on the fp16 inputs (float32 compute, one rounding)."""
    m = attnlib.SparseLinearAttention(32, **KW).to(DEVICE)
    with torch.no_grad():
        m.proj.weight.copy_(torch.randn(32, 32) * 0.2)
        m.proj.bias.copy_(torch.randn(32) * 0.1)
    q, k, v = make_qkv(1, 2, 48, 32, device=DEVICE, dtype=torch.float16, requires_grad=True, seed=3)
    out = m(q, k, v, causal=True)
    assert out.dtype == torch.float16
    w, b = m.proj.weight, m.proj.bias
    _, leaves, proj64, ref = sla_float64_reference(q, k, v, w, b, causal=True, feature_map="softmax", **KW)
    dout = torch.randn_like(out)
    assert_sla_rule(out, q, k, v, w, b, layout="bhsd", ref=ref, leaves=leaves, proj64=proj64,
                    baseline=lambda *t: sla_reference(*t, causal=True, **KW), dout=dout, factor=3.0,
                    check_dtypes=True)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="head_dim"):
        attnlib.SparseLinearAttention(0)
    with pytest.raises(ValueError, match="critical"):
        attnlib.SparseLinearAttention(16, critical=1.2)
    with pytest.raises(ValueError, match="critical \\+ negligible"):
        attnlib.SparseLinearAttention(16, critical=0.7, negligible=0.5)
    with pytest.raises(ValueError, match="block_size"):
        attnlib.SparseLinearAttention(16, block_size=(16,))
    with pytest.raises(ValueError, match="feature_map"):
        attnlib.SparseLinearAttention(16, feature_map="tanh")
    m = attnlib.SparseLinearAttention(16, **KW)
    q, k, v = make_qkv(1, 2, 20, 32, seed=4)
    with pytest.raises(ValueError, match="q must have head_dim 16"):
        m(q, k, v)
    with pytest.raises(ValueError, match="layout"):
        m(q, k, v, layout="sbhd")
    with pytest.raises(TypeError, match="return_block_map"):
        m(*make_qkv(1, 2, 20, 16, seed=5), return_block_map=1)
