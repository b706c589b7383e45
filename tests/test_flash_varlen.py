"""flash_attention_varlen: packed ragged sequences (with empty ones) on the Triton kernel
against the float64 reference, forward and backward, plus argument validation and backend choice."""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.reference import flash_reference
from attnlib.reference.flash_varlen import flash_varlen_reference, per_sequence
from attnlib.testing import assert_flash_rule, input_grads

from test_flash_triton import torch_same_dtype

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cu_seqlens(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def packed(lengths_q, lengths_k, heads_q, heads_kv, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(n, h):
        return torch.randn(n, h, head_dim, generator=gen).to(DEVICE, dtype).requires_grad_()

    return rnd(sum(lengths_q), heads_q), rnd(sum(lengths_k), heads_kv), rnd(sum(lengths_k), heads_kv)


def same_dtype_varlen(q, k, v, cq, ck, causal, scale):
    """PyTorch in the inputs' dtype, sequence by sequence: (out, lse (H, total_q))."""
    return per_sequence(lambda *qkv: torch_same_dtype(*qkv, causal=causal, scale=scale), q, k, v, cq, ck)


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts calls into the Triton varlen forward, so tests see which backend really ran."""
    import attnlib.triton_kernels.flash.varlen as tv

    calls = []
    real = tv.flash_attn_varlen_func
    monkeypatch.setattr(tv, "flash_attn_varlen_func", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


# (lengths_q, lengths_k, heads_q, heads_kv, head_dim)
CASES = [
    ([5, 0, 1, 17, 33], [7, 3, 0, 17, 20], 4, 2, 40),
    ([1, 40, 0], [1, 23, 9], 2, 2, 64),
    ([16, 16], [16, 48], 4, 1, 72),
]


@pytest.mark.parametrize("deterministic", [True, False], ids=["dq-kernel", "dq-atomic"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=["ragged-gqa", "with-empty", "mqa"])
def test_varlen_forward_backward(case, dtype, causal, deterministic, triton_calls, monkeypatch):
    if not deterministic:
        monkeypatch.setenv("ATTNLIB_FLASH_ATOMIC_DQ", "1")  # else the dQ kernel runs (measured faster)
    lq, lk, hq, hkv, d = case
    q, k, v = packed(lq, lk, hq, hkv, d, dtype, seed=sum(lq))
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    scale = d ** -0.5
    out, lse = attnlib.flash_attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=causal, return_lse=True,
                                              deterministic=deterministic)
    assert triton_calls == [1]  # auto picked the Triton kernel
    assert out.shape == q.shape and lse.shape == (hq, sum(lq)) and lse.dtype == torch.float32
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = flash_varlen_reference(*leaves, cq, ck, causal=causal, scale=scale, return_lse=True)
    same = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    base, base_lse = same_dtype_varlen(*same, cq, ck, causal, scale)
    assert_flash_rule(out, ref, base, name="out")
    assert_flash_rule(lse, ref_lse, base_lse, atol=1e-4 if dtype == torch.float16 else 2e-5, name="lse")
    dout = torch.randn_like(out)
    got, want, have = input_grads(out, (q, k, v), dout), input_grads(ref, leaves, dout.double()), input_grads(base, same, dout)
    for name, g, w, h in zip(("dq", "dk", "dv"), got, want, have):
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        assert_flash_rule(g, w, h, factor=3.0, name=name)


def test_torch_and_triton_backends_agree():
    lq, lk = [3, 0, 9], [5, 2, 0]
    q, k, v = packed(lq, lk, 2, 2, 32, torch.float32, seed=1)
    args = (q, k, v, cu_seqlens(lq), cu_seqlens(lk), 9, 5)
    o1, l1 = attnlib.flash_attention_varlen(*args, causal=True, return_lse=True, backend="torch")
    o2, l2 = attnlib.flash_attention_varlen(*args, causal=True, return_lse=True, backend="triton")
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=0)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0)
    assert torch.all(o2[9:] == 0) and torch.all(l2[:, 9:] == float("-inf"))  # last sequence has no keys


def test_strided_cu_seqlens(triton_calls):
    """cu_seqlens as a strided view (every other entry of a buffer) give the same answer as the
    contiguous tensors: the kernels read cu[b] at stride 1, so the view must not reach them as is."""
    lq, lk = [3, 0, 9, 5], [5, 2, 7, 1]
    q, k, v = packed(lq, lk, 2, 1, 32, torch.float32, seed=3)

    def strided(cu):
        buf = torch.zeros(2 * cu.shape[0], dtype=torch.int32, device=DEVICE)  # odd entries: 0
        buf[::2] = cu
        return buf[::2]

    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    sq, sk = strided(cq), strided(ck)
    assert not sq.is_contiguous() and torch.equal(sq, cq)
    o1, l1 = attnlib.flash_attention_varlen(q, k, v, cq, ck, 9, 7, causal=True, return_lse=True)
    dout = torch.randn_like(o1)
    g1 = input_grads(o1, (q, k, v), dout)
    o2, l2 = attnlib.flash_attention_varlen(q, k, v, sq, sk, 9, 7, causal=True, return_lse=True)
    g2 = input_grads(o2, (q, k, v), dout)
    assert triton_calls == [1, 1]
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    for name, a, b in zip(("dq", "dk", "dv"), g1, g2):
        assert torch.equal(a, b), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs CPU tensors under the Triton interpreter")
def test_bf16_on_cpu_runs_the_reference(triton_calls):
    """The interpreter computes bf16 tl.dot wrongly: auto serves bf16 CPU calls with the reference,
    and a forced Triton backend says why it cannot."""
    lq, lk = [3, 6], [5, 4]
    q, k, v = (t.detach() for t in packed(lq, lk, 2, 1, 32, torch.bfloat16, seed=4))
    args = (q, k, v, cu_seqlens(lq), cu_seqlens(lk), 6, 5)
    out = attnlib.flash_attention_varlen(*args)
    assert not triton_calls
    ref = flash_varlen_reference(q.double(), k.double(), v.double(), args[3], args[4])
    assert (out.double() - ref).abs().max().item() < 2e-2
    with pytest.raises(attnlib.NoKernelError, match="bf16 under the Triton interpreter"):
        attnlib.flash_attention_varlen(*args, backend="triton")


def test_too_many_sequences_for_the_grid():
    """Sequences go on grid axis z (at most 65535): more is a reason, not a failed launch. The
    tensors are expanded views, so nothing big is allocated."""
    n = 70000
    q = torch.zeros(1, 2, 16, device=DEVICE).expand(n, 2, 16)
    cu = torch.arange(n + 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(attnlib.NoKernelError, match="sequences 70000 exceeds 65535"):
        attnlib.flash_attention_varlen(q, q, q, cu, cu, 1, 1, backend="triton")


def test_forced_triton_without_interpreter_raises(monkeypatch, triton_calls):
    if torch.cuda.is_available():
        pytest.skip("tensors are on the GPU")
    q, k, v = packed([4], [4], 2, 2, 32, torch.float32)
    cu = cu_seqlens([4])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(attnlib.NoKernelError, match="TRITON_INTERPRET"):
        attnlib.flash_attention_varlen(q, k, v, cu, cu, 4, 4, backend="triton")
    attnlib.flash_attention_varlen(q, k, v, cu, cu, 4, 4, return_lse=True)  # auto: reference
    assert not triton_calls


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_float64_runs_on_torch_backend(causal, triton_calls):
    """float64 (no Triton kernel takes it): auto serves it without Triton, in float64, with the
    reference's values and lse (causal: the first sequence's first query sees no key)."""
    q, k, v = (t.detach().double() for t in packed([3, 4], [2, 5], 2, 1, 16, torch.float32))
    cq, ck = cu_seqlens([3, 4]), cu_seqlens([2, 5])
    out, lse = attnlib.flash_attention_varlen(q, k, v, cq, ck, 4, 5, causal=causal, return_lse=True)
    assert not triton_calls
    assert out.dtype == torch.float64 and out.shape == q.shape
    # the dense reference sequence by sequence (not flash_varlen_reference, which serves float64)
    ref, ref_lse = per_sequence(lambda *qkv: flash_reference(*qkv, causal=causal, return_lse=True), q, k, v, cq, ck)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("change, error, match", [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int64)), TypeError, "cu_seqlens_q must have dtype"),
    (dict(cu_seqlens_k=torch.tensor([0, 2, 8], dtype=torch.int32)), ValueError, "cu_seqlens_k must start at 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32), max_seqlen_k=7), ValueError, "one length"),
    (dict(max_seqlen_q=3), ValueError, "max_seqlen_q"),
    (dict(max_seqlen_k=2.5), TypeError, "max_seqlen_k"),
    (dict(q=torch.randn(1, 7, 2, 16)), ValueError, "q must be 3-D"),
    (dict(k=torch.randn(7, 3, 16)), ValueError, "k and v must agree"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(causal=1), TypeError, "causal"),
    (dict(deterministic=None), TypeError, "deterministic"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError, "cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 8, 7], dtype=torch.int32)), ValueError, "never decrease"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 8], dtype=torch.int32)), ValueError, "end at most at the token count 7"),
    (dict(max_seqlen_k=4), ValueError, r"max_seqlen_k \(4\) is smaller than the longest sequence"),
])
def test_bad_arguments(change, error, match, triton_calls):
    """A clear error before any kernel runs, on CPU and CUDA tensors alike: cu_seqlens values and
    max_seqlen_q/k are read on the host on a GPU too (a wrong cu_seqlens would make the kernel read
    or write out of bounds, a too small max_seqlen_q leave rows unwritten)."""
    q, k, v = (t.detach() for t in packed([3, 4], [2, 5], 2, 1, 16, torch.float32))
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens([3, 4]), cu_seqlens_k=cu_seqlens([2, 5]),
                max_seqlen_q=4, max_seqlen_k=5)
    args.update({n: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for n, t in change.items()})
    with pytest.raises(error, match=match):
        attnlib.flash_attention_varlen(**args)
    assert not triton_calls


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_bf16_and_long(causal):
    lq, lk = [1, 0, 700, 2049, 5], [3, 9, 1000, 2049, 0]
    q, k, v = packed(lq, lk, 8, 2, 128, torch.bfloat16, seed=2)
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    out, lse = attnlib.flash_attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=causal, return_lse=True)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = flash_varlen_reference(*leaves, cq, ck, causal=causal, return_lse=True)
    same = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    base, base_lse = same_dtype_varlen(*same, cq, ck, causal, 128 ** -0.5)
    assert_flash_rule(out, ref, base)
    dout = torch.randn_like(out)
    got, want, have = input_grads(out, (q, k, v), dout), input_grads(ref, leaves, dout.double()), input_grads(base, same, dout)
    for name, g, w, h in zip(("dq", "dk", "dv"), got, want, have):
        assert_flash_rule(g, w, h, factor=3.0, name=name)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_trusts_cu_seqlens():
    """The one exception to the value checks: under CUDA graph capture no host read is allowed
    (and a replay's values are not known at capture), so cu_seqlens are trusted there, as
    flash_attn does. The capture must not fail on the check, and its replay gives the eager
    answer."""
    lq, lk = [5, 0, 70], [9, 3, 64]
    q, k, v = (t.detach() for t in packed(lq, lk, 4, 2, 64, torch.float16, seed=4))
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    want = attnlib.flash_attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=True)  # compile outside
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = attnlib.flash_attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=True)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, atol=0, rtol=0)

