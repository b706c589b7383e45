"""flash_attn compatibility of the varlen entry point and argument validation of
flash_attention_varlen. Small shapes (Triton interpreter on CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import attnlib
from attnlib.compat import flash_attn as fa
from attnlib.reference.flash_varlen import flash_varlen_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# max |attnlib - float64 reference| allowed, per input dtype (outputs are O(1))
ATOL = {torch.float16: 4e-3, torch.float32: 2e-5}


def _cu(lengths):
    return torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32, device=DEVICE)


def _packed(lq, lk, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), hq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(sum(lk), hkv, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(sum(lk), hkv, d, generator=g).to(DEVICE, dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_compat_varlen_takes_tensor_and_numpy_max_seqlen(dtype):
    """flash_attn converts max_seqlen_q/k with __index__: transformers' packed-sequence path
    (prepare_fa2_from_position_ids) passes cu_seqlens.diff().max(), a 0-d int32 tensor, and
    numpy ints are common. They raised TypeError here; they must give the int call's answer."""
    lq, lk = [5, 0, 19, 1], [7, 3, 19, 2]
    q, k, v = _packed(lq, lk, 4, 2, 32, dtype, seed=11)
    cq, ck = _cu(lq), _cu(lk)
    ref = flash_varlen_reference(q.double(), k.double(), v.double(), cq, ck, causal=True)
    want = fa.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=True)
    assert (want.double() - ref).abs().max().item() <= ATOL[dtype]
    for mq, mk in ((cq.diff().max(), ck.diff().max()), (np.int64(max(lq)), np.int32(max(lk))),
                   (torch.tensor([max(lq)]), torch.tensor(max(lk), dtype=torch.int64))):
        out, lse, probs = fa.flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, causal=True, return_attn_probs=True)
        assert probs is None and lse.shape == (4, sum(lq))
        assert torch.equal(out, want)


@pytest.mark.parametrize("bad", [torch.tensor(5.0), torch.tensor(True), torch.tensor([5, 5]), 5.0, True],
                         ids=["float-tensor", "bool-tensor", "two-elements", "float", "bool"])
def test_compat_varlen_rejects_non_integer_max_seqlen(bad):
    q, k, v = _packed([3, 5], [3, 5], 2, 2, 16, torch.float32, seed=1)
    cu = _cu([3, 5])
    with pytest.raises(TypeError, match="max_seqlen_q"):
        fa.flash_attn_varlen_func(q, k, v, cu, cu, bad, 5)


def test_varlen_rejects_float8_like_the_dense_api():
    """flash_attention rejects float8 with a TypeError; the varlen entry point accepted it and
    ran the reference (float32 math rounded to e4m3)."""
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    q, k, v = (t.to(torch.float8_e4m3fn) for t in _packed([3, 4], [3, 4], 2, 1, 16, torch.float32, seed=2))
    cu = _cu([3, 4])
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64"):
        attnlib.flash_attention_varlen(q, k, v, cu, cu, 4, 4)


def test_varlen_negative_max_seqlen_is_a_value_error():
    q, k, v = _packed([3, 4], [3, 4], 2, 1, 16, torch.float32, seed=3)
    cu = _cu([3, 4])
    with pytest.raises(ValueError, match="max_seqlen_k must be a non-negative int"):
        attnlib.flash_attention_varlen(q, k, v, cu, cu, 4, -1)
    with pytest.raises(TypeError, match="max_seqlen_q"):
        attnlib.flash_attention_varlen(q, k, v, cu, cu, 4.0, 4)


def test_varlen_bad_cu_seqlens_error_names_where():
    """The message shows a long cu_seqlens shortened (first and last 32 values), which can hide
    where it goes wrong: it names the first wrong value and its index. int64 stays refused."""
    lengths = [1] * 199
    q, k, v = _packed(lengths, lengths, 2, 1, 16, torch.float32, seed=4)
    good = _cu(lengths)
    bad = good.clone()
    bad[100] = 98  # 99 at index 99, then 98: hidden in the "..." of the values shown
    with pytest.raises(ValueError, match=r"cu_seqlens_k decreases from 99 at index 99 to 98 at index 100\)"):
        attnlib.flash_attention_varlen(q, k, v, good, bad, 1, 1)
    with pytest.raises(ValueError, match=r"\(cu_seqlens_q\[0\] is 1\)"):
        attnlib.flash_attention_varlen(q, k, v, good + 1, good, 1, 1)
    with pytest.raises(ValueError, match=r"token count 199 \(cu_seqlens_q\[-1\] is 200\)"):
        attnlib.flash_attention_varlen(q, k, v, torch.cat((good[:-1], good[-1:] + 1)), good, 1, 1)
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype torch.int32, got torch.int64"):
        attnlib.flash_attention_varlen(q, k, v, good.long(), good, 1, 1)


def _grads(q, k, v, cu_q, cu_k, dout, inside_backward: bool):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with attnlib.use_backend("torch"):
        out = attnlib.flash_attention_varlen(*leaves, cu_q, cu_k, 9, 11, causal=True)
        if inside_backward:
            out.backward(dout)
    if not inside_backward:
        out.backward(dout)  # after the block: must still run the torch backend's backward
    return [t.grad for t in leaves]


def test_varlen_backward_after_use_backend_runs_the_forwards_backend():
    q, k, v = _packed([9, 4, 7], [11, 3, 8], 4, 2, 32, torch.float32, seed=11)
    cu_q, cu_k = _cu([9, 4, 7]), _cu([11, 3, 8])
    dout = torch.randn(q.shape[0], 4, 32, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    want = _grads(q, k, v, cu_q, cu_k, dout, inside_backward=True)
    got = _grads(q, k, v, cu_q, cu_k, dout, inside_backward=False)
    for name, g, w in zip("qkv", got, want):
        assert torch.equal(g, w), f"d{name}: the backward ran another backend than the forward"


def test_varlen_double_backward_and_jvp_raise_instead_of_zeros():
    q, k, v = _packed([5, 6], [7, 4], 2, 2, 16, torch.float32, seed=13)
    cu_q, cu_k = _cu([5, 6]), _cu([7, 4])
    qg = q.clone().requires_grad_()
    out = attnlib.flash_attention_varlen(qg, k, v, cu_q, cu_k, 6, 7)
    (gq,) = torch.autograd.grad(out.square().sum(), qg, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.square().sum().backward()
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(lambda a: attnlib.flash_attention_varlen(a, k, v, cu_q, cu_k, 6, 7), (q,),
                       (torch.randn_like(q),))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_varlen_padded_buffers(backend, dtype):
    """flash_attn takes q/k/v longer than their sequences (static buffers sized for CUDA graphs:
    cu_seqlens[-1] < total); they were refused here. The sequences' rows give the exact buffers'
    answer, padding rows output 0 with lse -inf, and every padding row's gradient is 0 (the
    sequences' gradients as without padding)."""
    if backend == "triton" and dtype == torch.float16 and DEVICE == "cpu":
        dtype = torch.float32  # keep the interpreter run small: one dtype suffices there
    lq, lk = [5, 0, 9], [7, 3, 6]
    pad_q, pad_k = 4, 3
    q, k, v = _packed(lq + [pad_q], lk + [pad_k], 4, 2, 16, dtype, seed=21)
    g = torch.Generator().manual_seed(22)
    dout = torch.randn(q.shape, generator=g).to(DEVICE, dtype)
    cq, ck = _cu(lq), _cu(lk)
    nq, nk = sum(lq), sum(lk)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = attnlib.flash_attention_varlen(*leaves, cq, ck, max(lq), max(lk), causal=True, return_lse=True,
                                              backend=backend)
    out.backward(dout)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    ref64, lse64 = flash_varlen_reference(q[:nq].double(), k[:nk].double(), v[:nk].double(), cq, ck, causal=True,
                                          return_lse=True)
    assert (out[:nq].double() - ref64).abs().max().item() <= ATOL[dtype]
    assert torch.equal(out[nq:], torch.zeros_like(out[nq:]))
    assert torch.isneginf(lse[:, nq:]).all()
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse[:, :nq]), finite)
    assert (lse[:, :nq][finite].double() - lse64[finite]).abs().max().item() <= 1e-3
    exact = [t.detach().clone().requires_grad_() for t in (q[:nq], k[:nk], v[:nk])]
    o2 = attnlib.flash_attention_varlen(*exact, cq, ck, max(lq), max(lk), causal=True, backend=backend)
    o2.backward(dout[:nq])
    for full, part, n in zip(leaves, exact, (nq, nk, nk)):
        assert torch.equal(full.grad[n:], torch.zeros_like(full.grad[n:]))
        assert (full.grad[:n].double() - part.grad.double()).abs().max().item() <= ATOL[dtype]
    # the flash_attn entry point takes the same buffers
    out_fa = fa.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=True)
    assert torch.equal(out_fa[nq:], torch.zeros_like(out_fa[nq:]))
    assert (out_fa[:nq].double() - ref64).abs().max().item() <= ATOL[dtype]


def test_varlen_cu_seqlens_past_the_buffer_still_refused():
    q, k, v = _packed([3, 4], [3, 4], 2, 1, 16, torch.float32, seed=5)
    with pytest.raises(ValueError, match=r"end at most at the token count 7 \(cu_seqlens_k\[-1\] is 8\)"):
        attnlib.flash_attention_varlen(q, k, v, _cu([3, 4]), _cu([3, 5]), 4, 5)
