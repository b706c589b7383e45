"""Meta tensors (shape inference, deferred initialisation, FLOP counting on the meta device) get
outputs, lse and gradients of the shapes, dtypes and strides the same call returns on real
tensors, as torch's scaled_dot_product_attention does on them; no kernel is selected (the op's
Meta kernel is its fake implementation, which tracing under torch.compile runs too), and the
argument checks raise as on real tensors.

Before, an eager call on meta tensors took the direct path past the dispatcher and raised
NoKernelError ("device meta not supported") for every method.
"""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib import dispatch
from attnlib.compat import flash_attn as fa
from attnlib.compat import sageattention as sa

B, HQ, HKV, S, D = 2, 4, 2, 37, 16  # GQA; S not a multiple of the 16-token blocks


def _options(method: str, device: str, dtype: torch.dtype, grad: bool) -> dict:
    if method == "block_sparse":
        return {"block_mask": torch.ones(B, HQ, 3, 3, dtype=torch.bool, device=device), "block_size": (16, 16)}
    if method == "sla":
        w = torch.randn(D, D, dtype=dtype).to(device).requires_grad_(grad)
        return {"proj_weight": w, "block_size": (16, 16)}
    if method == "asymrnr":
        return {"grid": (4, 4, 4)}  # 64 tokens
    return {}


def _described(outs) -> list:
    return [(tuple(t.shape), t.dtype, t.stride(), t.device.type) if isinstance(t, torch.Tensor) else t
            for t in outs]


def _call(device: str, method: str, causal: bool, layout: str, dtype: torch.dtype, return_lse: bool,
          grad: bool) -> list:
    seq = 64 if method == "asymrnr" else S
    gen = torch.Generator().manual_seed(0)

    def rnd(h):
        shape = (B, h, seq, D) if layout == "bhsd" else (B, seq, h, D)
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device).requires_grad_(grad)
    q, k, v = rnd(HQ), rnd(HKV), rnd(HKV)
    opts = _options(method, device, dtype, grad)
    res = attnlib.attention(q, k, v, method=method, causal=causal, layout=layout, return_lse=return_lse,
                            backend="torch", **opts)
    outs = list(res) if return_lse else [res]
    if grad:
        outs[0].float().sum().backward()
        outs += [q.grad, k.grad, v.grad] + ([opts["proj_weight"].grad] if method == "sla" else [])
    return _described(outs)


@pytest.fixture
def no_selection(monkeypatch):
    """A meta call must not reach kernel selection (no kernel runs on meta tensors)."""
    def refuse(*a, **kw):
        raise AssertionError("dispatch.select called for meta tensors")
    monkeypatch.setattr(dispatch, "select", refuse)


CASES = [
    # method, causal, layout, dtype, return_lse, grad
    ("flash", False, "bhsd", torch.float16, False, False),
    ("flash", True, "bshd", torch.float32, True, False),
    ("flash", True, "bhsd", torch.float32, False, True),  # CPU fp32 training: torch SDPA's autograd
    ("flash", False, "bshd", torch.float64, True, True),
    ("sage", True, "bshd", torch.float16, True, False),
    ("block_sparse", False, "bhsd", torch.float32, True, True),
    ("block_sparse", True, "bshd", torch.bfloat16, False, False),
    ("linear", True, "bhsd", torch.float32, False, True),
    ("linear", False, "bshd", torch.float16, False, False),
    ("sla", False, "bshd", torch.float32, False, True),
    ("sla", True, "bhsd", torch.float16, False, False),
    ("asymrnr", False, "bshd", torch.float32, False, True),
]


@pytest.mark.parametrize("method,causal,layout,dtype,return_lse,grad", CASES)
def test_meta_call_matches_real_call(method, causal, layout, dtype, return_lse, grad, monkeypatch):
    want = _call("cpu", method, causal, layout, dtype, return_lse, grad)
    assert all(d[-1] == "cpu" for d in want if isinstance(d, tuple))
    monkeypatch.setattr(dispatch, "select", lambda *a, **kw: pytest.fail("select called for meta tensors"))
    got = _call("meta", method, causal, layout, dtype, return_lse, grad)
    assert [d[:3] for d in got] == [d[:3] for d in want]
    assert all(d[-1] == "meta" for d in got)


def test_meta_flash_deterministic_false_with_grad(no_selection):
    q = torch.randn(B, HQ, S, D, device="meta", dtype=torch.float16, requires_grad=True)
    out = attnlib.flash_attention(q, q, q, deterministic=False)
    out.sum().backward()
    assert out.shape == q.shape and out.is_meta and q.grad.shape == q.shape and q.grad.is_meta


def test_meta_entry_points(no_selection):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, HQ, S, D, generator=gen).to("meta")
    out = attnlib.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(B, 1, 1, S, dtype=torch.bool,
                                                                               device="meta"))
    assert out.shape == q.shape and out.is_meta
    qb = torch.randn(B, S, HQ, 64, generator=gen, dtype=torch.float16).to("meta")
    o, lse, _ = fa.flash_attn_func(qb, qb, qb, causal=True, return_attn_probs=True)
    assert o.shape == qb.shape and o.is_meta and lse.shape == (B, HQ, S) and lse.dtype == torch.float32
    o, lse = sa.sageattn(qb, qb, qb, tensor_layout="NHD", return_lse=True)
    assert o.shape == qb.shape and o.is_meta and lse.shape == (B, HQ, S)
    packed = torch.randn(50, HQ, D, generator=gen).to("meta")
    cu = torch.tensor([0, 20, 50], dtype=torch.int32, device="meta")
    o, lse = attnlib.flash_attention_varlen(packed, packed, packed, cu, cu, 30, 30, return_lse=True)
    assert o.shape == packed.shape and o.is_meta and lse.shape == (HQ, 50)
    module = attnlib.SparseLinearAttention(D, block_size=(16, 16)).to("meta")
    assert module(q, q, q).shape == q.shape


@pytest.mark.parametrize("bad,match", [
    (lambda m: attnlib.attention(m(B, HQ, S, D), m(B, HQ, S, 8), m(B, HQ, S, D)), "head_dim"),
    (lambda m: attnlib.attention(m(B, HQ, S, D), m(B, 3, S, D), m(B, 3, S, D)), "heads"),
    (lambda m: attnlib.attention(m(B, HQ, S, D), m(B, HQ, S, D), m(B, HQ, S, D), scale=float("nan")), "scale"),
    (lambda m: attnlib.attention(m(B, HQ, S), m(B, HQ, S), m(B, HQ, S)), "q"),
    (lambda m: attnlib.attention(m(B, HQ, S, D), torch.randn(B, HQ, S, D), torch.randn(B, HQ, S, D)), "device"),
    (lambda m: attnlib.block_sparse_attention(m(B, HQ, S, D), m(B, HQ, S, D), m(B, HQ, S, D),
                                              block_mask=torch.ones(B, HQ, 2, 2, dtype=torch.bool, device="meta"),
                                              block_size=(16, 16)), "block_mask"),
])
def test_meta_bad_input_still_raises(bad, match, no_selection):
    def meta(*shape):
        return torch.empty(*shape, device="meta")
    with pytest.raises((ValueError, TypeError), match=match):
        bad(meta)
