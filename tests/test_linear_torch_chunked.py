"""linear-torch-chunked: the memory-bounded pure-PyTorch linear attention (the CPU fallback).

Held to the float64 reference by the repo's rule: error at most 2x (gradients 3x) the error of
the reference run at the same dtype, plus ATOL. Covers every feature map, fp32/fp16/bf16, odd
lengths (1, 17, 129, 300), causal with seq_q != seq_k both ways (rows that see no key), GQA 4:1
and MQA, both layouts through the public API, eps (0 and large), several chunks per call, empty
inputs, determinism, dispatch, and memory: a causal forward + backward stays O(S * D), far below
the reference's per-key D x Dv prefix states.
"""
from __future__ import annotations

import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnlib
from attnlib.api import build_inputs
from attnlib.dispatch import kernels
from attnlib.inputs import to_bhsd
from attnlib.kernels import linear_torch_chunked as chunked
from attnlib.reference import linear_reference
from attnlib.testing import assert_flash_rule, input_grads, make_qkv

from test_flash_torch_chunked import case_id, dtype_id, peak_cpu_bytes

KERNEL = "linear-torch-chunked"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAPS = ["elu", "relu", "softmax", "identity"]


def qkv(b, hq, hkv, sq, sk, d, dv, *, dtype, layout, feature_map, seed):
    """Fresh standard-normal inputs; for identity q and k shifted by +1: with phi = identity on
    zero-mean inputs some denominators phi(q) . sum phi(k) land near 0, outputs reach 1e5 and
    float32 rounding (the reference's as much as ours) decides their digits."""
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, head_dim_v=dv, dtype=dtype, layout=layout,
                       seed=seed)
    if feature_map == "identity":
        q, k = q + 1, k + 1
    return tuple(t.requires_grad_() for t in (q, k, v))


def check(q, k, v, *, feature_map="elu", causal=False, layout="bhsd", eps=1e-6):
    """attnlib's linear attention on the torch backend (which must pick linear-torch-chunked)
    against the float64 reference: out, dq, dk, dv; returns (out, grads) in bhsd."""
    kw = dict(feature_map=feature_map, causal=causal, layout=layout, eps=eps)
    assert attnlib.explain(q, k, v, method="linear", backend="torch", **kw).chosen.name == KERNEL
    out = attnlib.linear_attention(q, k, v, backend="torch", **kw)
    assert out.dtype == q.dtype and out.is_contiguous()
    assert out.shape == q.shape[:-1] + (v.shape[-1],)
    ref_kw = dict(feature_map=feature_map, causal=causal, eps=eps)
    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    gen = torch.Generator().manual_seed(q.numel() + k.shape[2])
    dout = torch.randn(out.shape, generator=gen).to(q.dtype)
    got = input_grads(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (qb, kb, vb)]
    ref = linear_reference(*leaves, **ref_kw)
    want = input_grads(ref, leaves, to_bhsd(dout, layout).double())
    same = [t.detach().clone().requires_grad_() for t in (qb, kb, vb)]
    base = linear_reference(*same, **ref_kw)  # the reference at the inputs' dtype
    have = input_grads(base, same, to_bhsd(dout, layout))
    out_b, got_b = to_bhsd(out, layout), [to_bhsd(g, layout) for g in got]
    assert_flash_rule(out_b, ref, base, name="out")
    for name, g, w, h in zip(("dq", "dk", "dv"), got_b, want, have):
        assert g.dtype == q.dtype and torch.isfinite(g).all(), f"{name}: {g.dtype}, or not finite"
        assert_flash_rule(g, w, h, factor=3.0, name=name)
    sq, sk = qb.shape[2], kb.shape[2]
    if causal and sq > sk:  # bottom-right: the first sq - sk rows see no key
        assert (out_b[:, :, :sq - sk] == 0).all() and (got_b[0][:, :, :sq - sk] == 0).all()
    return out_b, got_b


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, head_dim_v, causal, layout)
CASES = [
    (1, 2, 2, 1, 1, 16, 16, False, "bhsd"),
    (1, 2, 2, 1, 1, 16, 16, True, "bshd"),
    (2, 2, 2, 17, 17, 32, 32, True, "bhsd"),
    (1, 4, 4, 129, 129, 40, 40, True, "bshd"),
    (1, 2, 2, 300, 300, 24, 24, True, "bhsd"),    # several default chunks, ragged last
    (1, 4, 1, 33, 70, 40, 40, True, "bshd"),      # MQA, seq_q < seq_k: keys every row sees
    (1, 4, 1, 70, 33, 24, 24, True, "bhsd"),      # seq_q > seq_k: the first 37 rows see no key
    (1, 8, 2, 129, 300, 20, 28, True, "bshd"),    # GQA 4:1, dv != d, odd head dims
    (2, 8, 2, 300, 17, 16, 16, True, "bhsd"),     # GQA, most rows see no key
    (1, 8, 2, 47, 129, 64, 64, False, "bshd"),    # GQA, non-causal
    (2, 4, 2, 17, 300, 12, 28, False, "bhsd"),    # non-causal, dv != d
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, dtype):
    b, hq, hkv, sq, sk, d, dv, causal, layout = case
    q, k, v = qkv(b, hq, hkv, sq, sk, d, dv, dtype=dtype, layout=layout, feature_map="elu", seed=sq * 1000 + sk)
    check(q, k, v, causal=causal, layout=layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("feature_map", MAPS)
def test_feature_maps(feature_map, causal, dtype):
    q, k, v = qkv(1, 4, 2, 129, 300, 24, 24, dtype=dtype, layout="bshd", feature_map=feature_map, seed=11)
    check(q, k, v, feature_map=feature_map, causal=causal, layout="bshd")
    q, k, v = qkv(1, 4, 1, 300, 129, 24, 24, dtype=dtype, layout="bhsd", feature_map=feature_map, seed=12)
    check(q, k, v, feature_map=feature_map, causal=causal, layout="bhsd")


def count_chunks(monkeypatch, chunk):
    """Sets the chunk; returns the list each chunk's row count goes to (forward and backward)."""
    monkeypatch.setattr(chunked, "CHUNK", chunk)
    rows = []
    real = chunked._chunk_sums
    monkeypatch.setattr(chunked, "_chunk_sums", lambda pq, *a, **kw: rows.append(pq.shape[2]) or real(pq, *a, **kw))
    return rows


@pytest.mark.parametrize("chunk", [1, 5, 16])
@pytest.mark.parametrize("case", [CASES[3], CASES[5], CASES[6], CASES[8]], ids=case_id)
def test_several_chunks(case, chunk, monkeypatch):
    """Chunk boundaries anywhere on the diagonal, with keys before it (Sq < Sk) and rows without
    one (Sq > Sk); fp32 and bf16."""
    b, hq, hkv, sq, sk, d, dv, causal, layout = case
    rows = count_chunks(monkeypatch, chunk)
    for dtype, fmap in ((torch.float32, "softmax"), (torch.bfloat16, "relu")):
        q, k, v = qkv(b, hq, hkv, sq, sk, d, dv, dtype=dtype, layout=layout, feature_map=fmap, seed=chunk)
        rows.clear()
        check(q, k, v, feature_map=fmap, causal=True, layout=layout)
        n_chunks = -(-min(sq, sk) // chunk)
        assert len(rows) == 2 * n_chunks and max(rows) == (hq // hkv) * min(chunk, sq, sk)


@pytest.mark.parametrize("feature_map", MAPS + ["tanh"])
def test_phi_derivative(feature_map, monkeypatch):
    """The written-out pull-back through phi equals autograd's, at x = 0 too; a map without one
    (tanh, added to the reference's table here) goes through torch.func.vjp."""
    import attnlib.reference.linear as linear_mod

    monkeypatch.setitem(linear_mod.FEATURE_MAPS, "tanh", torch.tanh)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    x[0, 0, :3] = 0
    g = torch.randn_like(x)
    px, pull = chunked._phi_with_grad(feature_map, x)
    xr = x.clone().requires_grad_()
    pr = linear_mod.feature_map_fn(feature_map)(xr)
    (want,) = torch.autograd.grad(pr, xr, g)
    torch.testing.assert_close(px, pr.detach(), rtol=0, atol=0)
    torch.testing.assert_close(pull(g), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_eps(causal):
    """eps = 0 and a relu row whose phi(q) is all 0: its denominator is exactly 0, so 0 and no
    gradient (the reference's safe_divide); with causal and Sq > Sk, rows without a key too.
    A large eps as given."""
    q, k, v = make_qkv(1, 4, 40, 16, kv_heads=2, seq_k=29, seed=7)
    q[0, 1, 35] = -q[0, 1, 35].abs() - 0.1  # relu(q) = 0: no key mass
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, (dq, _, _) = check(q, k, v, feature_map="relu", causal=causal, eps=0.0)
    assert (out[0, 1, 35] == 0).all() and (dq[0, 1, 35] == 0).all()
    check(q, k, v, feature_map="elu", causal=causal, eps=1.0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 0, 5), (1, 5, 0), (0, 5, 5), (1, 0, 0)], ids=lambda s: "b{}q{}k{}".format(*s))
def test_empty(shape, causal):
    """seq_q 0, seq_k 0 (rows see nothing: 0), batch 0: shapes, values, zero gradients."""
    b, sq, sk = shape
    q, k, v = make_qkv(max(b, 1), 4, sq, 16, kv_heads=2, seq_k=sk, seed=3)
    q, k, v = (t[:b].clone().requires_grad_() for t in (q, k, v))
    assert attnlib.explain(q, k, v, method="linear", causal=causal, backend="torch").chosen.name == KERNEL
    out = attnlib.linear_attention(q, k, v, causal=causal, backend="torch")
    assert out.shape == (b, 4, sq, 16)
    assert (out == 0).all() if sk == 0 else True
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


def test_deterministic():
    q, k, v = make_qkv(1, 8, 61, 32, kv_heads=2, seq_k=77, requires_grad=True, seed=5)
    runs = []
    for _ in range(2):
        out = attnlib.linear_attention(q, k, v, causal=True, backend="torch")
        runs.append((out, *torch.autograd.grad((out * out).sum(), (q, k, v))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_dispatch(monkeypatch):
    """Outranks the reference on the torch backend for fp16/bf16/fp32; fp64 keeps the reference;
    auto picks it on CPU without the Triton interpreter (and for bf16 with it: linear-triton
    refuses bf16 there)."""
    for dtype in DTYPES:
        q, k, v = make_qkv(1, 2, 8, 16, dtype=dtype, seed=1)
        ex = attnlib.explain(q, k, v, method="linear", causal=True, backend="torch")
        assert ex.chosen.name == KERNEL and "linear-torch-reference" not in ex.reasons
    q, k, v = make_qkv(1, 2, 8, 16, dtype=torch.float64, seed=1)
    ex = attnlib.explain(q, k, v, method="linear", backend="torch")
    assert ex.chosen.name == "linear-torch-reference"
    assert ex.reasons[KERNEL] == ["dtype fp64 not supported (supports fp16, bf16, fp32)"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for dtype in DTYPES:
        q, k, v = make_qkv(1, 2, 8, 16, dtype=dtype, seed=1)
        assert attnlib.explain(q, k, v, method="linear").chosen.name == KERNEL
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = make_qkv(1, 2, 8, 16, dtype=torch.bfloat16, seed=1)
    assert attnlib.explain(q, k, v, method="linear").chosen.name == KERNEL
    kernel = next(k for k in kernels("linear") if k.name == KERNEL)
    assert kernel.priority == 5 and not kernel.supports_lse and kernel.options == ("feature_map", "eps")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_is_its_own(causal, monkeypatch):
    """The explicit backward runs, not the base class's recompute under torch.func.vjp."""
    from attnlib.dispatch import Kernel

    monkeypatch.setattr(Kernel, "backward", lambda *a, **kw: pytest.fail("Kernel.backward (vjp) ran"))
    name = "causal_backward" if causal else "full_backward"
    ran = []
    real = getattr(chunked, name)
    monkeypatch.setattr(chunked, name, lambda *a, **kw: ran.append(1) or real(*a, **kw))
    q, k, v = make_qkv(1, 2, 9, 16, requires_grad=True, seed=2)
    attnlib.linear_attention(q, k, v, causal=causal, backend="torch").sum().backward()
    assert ran == [1] and q.grad is not None


def test_torch_compile_fullgraph():
    q, k, v = make_qkv(1, 4, 21, 16, kv_heads=2, layout="bshd", seed=4)

    def f(q, k, v):
        return attnlib.linear_attention(q, k, v, backend="torch", layout="bshd", causal=True)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v), rtol=0, atol=0)


def test_under_a_dispatch_mode():
    """Forward and backward under FlopCounterMode (functorch's vjp would fail inside the op), held
    to the float64 reference there (out, dq, dk, dv: check), fresh inputs per case."""
    from torch.utils.flop_counter import FlopCounterMode

    for causal in (False, True):
        q, k, v = qkv(1, 4, 2, 33, 33, 16, 16, dtype=torch.float32, layout="bhsd", feature_map="softmax",
                      seed=8 + causal)
        with FlopCounterMode(display=False):
            check(q, k, v, feature_map="softmax", causal=causal)


# -- memory and speed -----------------------------------------------------------------------------

class LargestTensor(TorchDispatchMode):
    """The most elements any aten op's output held while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        res = func(*args, **(kwargs or {}))
        for t in (res if isinstance(res, (tuple, list)) else (res,)):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return res


def test_no_tensor_larger_than_the_inputs():
    """Every intermediate of the kernel's forward and backward (called directly: under a mode,
    the op's insides are not seen) is at most as large as q, k, v, the output or one chunk's
    C x C weights per query head; the reference forms (B, H, 256, D, Dv) per chunk of keys and,
    for backward, keeps every chunk's."""
    b, hq, hkv, sq, sk, d, dv = 1, 8, 2, 600, 700, 32, 48
    kernel = next(k for k in kernels("linear") if k.name == KERNEL)
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, head_dim_v=dv, dtype=dtype, seed=9)
            inp = build_inputs(q, k, v, method="linear", causal=causal)
            with LargestTensor() as mode:
                out = kernel.forward(inp)
                kernel.backward(inp, out, None, torch.ones_like(out), None)
            bound = max(max(t.numel() for t in (q, k, v, out)), b * hq * chunked.CHUNK ** 2)
            assert mode.numel <= bound, (mode.numel, bound)
            assert b * hq * 256 * d * dv > 2 * bound  # what one chunk of the reference's states holds


def test_peak_memory_is_linear_in_sequence():
    """Causal forward + backward at B1 H2 S2048 D=Dv=128 in fp32: the reference's per-key states
    alone are 256 MiB; here the peak is a few copies of the inputs (q is 2 MiB)."""
    seq, heads, d = 2048, 2, 128
    q, k, v = make_qkv(1, heads, seq, d, requires_grad=True, seed=6)

    def step():
        out = attnlib.linear_attention(q, k, v, causal=True, backend="torch")
        out.backward(torch.ones_like(out))

    peak = peak_cpu_bytes(step)
    io = q.numel() * 4
    states = seq * d * d * heads * 4
    assert peak <= 16 * io, f"peak {peak / 2**20:.1f} MiB, q {io / 2**20:.0f} MiB"
    assert peak < states / 8, f"peak {peak / 2**20:.1f} MiB against {states / 2**20:.0f} MiB of states"
    assert torch.isfinite(q.grad).all()


def test_speed_report(capsys):
    """Not a timing assertion: prints the kernel's and the reference's causal forward + backward."""
    q, k, v = make_qkv(1, 4, 256, 64, requires_grad=True, seed=10)

    def best_ms(fn, n=3):
        fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * min(times)

    def ours():
        attnlib.linear_attention(q, k, v, causal=True, backend="torch").sum().backward()

    def reference():
        linear_reference(q, k, v, causal=True).sum().backward()

    t_ours, t_ref = best_ms(ours), best_ms(reference)
    with capsys.disabled():
        print(f"\n[linear-torch-chunked] B1 H4 S256 D64 causal fp32 fwd+bwd: {t_ours:.1f} ms; "
              f"reference (autograd): {t_ref:.1f} ms ({t_ref / t_ours:.0f}x)")
