"""sage-torch-chunked: method sage's memory-bounded pure-PyTorch kernel (the CPU fallback).

Held to sage_reference (the INT8 simulation it chunks), with a score budget forced down so that
several chunks run at small shapes: the base-2 scores every chunk feeds its softmax are the
reference's bit for bit (Q blocks aligned, K smoothed and quantized once); out and lse differ at
most by the float32 ulps that exp2's vector/scalar paths and BLAS's shape-dependent sums leave
(the kernel module's docstring), and one chunk is the reference bit for bit. Also held to sage's
accuracy contract against the float64 flash reference. Covers odd lengths (1, 17, 129, 200), GQA
4:1 and MQA, causal with seq_q != seq_k both ways (rows that see no key), both layouts, lse, every
pv mode and qk_granularity, fp16/bf16/fp32, poisoned output buffers, dispatch and peak memory.
"""
from __future__ import annotations

import pytest
import torch

import attnlib
import attnlib.reference.sage as sage_ref
from attnlib.inputs import to_bhsd
from attnlib.kernels import flash_torch_chunked as flash_chunked
from attnlib.kernels import sage_torch_chunked as chunked
from attnlib.reference import flash_reference, sage_reference
from attnlib.testing import describe_mismatch, make_qkv, metrics, poison_

from test_flash_torch_chunked import dtype_id, peak_cpu_bytes

KERNEL = "sage-torch-chunked"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PV_MODES = ["fp16", "fp16_accum", "fp8"]
GRANULARITIES = ["per_block", "per_warp"]
# SageAttention's contract against exact attention (tests/test_reference_sage.py, test_sage_triton.py)
CONTRACT = {"fp16": (0.999, 3e-2), "fp16_accum": (0.999, 3e-2), "fp8": (0.998, 5e-2)}  # (cos min, rel L1 max)
# out vs the reference, over max|v|: float32 ulps of the PV sums (seen: 2^-24) ...
ULP_SLACK = 2.0 ** -20
# ... and, in at most FLIPPED_ROWS rows, one P element's (or fp16 accumulator partial's) rounding
# flipped by such an ulp: one fp16 ulp, at most 2^-10 of P V's scale (an e4m3 flip of P, 2^7
# times rarer, would be larger: none is expected in these tests)
FLIP_SLACK, FLIPPED_ROWS = 2.0 ** -10, 2
# lse vs the reference, relative to the terms it adds: the row max, log l (l's ulps) and the
# smoothing shift scale * q . mean_k (a matmul, summed by BLAS in an order the shape picks)
LSE_TOL = 2.0 ** -20

# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, layout)
CASES = [
    (1, 2, 2, 1, 1, 16, False, "bhsd"),      # one token
    (2, 4, 4, 17, 17, 32, True, "bshd"),     # shorter than a Q block: chunks over batch and heads
    (1, 8, 2, 129, 129, 64, False, "bshd"),  # GQA 4:1; 129 rows: a Q block and one row
    (2, 4, 1, 200, 129, 32, True, "bhsd"),   # MQA; causal seq_q > seq_k: the first 71 rows see no key
    (1, 4, 2, 129, 200, 64, True, "bshd"),   # causal seq_q < seq_k
    (1, 2, 1, 200, 17, 48, False, "bhsd"),   # MQA, few keys
    (1, 2, 2, 17, 200, 16, True, "bhsd"),    # causal, few queries, many keys
]


def case_id(c):
    return "b{}h{}kv{}q{}k{}d{}{}-{}".format(*c[:6], "-causal" if c[6] else "", c[7])


def inputs(case, dtype=torch.float32, seed=0):
    b, hq, hkv, sq, sk, d, causal, layout = case
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, dtype=dtype, layout=layout, k_bias=2.0,
                       seed=1000 * sq + sk + d + seed)
    return q, k, v, dict(causal=causal, layout=layout)


def tiny_budget(monkeypatch, case, rows=1):
    """A score budget of `rows` query rows of one (batch, head) (by default every chunk is one Q
    block, or the whole sequence where shorter, of one head). Returns the list chunked_forward's
    calls of attend_rows append their first row to."""
    seq_k = case[4]
    monkeypatch.setattr(flash_chunked, "SCORE_BUDGET_BYTES", rows * seq_k * 4)
    calls = []
    real = chunked.attend_rows
    monkeypatch.setattr(chunked, "attend_rows", lambda keys, q, row0, *a: calls.append(row0) or real(keys, q, row0, *a))
    return calls


def run(q, k, v, *, layout, causal, **opts):
    """attnlib.sage_attention on the torch backend, which must pick this kernel: bhsd (out, lse)."""
    kw = dict(layout=layout, causal=causal, **opts)
    assert attnlib.explain(q, k, v, method="sage", backend="torch", **kw).chosen.name == KERNEL
    out, lse = attnlib.sage_attention(q, k, v, backend="torch", return_lse=True, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == to_bhsd(q, layout).shape[:3]
    return to_bhsd(out, layout), lse


def reference(q, k, v, *, layout, causal, **opts):
    return sage_reference(*(to_bhsd(t, layout) for t in (q, k, v)), causal=causal, return_lse=True, **opts)


def smoothing_shift(q, k, layout, scale):
    """|scale * q . mean_k| per query row (B, Hq, Sq), float64: what lse adds back after smoothing."""
    qb, kb = to_bhsd(q, layout).double(), to_bhsd(k, layout).double()
    mean = kb.mean(-2, keepdim=True).repeat_interleave(qb.shape[1] // kb.shape[1], 1)
    return (scale * (qb @ mean.transpose(-1, -2))).squeeze(-1).abs()


def assert_matches_reference(got, want, q, k, v, layout, scale=None):
    """(out, lse) of the kernel against the reference's: equal but for the ulps the kernel module's
    docstring names (see ULP_SLACK, FLIP_SLACK, LSE_TOL)."""
    (out, lse), (ref, ref_lse) = got, want
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse is -inf on other rows"
    assert not lse.isnan().any() and torch.isfinite(out).all()
    eps = torch.finfo(out.dtype).eps  # one ulp of the output dtype, relative
    vmax = v.detach().abs().max().double().item()
    err = (out.double() - ref.double()).abs() - eps * ref.double().abs()
    assert err.max().item() <= FLIP_SLACK * vmax, describe_mismatch(out, ref)
    flipped = (err > ULP_SLACK * vmax).any(-1).sum().item()
    assert flipped <= FLIPPED_ROWS, f"{flipped} rows beyond float32 ulps\n" + describe_mismatch(out, ref)
    fin = torch.isfinite(ref_lse)
    shift = smoothing_shift(q, k, layout, q.shape[-1] ** -0.5 if scale is None else scale)
    lse_err = (lse[fin].double() - ref_lse[fin].double()).abs()
    bound = LSE_TOL * (1 + ref_lse[fin].double().abs() + shift[fin])
    assert (lse_err <= bound).all(), describe_mismatch(lse, ref_lse, "lse")


def assert_contract(out, q, k, v, *, layout, causal, pv):
    """SageAttention's accuracy against exact (float64) attention."""
    exact = flash_reference(*(to_bhsd(t, layout).double() for t in (q, k, v)), causal=causal)
    cos_min, l1_max = CONTRACT[pv]
    m = metrics(out, exact)
    assert m["cos_sim"] >= cos_min and m["rel_l1"] <= l1_max, m


# -- against the reference, several chunks --------------------------------------------------------

@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("pv", PV_MODES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference_in_chunks(case, pv, granularity, monkeypatch):
    q, k, v, kw = inputs(case)
    opts = dict(pv=pv, qk_granularity=granularity, smooth_k=case[3] != 17)  # a few cases unsmoothed
    calls = tiny_budget(monkeypatch, case)
    got = run(q, k, v, **kw, **opts)
    assert len(calls) > 1 and all(r0 % sage_ref.q_block_size(granularity) == 0 for r0 in calls)
    assert_matches_reference(got, reference(q, k, v, **kw, **opts), q, k, v, kw["layout"])
    assert_contract(got[0], q, k, v, pv=pv, **kw)


@pytest.mark.parametrize("pv", PV_MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[4]], ids=case_id)
def test_half_inputs_in_chunks(case, dtype, pv, monkeypatch):
    q, k, v, kw = inputs(case, dtype, seed=1)
    tiny_budget(monkeypatch, case, rows=520)  # a Q block of 2 heads and their K and V (D + Dv rows each)
    got = run(q, k, v, pv=pv, **kw)
    assert_matches_reference(got, reference(q, k, v, pv=pv, **kw), q, k, v, kw["layout"])
    assert_contract(got[0], q, k, v, pv=pv, **kw)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[4]], ids=case_id)
def test_chunk_scores_are_the_references(case, granularity, monkeypatch):
    """The base-2 scores each chunk's softmax starts from, bit for bit the reference's at the same
    (batch, head, row, key): Q scales from aligned Q blocks, K smoothed and quantized once, exact
    INT8 dots."""
    picks, scores = [], []
    real_select, real_exp = sage_ref.SageKeys.select, sage_ref.masked_row_exp

    def select(self, batches, heads_q, group):
        picks.append((batches, heads_q))
        return real_select(self, batches, heads_q, group)

    monkeypatch.setattr(sage_ref.SageKeys, "select", select)
    monkeypatch.setattr(sage_ref, "masked_row_exp",
                        lambda s, mask, **kw: scores.append(s.clone()) or real_exp(s, mask, **kw))
    q, k, v, kw = inputs(case, seed=2)
    opts = dict(qk_granularity=granularity)
    reference(q, k, v, **kw, **opts)
    (whole,) = scores
    picks.clear()
    scores.clear()
    calls = tiny_budget(monkeypatch, case)
    run(q, k, v, **kw, **opts)
    assert len(calls) == len(scores) > 1 and len(calls) % len(picks) == 0
    per_pick = len(calls) // len(picks)  # the heads of each select() run all their rows
    for i, (r0, s) in enumerate(zip(calls, scores)):
        bs, hs = picks[i // per_pick]
        assert torch.equal(s, whole[bs, hs, r0:r0 + s.shape[2], :s.shape[3]]), (bs, hs, r0)


def test_causal_chunks_stop_at_their_diagonal(monkeypatch):
    """Bottom-right causal: a chunk of rows reads no key past its last row's diagonal."""
    scores = []
    real_exp = sage_ref.masked_row_exp
    monkeypatch.setattr(sage_ref, "masked_row_exp",
                        lambda s, mask, **kw: scores.append(s.shape[-1]) or real_exp(s, mask, **kw))
    case = (1, 2, 2, 300, 200, 32, True, "bhsd")
    q, k, v, kw = inputs(case, seed=3)
    calls = tiny_budget(monkeypatch, case)
    run(q, k, v, **kw)
    assert calls == [0, 128, 256] * 2  # head by head, all rows of each
    assert scores == [28, 156, 200] * 2  # keys j <= i - 100 for rows i < 128, 256, 300


# a (batch, head) pair's K and V as its chunk holds them, (32 + 32) x 4 bytes a key: 64 rows of scores
KV_ROWS = 64


@pytest.mark.parametrize("budget_rows,calls", [(2 * 4 * (300 + KV_ROWS), 1), (2 * 4 * (256 + KV_ROWS), 2),
                                               (2 * 4 * (128 + KV_ROWS), 3), (128 + KV_ROWS, 24)])
def test_chunks_over_rows_then_heads(budget_rows, calls, monkeypatch):
    """Whole Q blocks of all heads while they fit (scores, K and V), then one Q block of fewer
    heads; the same answer whatever the chunking."""
    case = (2, 4, 2, 300, 64, 32, False, "bhsd")
    q, k, v, kw = inputs(case, seed=4)
    seen = tiny_budget(monkeypatch, case, rows=budget_rows)
    got = run(q, k, v, **kw)
    assert len(seen) == calls
    assert_matches_reference(got, reference(q, k, v, **kw), q, k, v, kw["layout"])


def test_chunk_shape():
    shape = chunked.chunk_shape
    mib = 1 << 20
    assert shape(2, 4, 300, 64, 128, budget=mib) == (2, 4, 300)               # all rows fit
    assert shape(2, 4, 3000, 100, 128, budget=mib) == (2, 4, 256)             # 327 rows: whole Q blocks
    assert shape(2, 4, 3000, 100, 32, budget=mib) == (2, 4, 320)
    assert shape(2, 4, 3000, 1024, 128, budget=mib) == (1, 2, 128)            # a Q block of 2 heads
    assert shape(4, 2, 3000, 1024, 128, budget=3 * mib) == (3, 2, 128)        # of 3 batches' heads
    assert shape(2, 4, 3000, 10 ** 5, 128, budget=mib) == (1, 1, 128)         # at least one head
    assert shape(2, 4, 100, 10 ** 5, 128, budget=mib) == (1, 1, 100)
    assert shape(2, 4, 1, 1, 128, budget=4) == (1, 1, 1)                      # one row, one head
    assert shape(2, 4, 0, 64, 128, budget=mib)[2] >= 1 and shape(2, 4, 5, 0, 128) == (2, 4, 5)
    # a pair's K and V count: 32k tokens x 12 heads, hd128 ((128 + 128) x 4 bytes a key, 256 rows'
    # worth), the default budget: one head a chunk, with the rest of the budget in Q blocks
    big = dict(budget=64 * mib, key_bytes=1024)
    assert shape(1, 12, 32760, 32760, 128, **big) == (1, 1, 256)
    assert shape(1, 12, 32760, 32760, 32, **big) == (1, 1, 256)  # not 32 rows of 12 heads and their K, V
    assert shape(1, 12, 32760, 32760, 32, budget=64 * mib) == (1, 12, 32)
    assert shape(2, 4, 300, 64, 128, budget=mib, key_bytes=256) == (2, 4, 300)
    assert shape(2, 4, 3000, 1024, 128, budget=mib, key_bytes=256) == (1, 1, 128)  # 192 rows' worth a pair


def test_keys_are_converted_once_per_chunk_of_heads(monkeypatch):
    """attend_rows gets K's INT8 values already in float32 and V already rounded (in_dot_dtype),
    converted once for each chunk of heads, which runs all its rows: never once per block of rows
    (at 32k tokens x 12 heads, per_warp, that conversion took longer than the chunk's matmuls)."""
    case = (2, 4, 2, 300, 64, 32, True, "bshd")
    q, k, v, kw = inputs(case, seed=11)
    seen = []
    real = chunked.attend_rows
    monkeypatch.setattr(chunked, "attend_rows",
                        lambda keys, *a: seen.append(keys) or real(keys, *a))  # keeps them alive
    tiny_budget(monkeypatch, case, rows=128 + KV_ROWS)  # one Q block of one head a chunk
    got = run(q, k, v, **kw)
    assert len(seen) == 2 * 4 * 3 and all(keys.k_i8.dtype == torch.float32 and keys.v_ready for keys in seen)
    distinct = [keys for i, keys in enumerate(seen) if all(keys is not other for other in seen[:i])]
    assert len(distinct) == 2 * 4  # one prepared SageKeys per (batch, head), for its 3 blocks of rows
    assert_matches_reference(got, reference(q, k, v, **kw), q, k, v, kw["layout"])


# -- one chunk: the reference itself -------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=case_id)
def test_one_chunk_is_the_reference_bit_for_bit(case, dtype):
    q, k, v, kw = inputs(case, dtype, seed=5)
    for pv in PV_MODES:
        for granularity in GRANULARITIES:
            opts = dict(pv=pv, qk_granularity=granularity, smooth_k=pv != "fp8")
            out, lse = run(q, k, v, **kw, **opts)
            ref, ref_lse = reference(q, k, v, **kw, **opts)
            assert torch.equal(out, ref) and torch.equal(lse, ref_lse), (pv, granularity)


# -- outputs, lse, layouts ------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_output_buffers_are_written_everywhere(layout, monkeypatch):
    """Every torch.empty (the output in the caller's layout, lse) starts NaN: the chunks, rows that
    see no key included, must write all of it."""
    case = (2, 4, 2, 200, 129, 32, True, layout)
    q, k, v, kw = inputs(case, seed=6)
    tiny_budget(monkeypatch, case)
    clean = run(q, k, v, **kw)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw_: poison_(real_empty(*a, **kw_)))
    poisoned = run(q, k, v, **kw)
    assert torch.equal(poisoned[0], clean[0]) and torch.equal(poisoned[1], clean[1])
    assert (poisoned[0][:, :, :71] == 0).all() and torch.isneginf(poisoned[1][:, :, :71]).all()


def test_without_lse_and_deterministic(monkeypatch):
    case = CASES[4]
    q, k, v, kw = inputs(case, seed=7)
    before = [t.clone() for t in (q, k, v)]
    tiny_budget(monkeypatch, case)
    out, lse = run(q, k, v, **kw)
    assert all(torch.equal(t, t0) for t, t0 in zip((q, k, v), before))
    alone = attnlib.sage_attention(q, k, v, backend="torch", **kw)
    assert isinstance(alone, torch.Tensor) and torch.equal(to_bhsd(alone, kw["layout"]), out)
    again = run(q, k, v, **kw)
    assert torch.equal(again[0], out) and torch.equal(again[1], lse)


def test_scale_option(monkeypatch):
    case = CASES[3]
    q, k, v, kw = inputs(case, seed=8)
    calls = tiny_budget(monkeypatch, case)
    got = run(q, k, v, scale=0.3, **kw)
    assert len(calls) > 1
    assert_matches_reference(got, reference(q, k, v, scale=0.3, **kw), q, k, v, kw["layout"], scale=0.3)


# -- dispatch -------------------------------------------------------------------------------------

def test_dispatch(monkeypatch):
    """Outranks sage-torch-reference for fp16/bf16/fp32 on the torch backend and on CPU's auto
    (no Triton interpreter); fp64 keeps the reference; the flags mirror the reference's."""
    from attnlib import dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for dtype in DTYPES:
        q, k, v = make_qkv(1, 2, 8, 16, dtype=dtype, seed=9)
        for backend in ("auto", "torch"):
            ex = attnlib.explain(q, k, v, method="sage", backend=backend)
            assert ex.chosen.name == KERNEL and "sage-torch-reference" not in ex.reasons
    q, k, v = make_qkv(1, 2, 8, 16, dtype=torch.float64, seed=9)
    ex = attnlib.explain(q, k, v, method="sage", backend="torch")
    assert ex.chosen.name == "sage-torch-reference"
    assert ex.reasons[KERNEL] == ["dtype fp64 not supported (supports fp16, bf16, fp32)"]
    ours, ref = (next(k for k in dispatch.kernels("sage") if k.name == n) for n in (KERNEL, "sage-torch-reference"))
    assert ref.priority < ours.priority < min(k.priority for k in dispatch.kernels("sage") if k.backend != "torch")
    assert (ours.supports_lse, ours.supports_backward) == (ref.supports_lse, ref.supports_backward) == (True, False)
    q, k, v = make_qkv(1, 2, 8, 16, dtype=torch.float16, seed=9, requires_grad=True)
    ex = attnlib.explain(q, k, v, method="sage", backend="torch")
    assert ex.chosen is None and ex.reasons[KERNEL] == ["inputs require grad but this kernel has no backward pass"]


# -- memory ---------------------------------------------------------------------------------------

def test_peak_memory(monkeypatch):
    """2048 tokens x 2 heads: 32 MiB of float32 scores, which the reference forms whole. With a
    1 MiB budget the kernel holds K and V in float32 and one head's quantization temporaries,
    then one chunk of scores with its fp16 copy of P and the chunk's K and V."""
    seq, heads, budget = 2048, 2, 1 << 20
    monkeypatch.setattr(flash_chunked, "SCORE_BUDGET_BYTES", budget)
    q, k, v = make_qkv(1, heads, seq, 64, dtype=torch.float16, seed=10)
    kv = 4 * (k.numel() + v.numel())  # K and V in float32
    for pv in PV_MODES:
        peak = peak_cpu_bytes(lambda: attnlib.sage_attention(q, k, v, backend="torch", causal=True, pv=pv,
                                                             return_lse=True))
        assert peak <= 2 * budget + 3 * kv, f"{pv}: peak {peak / 2**20:.1f} MiB, budget {budget / 2**20:.0f} MiB"
        assert peak < heads * seq * seq * 4 / 4
