"""Inputs whose last dim is strided (a K stored transposed, a [..., ::2] slice of a wider buffer)
reach the Triton kernels as contiguous copies (attnlib.inputs.unit_last_stride, as flash_attn's
interface copies them) instead of being refused there and sent to the slow torch kernels.

Each call is held two ways: bit for bit to the same call on contiguous clones of the same values
(the copy is the only difference), and to the float64 reference within the method's fp32 bound;
gradients reach the strided leaves. On CPU the Triton kernels run under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.reference import block_sparse_reference, flash_reference, linear_reference, sla_reference
from attnlib.testing import relative_rmse

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, HQ, HKV, SQ, SK, D = 1, 4, 2, 77, 70, 64  # GQA; lengths not multiples of the 64-token blocks
BLOCK_MASK = torch.tensor([[[[True, False], [True, True]]]])
# method -> (options, differentiable, float64 reference(q, k, v, options, causal) or None)
CASES = {
    "flash": ({}, True, lambda q, k, v, o, c: flash_reference(q, k, v, causal=c)),
    "sage": ({}, False, None),  # INT8 QK^T: held to its contiguous twin bit for bit only
    "block_sparse": ({"block_mask": BLOCK_MASK, "block_size": (64, 64)}, True,
                     lambda q, k, v, o, c: block_sparse_reference(q, k, v, o["block_mask"], block_size=(64, 64),
                                                                  causal=c)),
    "linear": ({}, True, lambda q, k, v, o, c: linear_reference(q, k, v, causal=c)),
    "sla": ({"critical": 0.5, "negligible": 0.0, "block_size": (64, 64)}, True,
            lambda q, k, v, o, c: sla_reference(q, k, v, o["proj_weight"], None, critical=0.5, negligible=0.0,
                                                block_size=(64, 64), causal=c)),
}
# fp32 relative RMSE to float64: room for a GPU's tf32x3 (flash, block_sparse) and tf32 (the linear
# states of linear and sla; the 1e-3 contract); a wrong copy misses by O(1)
REL_FP32 = {"flash": 1e-4, "block_sparse": 1e-4, "linear": 1e-3, "sla": 1e-3}


def strided_views(gen: torch.Generator, dtype: torch.dtype):
    """Leaves and the views passed: q stored (B, H, D, S) and transposed back (last-dim stride SQ),
    k every other column of a (B, H, S, 2D) buffer (stride 2), v plain."""
    qs = torch.randn(B, HQ, D, SQ, generator=gen).to(DEVICE, dtype).requires_grad_()
    kw = torch.randn(B, HKV, SK, 2 * D, generator=gen).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(B, HKV, SK, D, generator=gen).to(DEVICE, dtype).requires_grad_()
    return (qs, kw, v), (qs.transpose(-1, -2), kw[..., ::2], v)


@pytest.mark.parametrize("dtype, causal", [(torch.float32, False), (torch.float16, True)])
@pytest.mark.parametrize("method", list(CASES))
def test_strided_inputs_run_the_triton_kernel(method, dtype, causal):
    gen = torch.Generator().manual_seed(7)
    options, differentiable, reference = CASES[method]
    options = dict(options)
    if method == "sla":
        options["proj_weight"] = (0.2 * torch.randn(D, D, generator=gen)).to(DEVICE, dtype)
    if method == "sage" and dtype == torch.float32:
        dtype = torch.float16  # sage's kernels take fp16/bf16
    leaves, views = strided_views(gen, dtype)
    assert views[0].stride(-1) == SQ and views[1].stride(-1) == 2
    twins = [t.detach().contiguous().requires_grad_() for t in views]
    with torch.enable_grad() if differentiable else torch.no_grad():
        assert attnlib.explain(*views, method=method, causal=causal, backend="triton", **options).chosen.name == \
            f"{method}-triton"
        got = attnlib.attention(*views, method=method, causal=causal, backend="triton", **options)
        want = attnlib.attention(*twins, method=method, causal=causal, backend="triton", **options)
    assert torch.equal(got, want), "the strided call differs from its contiguous twin"
    if differentiable:
        dout = torch.randn(got.shape, generator=gen).to(DEVICE, dtype)
        g_leaves = torch.autograd.grad(got, leaves, dout)
        g_twins = torch.autograd.grad(want, twins, dout)
        g_views = (g_leaves[0].transpose(-1, -2), g_leaves[1][..., ::2], g_leaves[2])
        assert torch.count_nonzero(g_leaves[1][..., 1::2]) == 0, "the skipped columns of k's buffer get no gradient"
        for name, a, b in zip("qkv", g_views, g_twins):
            assert torch.equal(a, b), f"d{name} of the strided call differs from its contiguous twin"
    if reference is not None and dtype == torch.float32:
        ref = reference(*(t.detach().double() for t in views), options, causal)
        assert relative_rmse(got, ref) <= REL_FP32[method]


def test_varlen_strided_inputs_run_the_triton_kernel(monkeypatch):
    """flash_attention_varlen copies them too (packed (total, heads, head_dim) tensors)."""
    from attnlib import varlen

    gen = torch.Generator().manual_seed(8)
    total, dtype = 50, torch.float16
    q_store = torch.randn(total, HQ, D, generator=gen).to(DEVICE, dtype)
    q = q_store.transpose(0, 2).contiguous().transpose(0, 2)  # last-dim stride total * HQ
    k = torch.randn(total, HKV, 2 * D, generator=gen).to(DEVICE, dtype)[..., ::2]
    v = torch.randn(total, HKV, D, generator=gen).to(DEVICE, dtype)
    assert q.stride(-1) != 1 and k.stride(-1) == 2
    cu = torch.tensor([0, 17, 50], dtype=torch.int32, device=DEVICE)
    picked = []
    real = varlen._pick_backend
    monkeypatch.setattr(varlen, "_pick_backend", lambda *a, **kw: picked.append(real(*a, **kw)) or picked[-1])
    got = attnlib.flash_attention_varlen(q, k, v, cu, cu, 33, 33, causal=True, backend="triton")
    assert picked and set(picked) == {"triton"}
    want = attnlib.flash_attention_varlen(q.contiguous(), k.contiguous(), v, cu, cu, 33, 33, causal=True,
                                          backend="triton")
    assert torch.equal(got, want)
    for a, b in ((0, 17), (17, 50)):
        ref = flash_reference(*(t[a:b].double().transpose(0, 1)[None] for t in (q, k, v)), causal=True)
        assert relative_rmse(got[a:b].transpose(0, 1)[None], ref) <= 2e-3
