"""Method flash with a key mask (attnlib/key_mask.py): every flash kernel x a grid of cases
against the float64 reference (out, lse, dq, dk, dv, by flash_attn's rule), the reference against
torch's own SDPA with the same attn_mask, validation errors, and the SDPA drop-in / diffusers
routing of key-only attn_masks (HunyuanVideo's padded prompt, LTX-Video's per-head one) to attnlib."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import attnlib
from attnlib import dispatch
from attnlib.api import build_inputs
from attnlib.inputs import to_bhsd
from attnlib.reference import flash_reference
from attnlib.testing import assert_flash_rule, make_qkv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (id, batch, heads, kv_heads, seq_q, seq_k, head_dim, dtype, layout, causal, mask kind, mask batch)
CASES = [
    ("bool-b2h4-s33x45-d64-fp32", 2, 4, 4, 33, 45, 64, torch.float32, "bhsd", False, "bool", 2),
    ("prefix-gqa-s77x93-d64-fp16-bshd", 2, 4, 2, 77, 93, 64, torch.float16, "bshd", False, "prefix", 2),
    ("float-s40x40-d32-fp32-causal", 2, 2, 2, 40, 40, 32, torch.float32, "bhsd", True, "float", 2),
    ("bool-mqa-s17x40-d128-fp16-causal-b1", 1, 4, 1, 17, 40, 128, torch.float16, "bshd", True, "bool", 1),
    ("empty-row-s24x30-d64-bf16", 2, 2, 2, 24, 30, 64, torch.bfloat16, "bhsd", False, "one-empty", 2),
    ("bool-s19-d40-fp64-causal", 1, 2, 2, 19, 19, 40, torch.float64, "bhsd", True, "bool", 1),
    # per query head (B or 1, Hq, Sk)
    ("heads-bool-gqa-s37x50-d64-fp16", 2, 4, 2, 37, 50, 64, torch.float16, "bhsd", False, "heads-bool", 2),
    ("heads-float-b1-s29-d32-fp32-causal-bshd", 2, 4, 4, 29, 29, 32, torch.float32, "bshd", True, "heads-float", 1),
    ("heads-one-empty-mqa-s24x30-d64-fp32", 2, 2, 1, 24, 30, 64, torch.float32, "bhsd", False, "heads-one-empty", 2),
]


def make_mask(kind: str, batch: int, seq_k: int, seed: int, heads: int = 1) -> torch.Tensor:
    """(batch, seq_k), or (batch, heads, seq_k) for the "heads-" kinds (different per head)."""
    g = torch.Generator().manual_seed(seed)
    if kind.startswith("heads-"):
        if kind == "heads-one-empty":  # batch element 0's head 1 sees no key; the rest bool
            m = torch.rand(batch, heads, seq_k, generator=g) > 0.3
            m[0, 1] = False
            return m.to(DEVICE)
        return torch.stack([make_mask(kind[6:], batch, seq_k, seed + h) for h in range(heads)], dim=1)
    if kind == "bool":
        m = torch.rand(batch, seq_k, generator=g) > 0.3
    elif kind == "prefix":  # a padded prompt: the first L_b keys are valid
        lengths = torch.tensor([seq_k - 7 * (b + 1) for b in range(batch)])
        m = torch.arange(seq_k)[None, :] < lengths[:, None]
    elif kind == "float":  # an additive bias, with masked (-inf) keys too
        m = torch.randn(batch, seq_k, generator=g) * 2
        m[:, ::5] = float("-inf")
    else:  # batch element 1 sees no key at all
        m = torch.rand(batch, seq_k, generator=g) > 0.3
        m[1] = False
    return m.to(DEVICE)


def _grid():
    for kernel in dispatch.kernels("flash"):
        for case in CASES:
            yield pytest.param(kernel, case, id=f"{kernel.name}-{case[0]}")


@pytest.mark.parametrize("kernel,case", list(_grid()))
def test_kernel_with_key_mask_against_float64_reference(kernel, case):
    name, b, h, hkv, sq, sk, d, dtype, layout, causal, kind, mb = case
    q, k, v = make_qkv(b, h, sq, d, kv_heads=hkv, seq_k=sk, dtype=dtype, device=DEVICE, layout=layout,
                       seed=len(name))
    mask = make_mask(kind, mb, sk, seed=sq, heads=h)
    inp = build_inputs(q, k, v, layout=layout, causal=causal, key_mask=mask)
    reasons = kernel.not_supported_reasons(replace(inp, grad=True))
    if reasons:
        pytest.skip("; ".join(reasons))
    want_lse = kernel.supports_lse
    res = kernel.forward(replace(inp, return_lse=want_lse, grad=True))
    out, lse = res if want_lse else (res, None)
    q64, k64, v64 = (to_bhsd(t, layout).detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = flash_reference(q64, k64, v64, causal=causal, key_mask=mask, return_lse=True)
    qs, ks, vs = (to_bhsd(t, layout).detach().requires_grad_() for t in (q, k, v))
    same, same_lse = flash_reference(qs, ks, vs, causal=causal, key_mask=mask, return_lse=True)
    assert_flash_rule(out, ref, same)
    if lse is not None:
        assert_flash_rule(lse, ref_lse, same_lse, name="lse")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(device=DEVICE, dtype=dtype)
    grads = kernel.backward(replace(inp, grad=True), out, lse, dout, None)[:3]
    want = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    got_same = torch.autograd.grad(same, (qs, ks, vs), dout)
    for gname, g, w, s in zip(("dq", "dk", "dv"), grads, want, got_same):
        assert torch.isfinite(g).all(), gname
        assert_flash_rule(g, w, s, factor=3.0, name=gname)
    if kind == "one-empty":  # the batch element that sees no key: 0 out, -inf lse, no gradient
        assert torch.all(out[1] == 0) and torch.all(grads[0][1] == 0)
        if lse is not None:
            assert torch.all(lse[1] == float("-inf"))
    if kind == "heads-one-empty":  # only batch element 0's head 1 sees no key
        o, dq = to_bhsd(out, layout), to_bhsd(grads[0], layout)
        assert torch.all(o[0, 1] == 0) and torch.all(dq[0, 1] == 0)
        assert (o[0, 0] != 0).any() and (o[1, 1] != 0).any()
        if lse is not None:
            assert torch.all(lse[0, 1] == float("-inf")) and torch.isfinite(lse[0, 0]).all()


@pytest.mark.parametrize("kind", ["bool", "float", "heads-bool", "heads-float"])
def test_reference_matches_torch_sdpa_attn_mask(kind):
    """The key mask means what torch SDPA's attn_mask of shape (B, 1, 1, Sk) means, or of shape
    (B, Hq, 1, Sk) for a per-head one (GQA: the query heads)."""
    q, k, v = (t.double() for t in make_qkv(2, 4, 21, 16, kv_heads=2, seq_k=30, seed=3))
    mask = make_mask(kind, 2, 30, seed=4, heads=4).cpu()
    sdpa_mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, :, None, :]
    sdpa_mask = sdpa_mask if sdpa_mask.dtype == torch.bool else sdpa_mask.double()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, enable_gqa=True)
    torch.testing.assert_close(flash_reference(q, k, v, key_mask=mask), want, atol=1e-12, rtol=0)
    if mask.dim() == 3:  # a per-head mask whose heads are equal is the 2-D one
        same = mask[:, :1].expand(-1, 4, -1)
        torch.testing.assert_close(flash_reference(q, k, v, key_mask=same),
                                   flash_reference(q, k, v, key_mask=mask[:, 0]), atol=0, rtol=0)


def test_bad_key_masks_raise_naming_the_argument():
    q, k, v = make_qkv(2, 2, 9, 16, seq_k=11, device=DEVICE, seed=5)
    good = torch.ones(2, 11, dtype=torch.bool, device=DEVICE)
    attnlib.flash_attention(q, k, v, key_mask=good)
    attnlib.flash_attention(q, k, v, key_mask=good[:, None, :].expand(2, 2, 11))
    for bad, err in [(good[:, None, None, :], ValueError), (good[:, :10], ValueError),
                     (torch.ones(2, 3, 11, dtype=torch.bool, device=DEVICE), ValueError),  # 2 heads
                     (torch.ones(2, 2, 10, dtype=torch.bool, device=DEVICE), ValueError),
                     (torch.ones(3, 11, dtype=torch.bool, device=DEVICE), ValueError),
                     (good.to(torch.int32), TypeError), (good.tolist(), TypeError),
                     (torch.zeros(2, 11, device="meta"), ValueError)]:
        with pytest.raises(err, match="key_mask"):
            attnlib.flash_attention(q, k, v, key_mask=bad)
    with pytest.raises(ValueError, match="key_mask must not require grad"):
        attnlib.flash_attention(q, k, v, key_mask=torch.zeros(2, 11, device=DEVICE, requires_grad=True))
    with pytest.raises(TypeError, match="key_mask"):  # flash's option only
        attnlib.attention(q, k, v, method="linear", key_mask=good)


@pytest.mark.parametrize("dtype,return_lse,q_grad", [(torch.float32, False, True), (torch.float32, True, True),
                                                     (torch.float16, False, True), (torch.bfloat16, False, False)])
def test_mask_requiring_grad_is_refused_on_every_path(dtype, return_lse, q_grad):
    """attnlib gives a key mask no gradient, so one that requires grad is refused wherever autograd
    records, whichever kernel would serve the call: before, only the fp32 path that checks torch
    SDPA first refused it, and fp16 / bf16 / return_lse calls left a learned bias without a
    gradient (review of the per-head masks). Under no_grad it runs."""
    q, k, v = make_qkv(2, 4, 8, 16, kv_heads=2, seq_k=9, dtype=dtype, device=DEVICE, seed=16, requires_grad=q_grad)
    bias = torch.zeros(2, 4, 9, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="key_mask must not require grad"):
        attnlib.flash_attention(q, k, v, key_mask=bias, return_lse=return_lse)
    with torch.no_grad():
        out = attnlib.flash_attention(q, k, v, key_mask=bias, return_lse=return_lse)
    ref = flash_reference(q.detach().double(), k.detach().double(), v.detach().double(), key_mask=bias.detach())
    torch.testing.assert_close((out[0] if return_lse else out).double(), ref, atol=2e-2, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masks_with_any_stride_on_size_one_dims(backend):
    """torch counts a tensor with any stride on its size-1 dims as contiguous; the kernels step by
    those strides, so the bias handed to them is re-laid out (flash-triton refused a permuted
    (B, Hq, 1) float mask at Sk = 1 before: review of the per-head masks)."""
    q, k, v = make_qkv(2, 3, 16, 64, seq_k=1, device=DEVICE, seed=17)
    for mask in (torch.randn(1, 2, 3).permute(1, 2, 0), torch.randn(1, 2).t(),
                 torch.randn(1, 1, 5)[..., 1::2][..., :1], torch.rand(1, 2, 3).permute(1, 2, 0) > 0.5):
        mask = mask.to(DEVICE)
        out = attnlib.flash_attention(q, k, v, key_mask=mask, backend=backend)
        ref = flash_reference(q.double(), k.double(), v.double(), key_mask=mask)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


def test_auto_serves_key_masks_and_torch_sdpa_is_never_given_one_with_causal():
    q, k, v = make_qkv(1, 2, 33, 64, seed=6, device=DEVICE)
    mask = make_mask("bool", 1, 33, seed=6)
    for causal in (False, True):
        ex = attnlib.explain(q, k, v, causal=causal, key_mask=mask)
        if causal:
            assert ex.chosen.name != "flash-torch-sdpa"
            assert any("attn_mask" in r for r in ex.reasons.get("flash-torch-sdpa", [])), ex.reasons
        out = attnlib.flash_attention(q, k, v, causal=causal, key_mask=mask)
        ref = flash_reference(q.double(), k.double(), v.double(), causal=causal, key_mask=mask)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    cuda = next(kern for kern in dispatch.kernels("flash") if kern.name == "flash-cuda")
    assert "key_mask not supported" in " ".join(cuda.kernel_reasons(build_inputs(q, k, v, key_mask=mask)))


@pytest.mark.parametrize("shape,served", [((2, 1, 1, 29), (2, 29)), ((1, 1, 1, 29), (1, 29)), ((1, 29), (1, 29)),
                                          ((2, 4, 1, 29), (2, 4, 29)), ((4, 1, 29), (1, 4, 29))])
def test_patched_sdpa_serves_key_only_masks(shape, served, monkeypatch):
    """A key-only attn_mask (one per head too: (B, Hq, 1, Sk), LTX-Video's) goes to attnlib's
    kernels (here the torch backend's, forced), with torch's answer; other masks and masks with
    is_causal stay torch's."""
    from attnlib.integrations import sdpa

    q, k, v = make_qkv(2, 4, 23, 32, seq_k=29, seed=8, device=DEVICE)
    mask = (torch.rand(*shape, generator=torch.Generator().manual_seed(9)) > 0.4).to(DEVICE)
    ran = []
    real = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda inp, backend="auto": ran.append(inp.options.get("key_mask"))
                        or real(inp, backend))
    with sdpa.patch_sdpa(backend="torch"):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert ran and ran[0] is not None and tuple(ran[0].shape) == served
    want = sdpa.TORCH_SDPA(q.double(), k.double(), v.double(), attn_mask=mask)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=0)
    ran.clear()
    per_row = torch.rand(2, 1, 23, 29, generator=torch.Generator().manual_seed(10)).to(DEVICE) > 0.4
    with sdpa.patch_sdpa(backend="torch"):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=per_row)
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(2, -1, 1, 29) if
                                                         len(shape) == 4 else mask, is_causal=False)
    assert len(ran) == 1  # the per-row mask went to torch
    torch.testing.assert_close(out, sdpa.TORCH_SDPA(q, k, v, attn_mask=per_row))
    bad_heads = torch.ones(2, 2, 1, 29, dtype=torch.bool, device=DEVICE)  # 2 of 4 heads: torch's error
    for reason_args in [dict(attn_mask=per_row), dict(attn_mask=mask, is_causal=True), dict(attn_mask=bad_heads),
                        dict(attn_mask=mask.to(torch.float64))]:
        assert sdpa._fallback_reason(q, k, v, reason_args["attn_mask"], 0.0, reason_args.get("is_causal", False),
                                     None, False, "flash") is not None
    assert sdpa._fallback_reason(q, k, v, mask, 0.0, False, None, False, "sla") is not None
    assert sdpa._fallback_reason(q, k, v, mask, 0.0, False, None, False, "flash") is None


def test_diffusers_router_serves_a_hunyuan_style_key_mask():
    """diffusers' dispatch_attention_fn with HunyuanVideo's (B, 1, 1, N) bool mask, LTX-Video's
    (B, H, 1, N) additive one (Attention.prepare_attention_mask repeats the prompt mask per head)
    and a 2-D (B, N) mask (diffusers' own key-mask convention), on attnlib; per-row masks on
    diffusers."""
    pytest.importorskip("diffusers")
    from attnlib.integrations import diffusers as dz

    q, k, v = (t.transpose(1, 2) for t in make_qkv(2, 4, 25, 32, seed=11, device=DEVICE))  # (B, S, H, D)
    lengths = torch.tensor([25, 18], device=DEVICE)
    mask2 = torch.arange(25, device=DEVICE)[None, :] < lengths[:, None]
    ltx = ((1 - mask2.float()) * -10000.0)[:, None, :].repeat_interleave(4, dim=0).view(2, 4, 1, 25)
    calls = []

    def original(query, key, value, attn_mask=None, *args, **kwargs):
        calls.append(attn_mask)
        return sdpa_bshd(query, key, value, attn_mask)

    def sdpa_bshd(query, key, value, attn_mask):
        m = attn_mask[:, None, None, :] if attn_mask is not None and attn_mask.dim() == 2 else attn_mask
        return torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=m).transpose(1, 2)

    route = dz._Route(method="flash", backend="torch", options={})
    fn = dz._dispatch_router(original, route)
    for mask in (mask2, mask2[:, None, None, :], ltx):
        out = fn(q, k, v, attn_mask=mask)
        torch.testing.assert_close(out, sdpa_bshd(q, k, v, mask), atol=2e-5, rtol=0)
    assert calls == []
    per_row = torch.rand(2, 1, 25, 25, generator=torch.Generator().manual_seed(12)).to(DEVICE) > 0.3
    fn(q, k, v, attn_mask=per_row)
    assert len(calls) == 1 and calls[0] is per_row


def test_compiled_call_with_key_mask_and_its_gradients():
    """torch.compile(fullgraph=True) over attnlib.flash_attention with a key mask (the op carries
    it as a tensor option): out and gradients as in eager."""
    q, k, v = make_qkv(2, 2, 21, 16, seq_k=27, seed=13, device=DEVICE, requires_grad=True)
    mask = make_mask("prefix", 2, 27, seed=13)

    def f(q, k, v):
        return attnlib.flash_attention(q, k, v, key_mask=mask)

    eager = f(q, k, v)
    want = torch.autograd.grad(eager.sum(), (q, k, v))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    got = torch.autograd.grad(compiled.sum(), (q, k, v))
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    ref = flash_reference(q.detach().double(), k.detach().double(), v.detach().double(), key_mask=mask)
    torch.testing.assert_close(eager.double(), ref, atol=2e-5, rtol=0)


def test_float_masks_of_another_dtype_are_not_rounded_to_half_precision():
    """torch SDPA takes a float attn_mask in the inputs' dtype only: an fp32 bias on fp16 inputs
    would lose digits or overflow (-1e5 gave 0 rows, 7e4 NaN), so flash-torch-sdpa declines it and
    the answer is the float64 reference's (review of stop 29)."""
    q, k, v = make_qkv(2, 2, 8, 32, dtype=torch.float16, seed=14, device=DEVICE)
    for mask in (torch.zeros(2, 8).index_fill_(0, torch.tensor([1]), -1e5),
                 torch.zeros(2, 8).index_fill_(1, torch.tensor([3]), 7e4), torch.randn(2, 8) * 10):
        mask = mask.to(DEVICE)
        ex = attnlib.explain(q, k, v, key_mask=mask, backend="torch")
        assert ex.chosen.name != "flash-torch-sdpa" and any("dtype" in r for r in ex.reasons["flash-torch-sdpa"])
        out = attnlib.flash_attention(q, k, v, key_mask=mask)
        ref = flash_reference(q.double(), k.double(), v.double(), key_mask=mask)
        # fp32 scores plus -1e5 keep 2**-7 steps: the error a float32 computation already has
        assert_flash_rule(out, ref, flash_reference(q, k, v, key_mask=mask))
    assert attnlib.explain(q, k, v, key_mask=mask.half(), backend="torch").chosen.name == "flash-torch-sdpa"


def test_patched_sdpa_leaves_1d_masks_to_torch():
    """torch's SDPA refuses a 1-D attn_mask; the drop-in must not answer where torch raises."""
    from attnlib.integrations import sdpa

    q, k, v = make_qkv(2, 2, 5, 16, seed=15, device=DEVICE)
    mask = torch.rand(5).to(DEVICE) > 0.3
    assert sdpa._fallback_reason(q, k, v, mask, 0.0, False, None, False, "flash") is not None
    with pytest.raises(Exception), sdpa.patch_sdpa():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
