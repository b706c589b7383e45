"""Triton block-sparse kernel (block_sparse-triton): forward, lse and gradients against the
float64 reference, for random masks at several densities, ragged tails, GQA, causal, both
layouts, per-head / per-batch masks and rows with nothing allowed.

On CPU these run under TRITON_INTERPRET=1 at small shapes with small blocks (the kernel takes
any power-of-two block from 16 to 128); the gpu tests cover bf16, hd128 and the (64, 64) /
(128, 64) blocks. Accuracy follows flash_attn's rule: error against the float64 reference at
most 2x (gradients 3x) plain PyTorch's error in the kernel's dtype, plus ATOL[dtype].
"""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.reference import block_sparse_reference
from attnlib.reference._common import block_mask_to_tokens, causal_mask
from attnlib.testing import assert_flash_rule, assert_verbose_allclose, input_grads, make_qkv, poison_

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float16, torch.float32]  # bf16 tl.dot is wrong in the interpreter: gpu tests


def random_mask(batch, heads, seq_q, seq_k, block_size, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mq, mk = -(-seq_q // block_size[0]), -(-seq_k // block_size[1])
    return (torch.rand(batch, heads, mq, mk, generator=gen) < density).to(DEVICE)


def torch_same_dtype(q, k, v, visible, scale):
    """Plain PyTorch in the inputs' dtype (the error users already accept): (out, lse); rows with
    nothing visible give 0 / -inf, masked with the dtype's min so gradients stay finite."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~visible, torch.finfo(q.dtype).min)
    has = visible.any(-1, keepdim=True)
    out = torch.where(has, scores.softmax(-1) @ v, torch.zeros((), dtype=q.dtype, device=q.device))
    lse = torch.where(has[..., 0], torch.logsumexp(scores, -1).float(), float("-inf"))
    return out, lse


def check(q, k, v, mask, *, block_size, causal, layout="bhsd", backward=True, backend="auto"):
    scale = q.shape[-1] ** -0.5
    to_bhsd = (lambda x: x) if layout == "bhsd" else (lambda x: x.transpose(1, 2))
    out, lse = attnlib.block_sparse_attention(q, k, v, mask, block_size=block_size, causal=causal, layout=layout,
                                              return_lse=True, backend=backend)
    qb, kb, vb = (to_bhsd(t) for t in (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (qb, kb, vb)]
    ref, ref_lse = block_sparse_reference(*leaves, mask, block_size=block_size, causal=causal, return_lse=True)
    visible = block_mask_to_tokens(mask, block_size, qb.shape[2], kb.shape[2])
    if causal:
        visible = visible & causal_mask(qb.shape[2], kb.shape[2], q.device)
    same = [t.detach().clone().requires_grad_() for t in (qb, kb, vb)]
    base, base_lse = torch_same_dtype(*same, visible, scale)
    assert_flash_rule(to_bhsd(out), ref, base, name="out")
    assert_flash_rule(lse, ref_lse, base_lse, atol=1e-4 if q.dtype == torch.float16 else 2e-5, name="lse")
    if not backward:
        return out
    dout = torch.randn_like(out)
    got = input_grads(out, (q, k, v), dout)
    want = input_grads(ref, leaves, to_bhsd(dout).double())
    have = input_grads(base, same, to_bhsd(dout))
    for name, g, w, h in zip(("dq", "dk", "dv"), got, want, have):
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        assert_flash_rule(to_bhsd(g), w, h, factor=3.0, name=name)
    return out


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, layout, block_size, density, mask_bh)
# mask_bh: which of (batch, heads) the mask carries; 1 = broadcast
CASES = [
    (1, 2, 2, 64, 64, 64, False, "bhsd", (16, 16), 1.0, (1, 1)),
    (1, 2, 2, 77, 77, 64, True, "bshd", (32, 16), 0.5, (1, 2)),       # ragged tails, per-head mask
    (2, 4, 1, 50, 83, 40, True, "bhsd", (16, 32), 0.5, (2, 4)),       # MQA, seq_q < seq_k, hd tail
    (1, 4, 2, 70, 33, 64, True, "bshd", (16, 16), 0.5, (1, 4)),       # seq_q > seq_k: empty rows
    (2, 4, 2, 96, 96, 32, False, "bhsd", (16, 16), 0.1, (2, 1)),      # GQA, sparse, per-batch mask
    (1, 2, 2, 45, 130, 72, False, "bshd", (16, 32), 0.2, (1, 2)),
]


def case_id(c):
    return "b{}h{}kv{}q{}k{}d{}{}-{}-bs{}x{}-p{}-m{}x{}".format(
        *c[:6], "-causal" if c[6] else "", c[7], *c[8], c[9], *c[10])


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward(case, dtype):
    b, hq, hkv, sq, sk, d, causal, layout, bs, density, (mb, mh) = case
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, dtype=dtype, device=DEVICE, layout=layout,
                       requires_grad=True, seed=sq * 1000 + sk)
    mask = random_mask(mb, mh, sq, sk, bs, density, seed=sq + sk)
    assert attnlib.explain(q, k, v, method="block_sparse", layout=layout, block_mask=mask,
                           block_size=bs).chosen.name == "block_sparse-triton"
    check(q, k, v, mask, block_size=bs, causal=causal, layout=layout, backward=dtype == torch.float32 or sq == 77)


@pytest.mark.parametrize("causal", [False, True])
def test_all_ones_mask_equals_flash(causal):
    q, k, v = make_qkv(1, 2, 61, 64, seq_k=75, device=DEVICE, seed=1)
    mask = torch.ones(1, 1, 4, 5, dtype=torch.bool, device=DEVICE)
    out, lse = attnlib.block_sparse_attention(q, k, v, mask, block_size=(16, 16), causal=causal, return_lse=True)
    ref, ref_lse = attnlib.flash_attention(q, k, v, causal=causal, return_lse=True, backend="triton")
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=1e-5)


def test_empty_rows_are_zero_with_finite_gradients():
    q, k, v = make_qkv(1, 2, 48, 64, seq_k=64, device=DEVICE, requires_grad=True, seed=2)
    mask = random_mask(1, 2, 48, 64, (16, 16), 0.7, seed=3)
    mask[:, 0, 1] = False  # head 0, query block 1 reads nothing
    mask[:, 1, :, :] = False
    mask[:, 1, 2, 3] = True  # head 1: only query block 2 reads anything
    out, lse = attnlib.block_sparse_attention(q, k, v, mask, block_size=(16, 16), return_lse=True)
    assert torch.all(out[:, 0, 16:32] == 0) and torch.all(lse[:, 0, 16:32] == float("-inf"))
    assert torch.all(out[:, 1, :32] == 0) and torch.all(lse[:, 1, :32] == float("-inf"))
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.all(q.grad[:, 0, 16:32] == 0) and torch.all(q.grad[:, 1, :32] == 0)
    check(q, k, v, mask, block_size=(16, 16), causal=True)


def test_lse_gradient():
    q, k, v = make_qkv(1, 4, 40, 32, kv_heads=2, seq_k=56, device=DEVICE, requires_grad=True, seed=4)
    mask = random_mask(1, 4, 40, 56, (16, 16), 0.6, seed=5)
    out, lse = attnlib.block_sparse_attention(q, k, v, mask, block_size=(16, 16), causal=True, return_lse=True)
    w = torch.randn_like(lse)
    loss = out.sum() + torch.where(torch.isfinite(lse), lse * w, 0.0).sum()
    got = input_grads(loss, (q, k, v), None)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = block_sparse_reference(*leaves, mask, block_size=(16, 16), causal=True, return_lse=True)
    want = input_grads(ref.sum() + torch.where(torch.isfinite(ref_lse), ref_lse * w.double(), 0.0).sum(), leaves, None)
    for name, g, wt in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g.double(), wt, atol=1e-4, rtol=1e-4, msg=name)


def poison_unlisted_kv(q, k, v, mask, block_size):
    """Copies of bhsd k, v with NaN in every key block that no query block of any query head
    sharing that KV head lists: a kernel that reads only listed blocks never sees them."""
    (b, hq), (hkv, sk) = q.shape[:2], k.shape[1:3]
    m = mask.expand(b, hq, -1, -1)
    listed = m.reshape(b, hkv, hq // hkv, *m.shape[2:]).any(3).any(2)  # (B, Hkv, Mk)
    tokens = listed.repeat_interleave(block_size[1], -1)[..., :sk]
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[~tokens] = float("nan")
    v2[~tokens] = float("nan")
    assert (~tokens).any() and tokens.any()
    return k2, v2


def clean_and_poisoned_runs(q, k, v, mask, block_size, causal, backend):
    """(out, lse, dq, dk, dv) of block_sparse_attention with clean K/V and with NaN in the
    unlisted key blocks (poison_unlisted_kv), each with the backward of out's sum."""
    kp, vp = poison_unlisted_kv(q, k, v, mask, block_size)
    runs = {}
    for name, (kk, vv) in (("clean", (k, v)), ("poisoned", (kp, vp))):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, kk, vv))
        out, lse = attnlib.block_sparse_attention(qq, kk, vv, mask, block_size=block_size, causal=causal,
                                                  return_lse=True, backend=backend)
        out.float().sum().backward()
        runs[name] = (out.detach(), lse, qq.grad, kk.grad, vv.grad)
    return runs["clean"], runs["poisoned"]


@pytest.mark.parametrize("causal", [False, True])
def test_unlisted_key_blocks_are_never_read(causal):
    # work proportional to the listed blocks: NaN K/V in unlisted blocks cannot reach out, lse or dq
    bs = (16, 16)
    q, k, v = make_qkv(1, 4, 50, 32, kv_heads=2, seq_k=83, device=DEVICE, seed=14)
    mask = random_mask(1, 4, 50, 83, bs, 0.35, seed=15)
    mask[:, :2, :, 1] = False  # every query head of KV head 0 skips key block 1
    mask[:, 2:, :, 3] = False
    clean, poisoned = clean_and_poisoned_runs(q, k, v, mask, bs, causal, "triton")
    out, lse, dq, dk, dv = poisoned
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name} read an unlisted (NaN) key block"
    assert not torch.isnan(lse).any()
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), poisoned, clean):
        assert torch.equal(got, want), name  # no atomics: the same blocks in the same order
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_reference(*leaves, mask, block_size=bs, causal=causal)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dq.double(), leaves[0].grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_launchers_write_every_element(causal, monkeypatch):
    """NaN-filled buffers: the forward's out/lse are passed in poisoned; block_sparse_bwd
    allocates dq, dk, dv itself (torch.empty_like), so that allocation is poisoned for the call:
    rows of a query block with nothing listed, and key blocks no query block lists, must still be
    written (0)."""
    from attnlib.block_mask import block_mask_to_col_index, block_mask_to_index
    from attnlib.triton_kernels.block_sparse.backward import block_sparse_bwd
    from attnlib.triton_kernels.block_sparse.forward import block_sparse_fwd

    q, k, v = make_qkv(1, 4, 37, 40, kv_heads=2, seq_k=21, device=DEVICE, seed=6)
    mask = random_mask(1, 1, 37, 21, (16, 16), 0.5, seed=7)
    mask[0, 0, 0] = False
    out, lse = poison_(torch.empty_like(q)), poison_(torch.empty(q.shape[:3], device=q.device))
    block_sparse_fwd(q, k, v, out, lse, *block_mask_to_index(mask), block_size=(16, 16), causal=causal,
                     scale=40 ** -0.5)
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    # written with the float64 reference's values (0 / -inf where nothing is listed); fp32 ~3e-7
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = block_sparse_reference(*leaves, mask, block_size=(16, 16), causal=causal, scale=40 ** -0.5,
                                          return_lse=True)
    assert_verbose_allclose(out, ref, atol=1e-5, name="out")
    assert_verbose_allclose(lse, ref_lse, atol=1e-5, name="lse")
    dout = torch.randn_like(out)
    with monkeypatch.context() as m:
        empty_like = torch.empty_like
        m.setattr(torch, "empty_like", lambda *a, **kw: poison_(empty_like(*a, **kw)))
        dq, dk, dv = block_sparse_bwd(dout, q, k, v, out, lse, block_mask_to_index(mask),
                                      block_mask_to_col_index(mask), block_size=(16, 16), causal=causal,
                                      scale=40 ** -0.5)
    for name, t, w in zip(("dq", "dk", "dv"), (dq, dk, dv), input_grads(ref, leaves, dout.double())):
        assert torch.isfinite(t).all(), f"{name} not fully written"
        assert_verbose_allclose(t, w, atol=1e-5, name=name)


def test_unsupported_block_size_has_reason_and_falls_back():
    q, k, v = make_qkv(1, 2, 40, 64, device=DEVICE, seed=8)
    mask = random_mask(1, 1, 40, 40, (24, 24), 0.5, seed=9)
    ex = attnlib.explain(q, k, v, method="block_sparse", block_mask=mask, block_size=(24, 24))
    assert any("block_size (24, 24)" in r for r in ex.reasons["block_sparse-triton"])
    assert ex.chosen.name == "block_sparse-torch-chunked"  # the memory-bounded torch fallback
    out = attnlib.block_sparse_attention(q, k, v, mask, block_size=(24, 24))
    torch.testing.assert_close(out, block_sparse_reference(q, k, v, mask, block_size=(24, 24)))
    with pytest.raises(attnlib.NoKernelError, match="block_size"):
        attnlib.block_sparse_attention(q, k, v, mask, block_size=(24, 24), backend="triton")


def test_bad_mask_is_named():
    q, k, v = make_qkv(1, 2, 40, 64, device=DEVICE, seed=10)
    with pytest.raises(ValueError, match="block_mask"):
        attnlib.block_sparse_attention(q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=(16, 16))
    with pytest.raises(TypeError, match="block_mask"):
        attnlib.block_sparse_attention(q, k, v, torch.ones(1, 1, 3, 3), block_size=(16, 16))


# ---- GPU only --------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [(64, 64), (128, 64)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 96])
def test_gpu_block_sizes(block_size, dtype, head_dim):
    q, k, v = make_qkv(2, 4, 1000, head_dim, kv_heads=2, seq_k=1100, dtype=dtype, device="cuda",
                       requires_grad=True, seed=head_dim)
    for density, causal, layout in ((1.0, False, "bhsd"), (0.3, True, "bhsd")):
        mask = random_mask(2, 4, 1000, 1100, block_size, density, seed=11)
        check(q, k, v, mask, block_size=block_size, causal=causal, layout=layout)


@pytest.mark.gpu
def test_gpu_bshd_bf16_empty_rows():
    q, k, v = make_qkv(1, 8, 700, 128, kv_heads=2, seq_k=300, dtype=torch.bfloat16, device="cuda",
                       layout="bshd", requires_grad=True, seed=12)
    mask = random_mask(1, 8, 700, 300, (128, 64), 0.4, seed=13)
    check(q, k, v, mask, block_size=(128, 64), causal=True, layout="bshd")
