"""Triton flash kernels with a key bias (the option key_mask, attnlib/key_mask.py): forward and
backward launchers against a float64 reference written out here.

The bias is float32 (B or 1, Sk), added to scale * q . k for every head and query row, or
(B or 1, Hq or 1, Sk), query head h's bias added to that head's every row (torch SDPA's attn_mask
of shape (B, Hq, 1, Sk)); a row whose visible keys are all -inf gives output 0, lse -inf and no
gradient. Accuracy follows
flash_attn's rule, as tests/test_flash_triton.py: error against float64 at most 2x (gradients
3x) PyTorch's own in the kernel's dtype. On CPU these run under TRITON_INTERPRET=1, fp16 and
fp32 only (the interpreter's bf16 tl.dot is wrong).
"""
from __future__ import annotations

import pytest
import torch

from attnlib.reference._common import causal_mask
from attnlib.testing import assert_flash_rule, make_qkv, poison_

triton = pytest.importorskip("triton")

from attnlib.triton_kernels.flash.autograd import flash_attn_func  # noqa: E402
from attnlib.triton_kernels.flash.backward import flash_bwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float16, torch.float32]
DTYPES = CPU_DTYPES + ([torch.bfloat16] if DEVICE == "cuda" else [])  # bf16 on a GPU only
NEG_INF = float("-inf")


def attention_with_bias(q, k, v, bias, *, causal: bool, scale: float):
    """(out, lse) of softmax(scale * q k^T + bias) v in the inputs' dtype (float64 for the
    reference): bias (B or 1, Sk) broadcast over heads and query rows, or (B or 1, Hq or 1, Sk)
    broadcast over query rows (and a dimension of 1 over its own), causal bottom-right aligned,
    GQA by repeating kv heads. Rows with no finite score give 0 and lse -inf, and no NaN in their
    gradients (the row max is taken as 0 there)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    bias = bias.to(q.dtype)
    bias = bias[:, None, None, :] if bias.dim() == 2 else bias[:, :, None, :]
    scores = (q @ k.transpose(-1, -2)) * scale + bias
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), NEG_INF)
    m = scores.amax(-1, keepdim=True).detach()
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m_safe)
    l = p.sum(-1, keepdim=True)
    has = l > 0
    out = (p / torch.where(has, l, torch.ones_like(l))) @ v
    lse = torch.where(has, m_safe + torch.log(torch.where(has, l, torch.ones_like(l))), NEG_INF).squeeze(-1)
    return out, lse.float() if q.dtype != torch.float64 else lse


def make_bias(kind: str, batch: int, seq_k: int, seed: int) -> torch.Tensor:
    """A float32 (batch, seq_k) key bias of one kind:
    bool: 0 / -inf, about 30% of keys masked (key 0 kept: every row of a full call sees a key);
    prefix: the first L_b keys valid, L_b different per batch element (a padded text prompt);
    left_pad: the first P_b keys masked (causal rows that see only those get no key);
    float: randn * 2, every key finite;
    large: float plus +100 on some keys (exp of such a score overflows fp32 without lse);
    all_masked: prefix, except batch element 1 whose keys are all -inf."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "bool":
        masked = torch.rand(batch, seq_k, generator=gen) < 0.3
        masked[:, 0] = False
        return torch.zeros(batch, seq_k).masked_fill(masked, NEG_INF)
    if kind in ("prefix", "all_masked"):
        lengths = torch.linspace(seq_k, max(seq_k // 4, 1), batch).round().long()
        keys = torch.arange(seq_k)[None, :]
        bias = torch.zeros(batch, seq_k).masked_fill(keys >= lengths[:, None], NEG_INF)
        if kind == "all_masked":
            bias[1] = NEG_INF
        return bias
    if kind == "left_pad":
        pads = torch.linspace(seq_k // 3, 0, batch).round().long()
        return torch.zeros(batch, seq_k).masked_fill(torch.arange(seq_k)[None, :] < pads[:, None], NEG_INF)
    bias = 2.0 * torch.randn(batch, seq_k, generator=gen)
    if kind == "large":
        bias[:, ::7] += 100.0
    return bias


def run_triton(q, k, v, bias, dout, dlse, *, causal: bool, scale: float):
    """out (written into a NaN-filled buffer), lse, dq, dk, dv from the launchers."""
    out, lse = flash_attn_func(q, k, v, causal=causal, scale=scale, key_bias=bias,
                               new_output=lambda: poison_(torch.empty_like(q)))
    grads = flash_bwd(dout, q, k, v, out, lse, causal=causal, scale=scale, dlse=dlse, key_bias=bias)
    return (out, lse, *grads)


def run_torch(q, k, v, bias, dout, dlse, *, causal: bool, scale: float, dtype):
    """out, lse, dq, dk, dv of attention_with_bias computed in dtype, with autograd."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = attention_with_bias(*leaves, bias.to(dtype), causal=causal, scale=scale)
    grads = torch.autograd.grad([out, lse], leaves, [dout.to(dtype), dlse.to(lse.dtype)])
    return (out.detach(), lse.detach(), *grads)


def check_all(q, k, v, bias, *, causal: bool, seed: int):
    """The launchers' out, lse, dq, dk, dv (random dout and dlse) against float64 with the rule,
    all finite (lse: -inf where the reference's is); returns the kernel's results."""
    scale = q.shape[-1] ** -0.5
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE, q.dtype)
    dlse = torch.randn(q.shape[:3], generator=gen).to(DEVICE)
    got = run_triton(q, k, v, bias, dout, dlse, causal=causal, scale=scale)
    want = run_torch(q, k, v, bias, dout, dlse, causal=causal, scale=scale, dtype=torch.float64)
    have = run_torch(q, k, v, bias, dout, dlse, causal=causal, scale=scale, dtype=q.dtype)
    assert torch.equal(got[1] == NEG_INF, want[1] == NEG_INF), "lse is -inf on other rows than the reference's"
    lse_atol = 1e-4 if q.dtype == torch.float16 else 2e-5
    for name, g, w, h in zip(("out", "lse", "dq", "dk", "dv"), got, want, have):
        if name != "lse":
            assert torch.isfinite(g).all(), f"{name} has non-finite values"
        else:
            assert not torch.isnan(g).any() and not (g == float("inf")).any(), "lse has NaN or +inf"
        assert_flash_rule(g, w, h, factor=2.0 if name in ("out", "lse") else 3.0,
                          atol=lse_atol if name == "lse" else None, name=name)
    return got


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, bias kind, bias batch: "B" or 1)
CASES = [
    (2, 4, 2, 77, 93, 64, False, "bool", "B"),        # GQA, lengths off the block sizes
    (2, 4, 2, 77, 93, 64, True, "bool", 1),           # one mask broadcast over the batch
    (3, 2, 2, 45, 61, 64, False, "prefix", "B"),      # padded prompts of three lengths
    (3, 4, 2, 61, 45, 64, True, "prefix", "B"),       # seq_q > seq_k: causally empty rows too
    (2, 2, 1, 40, 53, 40, True, "left_pad", "B"),     # MQA, head-dim tail: rows with only masked keys
    (2, 4, 2, 37, 50, 72, False, "float", 1),
    (1, 2, 2, 33, 47, 128, True, "float", "B"),
    (2, 2, 2, 45, 39, 64, False, "large", "B"),       # exp2 of +100 overflows: padded query rows
    (3, 4, 2, 29, 41, 64, False, "all_masked", "B"),
    (3, 4, 2, 52, 41, 64, True, "all_masked", "B"),
]


def case_id(c) -> str:
    b, hq, hkv, sq, sk, d, causal, kind, bias_shape = c
    return f"b{b}h{hq}kv{hkv}q{sq}k{sk}d{d}{'-causal' if causal else ''}-{kind}-bias{bias_shape}"


def case_inputs(case, dtype):
    """q, k, v, bias, causal, seed of a CASES row (bias (B or 1, Sk)) or a HEAD_CASES row (bias
    (B or 1, Hq or 1, Sk): its last field has two letters)."""
    b, hq, hkv, sq, sk, d, causal, kind, bias_shape = case
    per_head = len(str(bias_shape)) == 2
    seed = sq * 1000 + sk + d + (7 if per_head else 0)
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, dtype=dtype, device=DEVICE, seed=seed)
    bb = b if str(bias_shape)[0] == "B" else 1
    if per_head:
        bias = make_head_bias(kind, bb, hq if bias_shape[1] == "H" else 1, sk, seed)
    else:
        bias = make_bias(kind, bb, sk, seed)
    return q, k, v, bias.to(DEVICE), causal, seed


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward_with_key_bias(case, dtype):
    q, k, v, bias, causal, seed = case_inputs(case, dtype)
    out, lse, dq, dk, dv = check_all(q, k, v, bias, causal=causal, seed=seed)
    if case[7] == "all_masked":  # batch element 1 sees no key at all
        assert torch.all(out[1] == 0) and torch.all(lse[1] == NEG_INF)
        assert torch.all(dq[1] == 0) and torch.all(dk[1] == 0) and torch.all(dv[1] == 0)
        assert torch.isfinite(lse[0]).any(), "batch element 0 should see keys"


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_atomic_dq_with_key_bias(per_head, monkeypatch):
    """deterministic=False with ATTNLIB_FLASH_ATOMIC_DQ=1: dQ formed inside the dK/dV kernel (its
    own specialisation of the bias; per head, at GQA group 2, its loop over the group's query
    heads reloads the bias per head) matches the dQ kernel's and the float64 reference, fully
    masked rows included."""
    import attnlib.triton_kernels.flash.backward as bw

    monkeypatch.setenv("ATTNLIB_FLASH_ATOMIC_DQ", "1")
    launches = []
    real = bw.bwd_dkdv
    monkeypatch.setattr(bw, "bwd_dkdv", lambda *a, **kw: launches.append(kw.get("dq_acc") is not None)
                        or real(*a, **kw))
    if per_head:
        q, k, v, bias, causal, _ = case_inputs(HEAD_CASES[4], torch.float32)
    else:
        q, k, v, bias, causal, _ = case_inputs(CASES[9], torch.float32)
    scale = q.shape[-1] ** -0.5
    out, lse = flash_attn_func(q, k, v, causal=causal, scale=scale, key_bias=bias)
    dout = torch.randn_like(out)
    det = flash_bwd(dout, q, k, v, out, lse, causal=causal, scale=scale, key_bias=bias)
    atomic = flash_bwd(dout, q, k, v, out, lse, causal=causal, scale=scale, key_bias=bias, deterministic=False)
    assert launches == [False, True]
    for name, a, d in zip(("dq", "dk", "dv"), atomic, det):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        torch.testing.assert_close(a, d, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert torch.all(atomic[0][(1, 1) if per_head else 1] == 0)  # the fully masked head / batch element
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attention_with_bias(*leaves, bias.double(), causal=causal, scale=scale)[0]
    want = torch.autograd.grad(ref, leaves, dout.double())
    for name, a, w in zip(("dq", "dk", "dv"), atomic, want):
        torch.testing.assert_close(a.double(), w, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_launchers_write_every_element_with_key_bias(per_head):
    """NaN-filled buffers for every launcher: all of out, lse, dq, dk, dv is written, finite, with
    the reference's values. Shared: a bias that masks every key of batch element 1 (lse -inf,
    output and gradients 0 there). Per head: one that masks every key of head 1 of batch element
    1: that head gives output 0, lse -inf and zero dQ, while its kv head's dK/dV (GQA group 2) are
    the other head's alone."""
    from attnlib.triton_kernels.flash.backward import bwd_dkdv, bwd_dq, bwd_preprocess
    from attnlib.triton_kernels.flash.forward import flash_fwd

    q, k, v = make_qkv(2, 4, 37, 40, kv_heads=2, seq_k=21, device=DEVICE, seed=5 + per_head)
    if per_head:
        bias, empty = make_head_bias("one_head_empty", 2, 4, 21, 6).to(DEVICE), (1, 1)
    else:
        bias, empty = make_bias("all_masked", 2, 21, 5).to(DEVICE), (1,)
    scale = 40 ** -0.5
    out, lse = poison_(torch.empty_like(q)), poison_(torch.empty(q.shape[:3], device=DEVICE))
    flash_fwd(q, k, v, out, lse, causal=True, scale=scale, key_bias=bias)
    ref, ref_lse = attention_with_bias(q.double(), k.double(), v.double(), bias, causal=True, scale=scale)
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    assert torch.all(lse[empty] == NEG_INF) and torch.all(out[empty] == 0)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    assert torch.equal(lse == NEG_INF, ref_lse == NEG_INF) and torch.isfinite(lse[0]).any()
    torch.testing.assert_close(lse.double().nan_to_num(neginf=0), ref_lse.nan_to_num(neginf=0), atol=1e-5, rtol=0)
    dout = torch.randn_like(out)
    delta = poison_(torch.empty_like(lse))
    bwd_preprocess(out, dout, delta, None)
    dq, dk, dv = (poison_(torch.empty_like(t)) for t in (q, k, v))
    bwd_dkdv(q, k, v, dout, lse, delta, dk, dv, causal=True, scale=scale, varlen=None, key_bias=bias)
    bwd_dq(q, k, v, dout, lse, delta, dq, causal=True, scale=scale, varlen=None, key_bias=bias)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attention_with_bias(*leaves, bias.double(), causal=True, scale=scale)[0]
    want = torch.autograd.grad(ref, leaves, dout.double())
    for name, t, w in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        assert torch.isfinite(t).all(), f"{name} not fully written"
        torch.testing.assert_close(t.double(), w, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")
    assert torch.all(dq[empty] == 0)
    if per_head:  # head 0 of the pair still attends
        assert (dq[1, 0] != 0).any() and (dk[1, 0] != 0).any() and (dv[1, 0] != 0).any()
    else:
        assert torch.all(dk[1] == 0) and torch.all(dv[1] == 0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_no_bias_is_unchanged(causal):
    """key_bias=None is the call without it, bit for bit, forward and backward (the kernels
    compile their no-bias specialisation); a zero bias agrees to rounding."""
    q, k, v = make_qkv(2, 4, 45, 40, kv_heads=2, seq_k=37, dtype=torch.float16, device=DEVICE, seed=12)
    scale = 40 ** -0.5
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(13)).to(DEVICE, q.dtype)
    plain = flash_attn_func(q, k, v, causal=causal, scale=scale)
    none = flash_attn_func(q, k, v, causal=causal, scale=scale, key_bias=None)
    assert all(torch.equal(a, b) for a, b in zip(plain, none))
    grads = flash_bwd(dout, q, k, v, *plain, causal=causal, scale=scale)
    grads_none = flash_bwd(dout, q, k, v, *plain, causal=causal, scale=scale, key_bias=None)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_none))
    zero = flash_attn_func(q, k, v, causal=causal, scale=scale, key_bias=torch.zeros(1, 37, device=DEVICE))
    torch.testing.assert_close(zero[0], plain[0], atol=2e-3, rtol=0)
    torch.testing.assert_close(zero[1], plain[1], atol=1e-5, rtol=0)


def test_autograd_passes_the_bias_to_the_backward():
    """flash_attn_func's autograd Function runs flash_bwd with the forward's bias (and no
    gradient for it)."""
    q, k, v, bias, causal, _ = case_inputs(CASES[4], torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flash_attn_func(*leaves, causal=causal, scale=40 ** -0.5, key_bias=bias)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad([out, lse], leaves, [dout, dlse])
    want = flash_bwd(dout, q, k, v, out.detach(), lse.detach(), causal=causal, scale=40 ** -0.5, dlse=dlse,
                     key_bias=bias)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.equal(g, w), name


def test_flash_triton_kernel_reads_the_key_mask_option():
    """flash-triton's forward and backward take the option key_mask (bool here) as the bias."""
    import attnlib
    from attnlib import dispatch
    from attnlib.kernels.flash_triton import FlashTriton
    from attnlib.key_mask import bias_from_mask

    kernel = next(k for k in dispatch.kernels("flash") if isinstance(k, FlashTriton))
    q, k, v = make_qkv(2, 2, 23, 64, seq_k=30, device=DEVICE, seed=9)
    mask = torch.arange(30, device=DEVICE)[None, :] < torch.tensor([[30], [11]], device=DEVICE)
    inp = attnlib.api.build_inputs(q, k, v, method="flash", return_lse=True, key_mask=mask)
    out, lse = kernel.forward(inp)
    bias = bias_from_mask(mask)
    want = flash_attn_func(q, k, v, causal=False, scale=64 ** -0.5, key_bias=bias)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    dout = torch.randn_like(out)
    dq, dk, dv = kernel.backward(inp, out, lse, dout, None)[:3]
    want = flash_bwd(dout, q, k, v, out, lse, causal=False, scale=64 ** -0.5, key_bias=bias)
    assert torch.equal(dq, want[0]) and torch.equal(dk, want[1]) and torch.equal(dv, want[2])


def test_key_bias_never_takes_the_descriptor_forward(monkeypatch):
    """ATTNLIB_FLASH_TMA=1: a call with a bias runs the default forward, with the reason given."""
    from attnlib.triton_kernels.flash.forward import fwd_variant

    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need sm_90 or newer")
    monkeypatch.setenv("ATTNLIB_FLASH_TMA", "1")
    q, k, v = make_qkv(1, 2, 16, 64, dtype=torch.float16, device=DEVICE)
    bias = torch.zeros(1, 16, device=DEVICE)
    assert fwd_variant(q, k, v, torch.empty_like(q)) == ("tma", [])
    variant, reasons = fwd_variant(q, k, v, torch.empty_like(q), key_bias=bias)
    assert variant == "default" and any("key mask" in r for r in reasons)


def test_bad_key_bias_is_refused():
    from attnlib.triton_kernels.flash.common import Varlen, key_bias_args

    q, k, v = make_qkv(2, 2, 8, 16, seq_k=12, device=DEVICE)
    for bad in (torch.zeros(2, 12, dtype=torch.float16), torch.zeros(3, 12), torch.zeros(2, 11),
                torch.zeros(12, 2).t()):
        with pytest.raises(ValueError, match="key_bias"):
            key_bias_args(bad.to(DEVICE), q, k, q, None)
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="varlen"):
        key_bias_args(torch.zeros(1, 12, device=DEVICE), q, k, q, Varlen(cu, cu, 8, 8))
    assert key_bias_args(torch.zeros(1, 12, device=DEVICE), q, k, q, None)[1:] == (0, 0, True)
    assert key_bias_args(torch.zeros(2, 12, device=DEVICE), q, k, q, None)[1:] == (12, 0, True)


# ---- a bias per query head: float32 (B or 1, Hq or 1, Sk) ------------------------------------
def make_head_bias(kind: str, batch: int, heads: int, seq_k: int, seed: int) -> torch.Tensor:
    """A float32 (batch, heads, seq_k) key bias, different per query head:
    bool: 0 / -inf, about 40% of keys masked, a different draw per head (key 0 kept);
    left_pad: head h's first P_h keys masked, P_h different per head and batch element (causal
    rows that see only those keys are empty in some heads, not in others);
    float: randn * 2, every key finite;
    one_head_empty: float, except batch element 1's head 1 whose keys are all -inf."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "bool":
        masked = torch.rand(batch, heads, seq_k, generator=gen) < 0.4
        masked[..., 0] = False
        return torch.zeros(batch, heads, seq_k).masked_fill(masked, NEG_INF)
    if kind == "left_pad":
        pads = torch.linspace(seq_k // 2, 0, batch * heads).round().long()
        pads = pads[torch.randperm(batch * heads, generator=gen)].view(batch, heads, 1)
        return torch.zeros(batch, heads, seq_k).masked_fill(torch.arange(seq_k) < pads, NEG_INF)
    bias = 2.0 * torch.randn(batch, heads, seq_k, generator=gen)
    if kind == "one_head_empty":
        bias[1, 1] = NEG_INF
    return bias


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, bias kind, bias shape: "BH", "1H" or
# "B1"); lengths off the block sizes (the interpreter's 32 x 16 / 16 x 32 tiles)
HEAD_CASES = [
    (2, 4, 2, 37, 45, 40, False, "bool", "BH"),           # GQA group 2: dK/dV reloads per head
    (2, 4, 2, 45, 33, 64, True, "left_pad", "BH"),        # seq_q > seq_k: rows empty in some heads
    (2, 4, 4, 29, 47, 64, True, "float", "BH"),           # MHA (group 1), seq_q < seq_k
    (2, 4, 1, 31, 43, 64, False, "float", "1H"),          # MQA (group 4), broadcast over the batch
    (3, 4, 2, 27, 38, 64, False, "one_head_empty", "BH"),
    (2, 2, 1, 33, 41, 32, True, "bool", "B1"),            # 3-D, one bias for every head
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", HEAD_CASES, ids=case_id)
def test_forward_backward_with_per_head_key_bias(case, dtype):
    q, k, v, bias, causal, seed = case_inputs(case, dtype)
    out, lse, dq, dk, dv = check_all(q, k, v, bias, causal=causal, seed=seed)
    if case[7] == "one_head_empty":  # batch element 1, head 1 sees no key; its other heads do
        assert torch.all(out[1, 1] == 0) and torch.all(lse[1, 1] == NEG_INF) and torch.all(dq[1, 1] == 0)
        assert torch.isfinite(lse[1, 0]).all() and torch.isfinite(lse[1, 2:]).all()
        assert (dq[1, 0] != 0).any() and (dk[1, 0] != 0).any() and (dv[1, 0] != 0).any()
    if case[7] == "left_pad":  # query rows that see no key in some heads and keys in others
        empty = lse == NEG_INF
        assert (empty.any(1) & ~empty.all(1)).any()


def test_head_shared_3d_key_bias_is_the_2d_one():
    """(B, 1, Sk) runs the 2-D bias's kernels (so does (B, Hq, Sk) expanded from it, head stride
    0: key_bias_args gives both the 2-D strides): the same results bit for bit, forward and
    backward. The same values copied per head take the per-head kernels (BIAS_PER_HEAD, the dK/dV
    reload at GQA group 2) and agree."""
    q, k, v = make_qkv(2, 4, 21, 32, kv_heads=2, seq_k=19, dtype=torch.float16, device=DEVICE, seed=21)
    scale = 32 ** -0.5
    bias = make_bias("bool", 2, 19, 21).to(DEVICE)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(22)).to(DEVICE, q.dtype)

    def run(b):
        out, lse = flash_attn_func(q, k, v, causal=True, scale=scale, key_bias=b)
        return (out, lse, *flash_bwd(dout, q, k, v, out, lse, causal=True, scale=scale, key_bias=b))

    want = run(bias)
    got = run(bias[:, None, :])
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    got = run(bias[:, None, :].expand(2, 4, 19).contiguous())
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, msg=lambda m: f"{name}: {m}")


def test_autograd_passes_a_per_head_bias_to_the_backward():
    q, k, v, bias, causal, _ = case_inputs(HEAD_CASES[3], torch.float32)
    scale = q.shape[-1] ** -0.5
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flash_attn_func(*leaves, causal=causal, scale=scale, key_bias=bias)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad([out, lse], leaves, [dout, dlse])
    want = flash_bwd(dout, q, k, v, out.detach(), lse.detach(), causal=causal, scale=scale, dlse=dlse, key_bias=bias)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.equal(g, w), name


def test_bad_per_head_key_bias_is_refused():
    from attnlib.triton_kernels.flash.common import Varlen, key_bias_args

    q, k, v = make_qkv(2, 2, 8, 16, seq_k=12, device=DEVICE)
    for bad in (torch.zeros(2, 3, 12), torch.zeros(3, 2, 12), torch.zeros(2, 2, 11), torch.zeros(2, 2, 1, 12),
                torch.zeros(2, 2, 24)[..., ::2], torch.zeros(2, 2, 12, dtype=torch.float16), torch.zeros(12)):
        with pytest.raises(ValueError, match="key_bias"):
            key_bias_args(bad.to(DEVICE), q, k, q, None)
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="varlen"):
        key_bias_args(torch.zeros(1, 2, 12, device=DEVICE), q, k, q, Varlen(cu, cu, 8, 8))
    # (pointer, batch stride, head stride, HAS_KEY_BIAS): a dimension of 1, or of stride 0, broadcasts
    assert key_bias_args(torch.zeros(2, 2, 12, device=DEVICE), q, k, q, None)[1:] == (24, 12, True)
    assert key_bias_args(torch.zeros(1, 2, 12, device=DEVICE), q, k, q, None)[1:] == (0, 12, True)
    assert key_bias_args(torch.zeros(2, 1, 12, device=DEVICE), q, k, q, None)[1:] == (12, 0, True)
    assert key_bias_args(torch.zeros(2, 1, 12, device=DEVICE).expand(2, 2, 12), q, k, q, None)[1:] == (12, 0, True)
    assert key_bias_args(torch.zeros(2, 2, 20, device=DEVICE)[..., :12], q, k, q, None)[1:] == (40, 20, True)
