"""Mask predictor cdf_threshold edges and the linear method's causal fp16 backward.
CPU: Triton under TRITON_INTERPRET=1 (conftest), small shapes."""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.predict import _visible_blocks
from attnlib.reference import linear_reference
from attnlib.testing import make_qkv, relative_rmse

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---- predict_block_mask(cdf_threshold=...) ---------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_cdf_threshold_one_keeps_every_visible_block_on_peaked_scores(causal):
    """Every visible block has P > 0, so only all of them reach a cumulative P of 1. With peaked
    block scores the float32 cumsum saturates at 1 early; the predictor used to drop the rest
    (17 of 40 blocks kept here)."""
    q, k, _ = make_qkv(1, 4, 64, 32, kv_heads=2, seq_k=100, device=DEVICE, seed=1)
    m = attnlib.predict_block_mask(q * 100, k * 100, block_size=(16, 16), cdf_threshold=1.0, causal=causal)
    vis = _visible_blocks(4, 7, (16, 16), 64, 100, causal, q.device)
    assert torch.equal(m, vis.expand_as(m))


def test_tiny_positive_cdf_threshold_keeps_the_top_block():
    """Any threshold > 0 needs at least the most probable block (the row's P sums to 1); a
    threshold under the 1e-7 rounding allowance used to select nothing."""
    q, k, _ = make_qkv(1, 2, 64, 32, seq_k=80, device=DEVICE, seed=2)
    for causal in (False, True):
        m = attnlib.predict_block_mask(q, k, block_size=(16, 16), cdf_threshold=1e-8, causal=causal)
        sees = _visible_blocks(4, 5, (16, 16), 64, 80, causal, q.device).any(-1)
        assert torch.equal(m.sum(-1), sees.to(torch.long).expand(1, 2, 4)), causal
        assert not attnlib.predict_block_mask(q, k, block_size=(16, 16), cdf_threshold=0.0, causal=causal).any()


# ---- linear, causal backward in fp16 ---------------------------------------------------------
def _linear_grads_vs_reference(q, k, v, feature, seed):
    for t in (q, k, v):
        t.requires_grad_()
    out = attnlib.linear_attention(q, k, v, feature_map=feature, causal=True)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = linear_reference(*leaves, feature_map=feature, causal=True)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    out.backward(dout)
    ref.backward(dout.double())
    errs = {"out": relative_rmse(out, ref)}
    for name, t, leaf in zip(("dq", "dk", "dv"), (q, k, v), leaves):
        assert torch.isfinite(t.grad).all(), name
        errs[name] = relative_rmse(t.grad, leaf.grad)
    return errs


@pytest.mark.parametrize("seq_q", [81, 145])
def test_linear_causal_fp16_gradients_with_rows_that_see_no_key(seq_q):
    """seq_q > seq_k, with seq_k - seq_q not a multiple of the chunk: a chunk holds rows that
    see no key (den = eps) beside rows that do. Their 1 / eps used to set the fp16 power-of-two
    scale of the chunk's dn products, flushing the other rows (dq rel RMSE 0.3-0.6). Contract
    (test_linear_triton): rel RMSE <= 5e-3 for fp16."""
    q, k, v = make_qkv(1, 2, seq_q, 64, seq_k=65, dtype=torch.float16, device=DEVICE, seed=seq_q)
    errs = _linear_grads_vs_reference(q, k, v, "elu", seed=seq_q)
    assert all(e <= 5e-3 for e in errs.values()), errs
    assert torch.all(q.grad[:, :, :seq_q - 65] == 0)


def test_linear_causal_fp16_relu_rows_with_zero_features():
    """relu rows whose phi(q) is all zero: output 0, no gradient, and (the defect) they no longer
    spoil the fp16 gradients of the other rows of their chunk (were rel RMSE ~5e-2)."""
    q, k, v = make_qkv(1, 2, 130, 64, dtype=torch.float16, device=DEVICE, seed=3)
    q[:, :, 5:9] = -q[:, :, 5:9].abs() - 0.1
    errs = _linear_grads_vs_reference(q, k, v, "relu", seed=3)
    assert all(e <= 5e-3 for e in errs.values()), errs
    assert torch.all(q.grad[:, :, 5:9] == 0)
