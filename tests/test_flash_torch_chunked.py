"""flash-torch-chunked: the memory-bounded pure-PyTorch flash kernel (the CPU fallback).

Held to the float64 reference: fp32 within about 1e-5 relative, fp16/bf16 by flash_attn's rule
(error at most 2x, gradients 3x, PyTorch's own error in that dtype). Covers lse and its gradient,
odd lengths, seq_q != seq_k with causal both ways, GQA/MQA, both layouts, a value head dim other
than the query's, several chunks per call, empty inputs, determinism, dispatch, torch.compile,
and peak memory: a forward + backward stays far below the (Sq, Sk) score matrix the reference forms.
"""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.inputs import to_bhsd
from attnlib.kernels import flash_sdpa as chunked_sdpa
from attnlib.kernels import flash_torch_chunked as chunked
from attnlib.reference import flash_reference
from attnlib.reference._common import causal_mask
from attnlib.testing import assert_flash_rule, describe_mismatch, make_qkv

KERNEL = "flash-torch-chunked"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _chunked_for_fp32_training(flash_training_on_chunked):
    """Graph-building fp32 CPU calls would run torch SDPA (test_cpu_sdpa_routing.py): here they
    run this kernel, whose backward is what these tests check."""


def dtype_id(d: torch.dtype) -> str:
    return str(d).split(".")[-1]


def torch_same_dtype(q, k, v, *, causal: bool, scale: float):
    """Plain PyTorch math in the inputs' own dtype (the error users already accept): (out, lse);
    rows with no visible key give 0 and -inf."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
    if causal:
        visible = causal_mask(q.shape[2], k.shape[2], q.device)
    scores = scores.masked_fill(~visible, torch.finfo(q.dtype).min)
    has_key = visible.any(-1)[:, None]
    out = torch.where(has_key, scores.softmax(-1) @ v, torch.zeros((), dtype=q.dtype))
    lse = torch.where(has_key[:, 0], torch.logsumexp(scores, -1).float(), float("-inf"))
    return out, lse


def assert_fp32_close(got: torch.Tensor, want: torch.Tensor, name: str, rel: float = 1e-5) -> None:
    """max|got - want| <= rel * max(max|want|, 1), and -inf where want is -inf. Standard-normal
    inputs give values of order 1; the floor covers results that are 0 in exact arithmetic (dq
    with a single key) and come out as float32 rounding."""
    g, w = got.detach().double(), want.detach().double()
    assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    both_inf = (g == w) & torch.isinf(w)
    err = torch.where(both_inf, torch.zeros_like(g), (g - w).abs())
    finite = w[torch.isfinite(w)]
    bound = rel * max(finite.abs().max().item() if finite.numel() else 0.0, 1.0)
    err_max = err.max().item() if err.numel() else 0.0
    assert err_max <= bound, describe_mismatch(got, want, name) + f"\n  err {err_max:.3g} > {bound:.3g}"


def finite_part(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf rows (no visible key) zeroed, so a loss on it has no inf/NaN."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def loss_grads(out, lse, leaves, dout, dlse):
    """Gradients of sum(out * dout) (+ sum(lse * dlse) when dlse is given) w.r.t. leaves."""
    loss = (out * dout).sum()
    if dlse is not None:
        loss = loss + (finite_part(lse) * dlse).sum()
    return torch.autograd.grad(loss, leaves)


def check(q, k, v, *, causal: bool, layout: str, with_dlse: bool = False) -> None:
    """attnlib on the torch backend (which must pick flash-torch-chunked) against the float64
    reference: out, lse, dq, dk, dv."""
    scale = q.shape[-1] ** -0.5
    assert attnlib.explain(q, k, v, causal=causal, layout=layout, backend="torch").chosen.name == KERNEL
    out, lse = attnlib.flash_attention(q, k, v, causal=causal, layout=layout, return_lse=True, backend="torch")
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert out.shape == q.shape[:-1] + (v.shape[-1],) and out.is_contiguous()
    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (qb, kb, vb)]
    ref, ref_lse = flash_reference(*leaves, causal=causal, scale=scale, return_lse=True)
    gen = torch.Generator().manual_seed(q.numel() + k.shape[2])
    dout = torch.randn(out.shape, generator=gen).to(q.dtype)
    dlse = torch.randn(lse.shape, generator=gen) if with_dlse else None
    got = loss_grads(out, lse, (q, k, v), dout, dlse)
    want = loss_grads(ref, ref_lse, leaves, to_bhsd(dout, layout).double(),
                      None if dlse is None else dlse.double())
    assert not torch.isnan(lse).any() and torch.isfinite(out).all()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse is -inf on other rows than the reference"
    if q.dtype == torch.float32:
        assert_fp32_close(to_bhsd(out, layout), ref, "out")
        assert_fp32_close(lse, ref_lse, "lse")
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            assert torch.isfinite(g).all(), f"{name} has non-finite values"
            assert_fp32_close(to_bhsd(g, layout), w, name)
        return
    same = [t.detach().clone().requires_grad_() for t in (qb, kb, vb)]
    base, base_lse = torch_same_dtype(*same, causal=causal, scale=scale)
    have = loss_grads(base, base_lse, same, to_bhsd(dout, layout), dlse)
    assert_flash_rule(to_bhsd(out, layout), ref, base, name="out")
    assert_flash_rule(lse, ref_lse, base_lse, atol=1e-4 if q.dtype == torch.float16 else 2e-3, name="lse")
    for name, g, w, h in zip(("dq", "dk", "dv"), got, want, have):
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        assert_flash_rule(to_bhsd(g, layout), w, h, factor=3.0, name=name)


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, head_dim_v, causal, layout)
CASES = [
    (1, 2, 2, 1, 1, 64, 64, False, "bhsd"),
    (1, 2, 2, 17, 17, 64, 64, True, "bshd"),
    (2, 2, 2, 113, 113, 32, 32, False, "bhsd"),
    (1, 2, 2, 129, 129, 40, 40, True, "bhsd"),
    (1, 4, 1, 33, 70, 40, 40, True, "bshd"),   # MQA, seq_q < seq_k
    (1, 4, 1, 70, 33, 24, 24, True, "bhsd"),   # seq_q > seq_k: the first 37 rows see no key
    (1, 8, 2, 47, 47, 64, 64, False, "bshd"),  # GQA 4:1
    (1, 8, 2, 40, 90, 20, 20, True, "bhsd"),   # GQA, head dim no multiple of 8
    (2, 4, 2, 17, 113, 12, 28, False, "bshd"), # value head dim != query head dim
]


def case_id(c) -> str:
    return "b{}h{}kv{}q{}k{}d{}dv{}{}-{}".format(*c[:7], "-causal" if c[7] else "", c[8])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, dtype):
    b, hq, hkv, sq, sk, d, dv, causal, layout = case
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, head_dim_v=dv, dtype=dtype, layout=layout,
                       requires_grad=True, seed=sq * 1000 + sk)
    check(q, k, v, causal=causal, layout=layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[5], CASES[7]], ids=case_id)
def test_lse_gradient(case, dtype):
    """A loss on lse as well as out (dlse given to the backward)."""
    b, hq, hkv, sq, sk, d, dv, causal, layout = case
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, head_dim_v=dv, dtype=dtype, layout=layout,
                       requires_grad=True, seed=sq * 1000 + sk + 7)
    check(q, k, v, causal=causal, layout=layout, with_dlse=True)


@pytest.mark.parametrize("budget_rows", [1, 3, 16])
@pytest.mark.parametrize("case", [CASES[3], CASES[5], CASES[6], CASES[8]], ids=case_id)
def test_several_chunks(case, budget_rows, monkeypatch):
    """A byte budget of budget_rows query rows: chunk boundaries inside the causal diagonal, in
    the rows that see no key, and a ragged last chunk."""
    b, hq, hkv, sq, sk, d, dv, causal, layout = case
    budget = budget_rows * b * hq * sk * 4
    monkeypatch.setattr(chunked, "SCORE_BUDGET_BYTES", budget)
    assert chunked.rows_per_chunk(b, hq, sq, sk) == budget_rows
    calls = []
    real = chunked._scores
    monkeypatch.setattr(chunked, "_scores", lambda *a: calls.append(a[3]) or real(*a))
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, head_dim_v=dv, layout=layout,
                       requires_grad=True, seed=sq + budget_rows)
    check(q, k, v, causal=causal, layout=layout, with_dlse=True)
    first_rows = sorted(set(calls))
    assert first_rows[-1] > 0 and len(first_rows) > 1  # several chunks ran (forward and backward)


def test_rows_per_chunk():
    mib = 1 << 20
    assert chunked.rows_per_chunk(1, 24, 16384, 16384, 64 * mib) == 42  # 24 heads x 16k keys: 1.5 MiB a row
    assert chunked.rows_per_chunk(1, 2, 10, 4, 64 * mib) == 10          # at most seq_q
    assert chunked.rows_per_chunk(64, 64, 10, 1 << 20, mib) == 1       # at least one row
    assert chunked.rows_per_chunk(0, 2, 10, 4, mib) == 10               # empty batch
    assert chunked.rows_per_chunk(1, 2, 10, 0, mib) == 10               # no keys


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 0, 5), (1, 2, 5, 0), (0, 2, 5, 5), (1, 2, 0, 0)],
                         ids=lambda s: "b{}h{}q{}k{}".format(*s))
def test_empty(shape, causal):
    """seq_q 0, seq_k 0 (rows see nothing: 0 and -inf), batch 0: shapes, values, zero gradients."""
    b, h, sq, sk = shape
    q, k, v = make_qkv(max(b, 1), h, sq, 16, seq_k=sk, seed=3)
    q, k, v = (t[:b].clone().requires_grad_() for t in (q, k, v))
    assert attnlib.explain(q, k, v, causal=causal, backend="torch").chosen.name == KERNEL
    out, lse = attnlib.flash_attention(q, k, v, causal=causal, return_lse=True, backend="torch")
    assert out.shape == (b, h, sq, 16) and lse.shape == (b, h, sq)
    assert (out == 0).all() if sk == 0 else True
    assert (lse == float("-inf")).all() if sk == 0 else True
    (out.sum() + finite_part(lse).sum()).backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


def test_deterministic():
    q, k, v = make_qkv(1, 8, 61, 32, kv_heads=2, seq_k=77, requires_grad=True, seed=5)
    runs = []
    for _ in range(2):
        out, lse = attnlib.flash_attention(q, k, v, causal=True, return_lse=True, backend="torch")
        grads = torch.autograd.grad((out * out).sum() + lse.sum(), (q, k, v))
        runs.append((out, lse, *grads))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_dispatch(monkeypatch):
    """Outranks the reference on the torch backend for fp16/bf16/fp32 (inference on CPU goes to
    torch's CPU flash kernel, flash-torch-sdpa, where torch takes the inputs; calls with lse or a
    fp16/bf16 graphs come here, fp32 ones with the fixture); fp64 keeps the reference; auto picks it on CPU where no Triton kernel runs
    (none without TRITON_INTERPRET=1) and SDPA does not serve the call."""
    for dtype in DTYPES:
        q, k, v = make_qkv(1, 2, 8, 16, dtype=dtype, seed=1)
        ex = attnlib.explain(q, k, v, backend="torch", return_lse=True)
        assert ex.chosen.name == KERNEL and "flash-torch-reference" not in ex.reasons
        qg, kg, vg = make_qkv(1, 2, 8, 16, dtype=dtype, requires_grad=True, seed=1)
        assert attnlib.explain(qg, kg, vg, backend="torch").chosen.name == KERNEL
        monkeypatch.undo()  # without the fixture: fp32 training runs torch SDPA, 16-bit stays here
        want = "flash-torch-sdpa" if dtype == torch.float32 else KERNEL
        assert attnlib.explain(qg, kg, vg, backend="torch").chosen.name == want
        monkeypatch.setattr(chunked_sdpa, "cpu_backward_ok", lambda inp: False)
    q, k, v = make_qkv(1, 2, 8, 16, dtype=torch.float64, seed=1)
    ex = attnlib.explain(q, k, v, backend="torch")
    assert ex.chosen.name == "flash-torch-reference"
    assert ex.reasons[KERNEL] == ["dtype fp64 not supported (supports fp16, bf16, fp32)"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(1, 2, 8, 16, seed=1)
    assert attnlib.explain(q, k, v, return_lse=True).chosen.name == KERNEL
    q, k, v = make_qkv(1, 2, 8, 12, head_dim_v=20, seed=1)  # no Triton kernel takes it, interpreter or not
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attnlib.explain(q, k, v, return_lse=True).chosen.name == KERNEL


def assert_backward_is_its_own(monkeypatch, attention) -> None:
    """attention(q, k, v)'s backward is the FA2 backward from the saved out and lse (one call of
    chunked_backward), not the base class's recompute under vjp."""
    from attnlib.dispatch import Kernel

    monkeypatch.setattr(Kernel, "backward", lambda *a, **kw: pytest.fail("Kernel.backward (vjp) ran"))
    ran = []
    real = chunked.chunked_backward
    monkeypatch.setattr(chunked, "chunked_backward", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    q, k, v = make_qkv(1, 2, 9, 16, requires_grad=True, seed=2)
    attention(q, k, v).sum().backward()
    assert ran == [1] and q.grad is not None


def test_backward_is_its_own(monkeypatch):
    assert_backward_is_its_own(monkeypatch, lambda q, k, v: attnlib.flash_attention(q, k, v, backend="torch"))


def test_torch_compile_fullgraph():
    q, k, v = make_qkv(1, 4, 21, 16, kv_heads=2, layout="bshd", seed=4)

    def f(q, k, v):
        return attnlib.attention(q, k, v, method="flash", backend="torch", layout="bshd", causal=True)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v), rtol=0, atol=0)


# -- memory ------------------------------------------------------------------------------------

def peak_cpu_bytes(fn) -> int:
    """Peak of CPU bytes allocated by torch while fn runs, above what was live when it began:
    the profiler's allocation records (every allocation and free of torch's CPU allocator),
    summed in time order; frees of memory allocated before fn began are left out."""
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = []

    def walk(events):
        for e in events:
            if isinstance(e.extra_fields, _ExtraFields_Allocation):
                records.append((e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size))
            walk(e.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    assert records, "the profiler recorded no allocation"
    live, now, peak = set(), 0, 0
    for _, ptr, size in sorted(records, key=lambda r: r[0]):
        if size > 0:
            live.add(ptr)
        elif ptr in live:
            live.discard(ptr)
        else:
            continue
        now += size
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("budget_mib", [None, 4])
def test_peak_memory_stays_far_below_the_score_matrix(budget_mib, monkeypatch):
    """B1 H2 S8192 D32 (fp32 scores 512 MiB; the reference peaks above 1 GiB) at the default
    64 MiB budget, and S4096 (128 MiB) at a 4 MiB one: a forward + backward peaks at about two
    chunks of scores (the backward's P and dS) plus the inputs, outputs and gradients."""
    seq = 8192 if budget_mib is None else 4096
    if budget_mib is not None:
        monkeypatch.setattr(chunked, "SCORE_BUDGET_BYTES", budget_mib << 20)
    budget = chunked.SCORE_BUDGET_BYTES
    q, k, v = make_qkv(1, 2, seq, 32, requires_grad=True, seed=6)
    io = 16 * q.numel() * 4  # q, k, v, out, dout, grads, fp32 accumulators, lse: generous

    def step():
        out = attnlib.flash_attention(q, k, v, causal=True, backend="torch")
        out.backward(torch.ones_like(out))

    peak = peak_cpu_bytes(step)
    scores = 2 * seq * seq * 4
    assert peak <= 2 * budget + io, f"peak {peak / 2**20:.1f} MiB, budget {budget / 2**20:.0f} MiB"
    assert peak < scores / 3, f"peak {peak / 2**20:.1f} MiB against {scores / 2**20:.0f} MiB of scores"
    assert q.grad is not None and torch.isfinite(q.grad).all()
