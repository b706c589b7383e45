"""Review of method sla's kernels (sla-triton, sla-torch-chunked) against the float64 reference:
defects found by probing odd lengths, seq_q != seq_k under causal, GQA, both layouts, rows with
no critical block, every feature map, partial projections, fraction edges, the scale argument and
every gradient. Each test fails without its fix; small shapes for the Triton interpreter.
"""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.inputs import to_bhsd
from attnlib.reference import sla_reference
from attnlib.testing import assert_sla_rule, make_qkv, poison_, sla_float64_reference

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_strict(q, k, v, w, b, *, layout, causal, backend, **kw):
    """out and every gradient against the float64 reference, by flash_attn's rule against the
    reference itself given the same (16-bit) inputs: it computes in float32 and rounds once (the
    rule tests/test_sla_torch_chunked.py holds sla-torch-chunked to)."""
    out = attnlib.sla_attention(q, k, v, w, b, causal=causal, layout=layout, backend=backend, **kw)
    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    _, leaves, proj64, ref = sla_float64_reference(qb, kb, vb, w, b, causal=causal, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, q.dtype)
    assert_sla_rule(out, q, k, v, w, b, layout=layout, ref=ref, leaves=leaves, proj64=proj64,
                    baseline=lambda *t: sla_reference(*t, causal=causal, **kw), dout=dout, factor=3.0)


@pytest.mark.parametrize("proj,layout", [("bias", "bshd"), ("both", "bhsd")])
def test_triton_fp16_gradients_under_a_large_bias(proj, layout):
    """sla-triton formed the critical branch's delta = rowsum(dO * O_s) from the saved fp16 output
    less b and O_l W^T: with |b| ~ 100 against |O_s| ~ 1 the output's rounding (relative to |out|)
    was all that was left of O_s, and dq, dk came out 50-100x less accurate than the reference's
    formula (dq 0.10 against 0.0005 here; sla-torch-chunked had been mended for the same). Now
    delta.py flags such rows and their tiles re-walk the critical blocks for an exact delta."""
    q, k, v = make_qkv(1, 2, 40, 16, kv_heads=1, seq_k=56, layout=layout, dtype=torch.float16, device=DEVICE,
                       requires_grad=True, seed=40056)
    gen = torch.Generator().manual_seed(40)
    w = (torch.randn(16, 16, generator=gen) * 0.25).to(DEVICE).requires_grad_() if proj == "both" else None
    b = (torch.randn(16, generator=gen) * 100).to(DEVICE).requires_grad_()
    check_strict(q, k, v, w, b, layout=layout, causal=True, backend="triton", critical=0.3, negligible=0.2,
                 block_size=(16, 16), feature_map="softmax")


def test_triton_delta_rewalk_writes_only_flagged_tiles():
    """sla_fwd's redo launch (the backward's exact delta): a query tile holding a flagged row walks
    its critical blocks and writes delta for all its rows (rowsum(dO * O_s) of the re-walk
    without flags); the other tiles write nothing."""
    from attnlib.triton_kernels.sla import classify as cls_mod
    from attnlib.triton_kernels.sla.forward import sla_fwd

    q, k, v = make_qkv(1, 2, 70, 16, seq_k=50, dtype=torch.float16, device=DEVICE, seed=3)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE, q.dtype)
    kw = dict(block_size=(16, 16), causal=True, scale=0.25, feature="softmax")
    pooled_k, _, _ = cls_mod.key_blocks(k, v, block_n=16, feature="softmax", linear=False)
    classes = cls_mod.classify(q, pooled_k, seq_k=50, block_size=(16, 16), critical=0.3, negligible=0.2,
                               scale=0.25, causal=True)
    rows = cls_mod.class_index(classes)
    exact = torch.empty(q.shape[:3], dtype=torch.float32, device=DEVICE)
    sla_fwd(q, k, v, None, rows, lse=torch.empty_like(exact), dout=dout, delta=exact, **kw)
    redo = torch.zeros(q.shape[:3], dtype=torch.int8, device=DEVICE)
    redo[0, 0, 20] = 1  # tile 1 of head 0 (rows 16..31) and tile 4 of head 1 (rows 64..69)
    redo[0, 1, 69] = 1
    delta = poison_(torch.empty_like(exact))
    sla_fwd(q, k, v, None, rows, dout=dout, delta=delta, redo=redo, **kw)
    walked = torch.zeros_like(redo, dtype=torch.bool)
    walked[0, 0, 16:32] = True
    walked[0, 1, 64:70] = True
    assert torch.equal(delta[walked], exact[walked])
    assert delta[~walked].isnan().all()
