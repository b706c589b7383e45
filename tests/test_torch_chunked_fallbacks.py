"""The memory-bounded torch fallbacks beside flash-torch-chunked: method block_sparse
(block_sparse-torch-chunked) and flash_attention_varlen's torch backend (flash-torch-chunked's
functions, sequence by sequence).

Held to the float64 references as tests/test_flash_torch_chunked.py holds flash: fp32 within about
1e-5 relative, fp16/bf16 by flash_attn's rule (error at most 2x, gradients 3x, PyTorch's own error
in that dtype). Covers odd lengths and block sizes, causal with seq_q != seq_k both ways, GQA/MQA,
both layouts, per-batch / per-head / broadcast block masks, rows with nothing allowed, empty
sequences, lse and its gradient, several chunks per call, determinism, dispatch, and peak memory:
a forward + backward stays far below the (Sq, Sk) score matrix the references form.
"""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.kernels import block_sparse_gather as gather
from attnlib.kernels import flash_torch_chunked as chunked
from attnlib.reference import block_sparse_reference
from attnlib.reference._common import block_mask_to_tokens, causal_mask
from attnlib.reference.flash_varlen import flash_varlen_reference, per_sequence
from attnlib.testing import assert_flash_rule, make_qkv

from test_flash_torch_chunked import (assert_backward_is_its_own, assert_fp32_close, dtype_id, finite_part, loss_grads,
                                     peak_cpu_bytes, to_bhsd, torch_same_dtype)

KERNEL = "block_sparse-torch-chunked"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def masked_same_dtype(q, k, v, visible, scale):
    """Plain PyTorch in the inputs' own dtype with a bool visible mask (..., Sq, Sk): (out, lse);
    rows that see nothing give 0 and -inf (masked with the dtype's min, so gradients stay finite)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~visible, torch.finfo(q.dtype).min)
    has = visible.any(-1, keepdim=True)
    out = torch.where(has, scores.softmax(-1) @ v, torch.zeros((), dtype=q.dtype))
    lse = torch.where(has[..., 0], torch.logsumexp(scores, -1).float(), float("-inf"))
    return out, lse


def compare(got, want, have, dtype, names=("out", "lse", "dq", "dk", "dv")) -> None:
    """got (ours), want (float64 reference), have (same-dtype PyTorch; unused for fp32): tuples
    (out, lse, dq, dk, dv) in one layout. lse is -inf on the reference's rows only."""
    assert not torch.isnan(got[1]).any() and torch.isfinite(got[0]).all()
    assert torch.equal(torch.isinf(got[1]), torch.isinf(want[1])), "lse is -inf on other rows than the reference"
    for i, (name, g, w) in enumerate(zip(names, got, want)):
        if i >= 2:
            assert torch.isfinite(g).all(), f"{name} has non-finite values"
        if dtype == torch.float32:
            assert_fp32_close(g, w, name)
        elif i == 1:
            assert_flash_rule(g, w, have[i], atol=1e-4 if dtype == torch.float16 else 2e-3, name=name)
        else:
            assert_flash_rule(g, w, have[i], factor=2.0 if i == 0 else 3.0, name=name)


# -- block_sparse ------------------------------------------------------------------------------

@pytest.fixture(params=["masked", "gathered"])
def form(request, monkeypatch):
    """Each of block_sparse-torch-chunked's two forms (block_sparse_gather.py): the masked one
    (dense chunks of query rows, scores masked) and the gathered one (listed blocks only), forced
    by the density threshold."""
    monkeypatch.setattr(gather, "GATHER_MAX_DENSITY", 0.0 if request.param == "masked" else 1.0)
    return request.param


def random_mask(mb, mh, sq, sk, block_size, density, seed):
    gen = torch.Generator().manual_seed(seed)
    bq, bk = block_size
    return torch.rand(mb, mh, -(-sq // bq), -(-sk // bk), generator=gen) < density


def check_block_sparse(q, k, v, mask, *, block_size, causal, layout, with_dlse=False, backend="torch"):
    """attnlib's block_sparse (which must pick block_sparse-torch-chunked) against the float64
    reference: out, lse, dq, dk, dv."""
    scale = q.shape[-1] ** -0.5
    kw = dict(block_size=block_size, causal=causal, layout=layout)
    assert attnlib.explain(q, k, v, method="block_sparse", block_mask=mask, backend=backend,
                           **kw).chosen.name == KERNEL
    out, lse = attnlib.block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend, **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and out.is_contiguous()
    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (qb, kb, vb)]
    ref, ref_lse = block_sparse_reference(*leaves, mask, block_size=block_size, causal=causal, scale=scale,
                                          return_lse=True)
    gen = torch.Generator().manual_seed(q.numel() + k.shape[2])
    dout = torch.randn(out.shape, generator=gen).to(q.dtype)
    dlse = torch.randn(lse.shape, generator=gen) if with_dlse else None
    got = loss_grads(out, lse, (q, k, v), dout, dlse)
    want = loss_grads(ref, ref_lse, leaves, to_bhsd(dout, layout).double(), None if dlse is None else dlse.double())
    have = (None,) * 5
    if q.dtype != torch.float32:
        visible = block_mask_to_tokens(mask, block_size, qb.shape[2], kb.shape[2])
        if causal:
            visible = visible & causal_mask(qb.shape[2], kb.shape[2], q.device)
        same = [t.detach().clone().requires_grad_() for t in (qb, kb, vb)]
        base, base_lse = masked_same_dtype(*same, visible, scale)
        have = (base, base_lse, *loss_grads(base, base_lse, same, to_bhsd(dout, layout), dlse))
    compare((to_bhsd(out, layout), lse, *(to_bhsd(g, layout) for g in got)), (ref, ref_lse, *want), have, q.dtype)
    return out, lse


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, layout, block_size, density, mask_bh)
# mask_bh: which of (batch, heads) the mask carries; 1 = broadcast
BS_CASES = [
    (1, 2, 2, 1, 1, 16, False, "bhsd", (16, 16), 1.0, (1, 1)),
    (1, 2, 2, 77, 77, 32, True, "bshd", (32, 16), 0.5, (1, 2)),     # ragged tails, per-head mask
    (2, 4, 1, 50, 83, 40, True, "bhsd", (16, 32), 0.5, (2, 4)),     # MQA, seq_q < seq_k
    (1, 4, 2, 70, 33, 24, True, "bshd", (16, 16), 0.5, (1, 4)),     # seq_q > seq_k: rows see no key
    (2, 4, 2, 96, 96, 32, False, "bhsd", (16, 16), 0.1, (2, 1)),    # GQA, sparse, per-batch mask
    (1, 8, 2, 45, 130, 20, False, "bshd", (24, 40), 0.4, (1, 8)),   # GQA per-query-head, odd blocks
    (2, 2, 2, 61, 29, 12, True, "bhsd", (7, 5), 0.6, (1, 1)),       # tiny odd blocks, broadcast mask
]


def bs_id(c):
    return "b{}h{}kv{}q{}k{}d{}{}-{}-bs{}x{}-p{}-m{}x{}".format(
        *c[:6], "-causal" if c[6] else "", c[7], *c[8], c[9], *c[10])


def bs_inputs(case, dtype, seed_extra=0):
    b, hq, hkv, sq, sk, d, causal, layout, bs, density, (mb, mh) = case
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, dtype=dtype, layout=layout, requires_grad=True,
                       seed=sq * 1000 + sk + seed_extra)
    mask = random_mask(mb, mh, sq, sk, bs, density, seed=sq + sk + seed_extra)
    if mask.numel() > 1:
        mask[0, 0, mask.shape[2] // 2] = False  # a query block with nothing allowed
    return q, k, v, mask, dict(block_size=bs, causal=causal, layout=layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", BS_CASES, ids=bs_id)
def test_block_sparse_matches_reference(case, dtype, form):
    q, k, v, mask, kw = bs_inputs(case, dtype)
    _, lse = check_block_sparse(q, k, v, mask, **kw)
    if mask.numel() > 1:
        assert torch.isinf(lse).any()  # the emptied block's rows: 0 and -inf, gradients finite


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", [BS_CASES[2], BS_CASES[3], BS_CASES[5]], ids=bs_id)
def test_block_sparse_lse_gradient(case, dtype, form):
    q, k, v, mask, kw = bs_inputs(case, dtype, seed_extra=7)
    check_block_sparse(q, k, v, mask, with_dlse=True, **kw)


def count_chunks(monkeypatch, budget_rows, batch, heads, seq_k):
    """Sets a score budget of budget_rows query rows; returns the list the chunks' first rows go to."""
    monkeypatch.setattr(chunked, "SCORE_BUDGET_BYTES", budget_rows * batch * heads * seq_k * 4)
    assert chunked.rows_per_chunk(batch, heads, 10 ** 6, seq_k) == budget_rows
    calls = []
    real = chunked._scores
    monkeypatch.setattr(chunked, "_scores", lambda *a: calls.append(a[3]) or real(*a))
    return calls


@pytest.mark.parametrize("budget_rows", [1, 5, 16])
@pytest.mark.parametrize("case", [BS_CASES[1], BS_CASES[3], BS_CASES[5], BS_CASES[6]], ids=bs_id)
def test_block_sparse_several_chunks(case, budget_rows, monkeypatch):
    """Chunk boundaries inside mask blocks, the causal diagonal and the rows that see no key (the
    masked form: the gathered one chunks by block rows, test_gathered_several_chunks)."""
    monkeypatch.setattr(gather, "GATHER_MAX_DENSITY", 0.0)
    q, k, v, mask, kw = bs_inputs(case, torch.float32, seed_extra=budget_rows)
    calls = count_chunks(monkeypatch, budget_rows, case[0], case[1], case[4])
    check_block_sparse(q, k, v, mask, with_dlse=True, **kw)
    assert len(set(calls)) > 1 and max(calls) > 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 0, 5), (1, 2, 5, 0), (0, 2, 5, 5)], ids=lambda s: "b{}h{}q{}k{}".format(*s))
def test_block_sparse_empty(shape, causal, form):
    b, h, sq, sk = shape
    q, k, v = make_qkv(max(b, 1), h, sq, 16, seq_k=sk, seed=3)
    q, k, v = (t[:b].clone().requires_grad_() for t in (q, k, v))
    mask = torch.ones(1, 1, -(-sq // 4), -(-sk // 4), dtype=torch.bool)
    kw = dict(block_size=(4, 4), causal=causal, backend="torch")
    assert attnlib.explain(q, k, v, method="block_sparse", block_mask=mask, **kw).chosen.name == KERNEL
    out, lse = attnlib.block_sparse_attention(q, k, v, mask, return_lse=True, **kw)
    assert out.shape == (b, h, sq, 16) and lse.shape == (b, h, sq)
    assert (out == 0).all() and (lse == float("-inf")).all() if sk == 0 else True
    (out.sum() + finite_part(lse).sum()).backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


@pytest.mark.parametrize("budget_rows", [1, 3])
@pytest.mark.parametrize("case", [BS_CASES[1], BS_CASES[3], BS_CASES[5], BS_CASES[6]], ids=bs_id)
def test_gathered_several_chunks(case, budget_rows, monkeypatch):
    """The gathered form over several chunks of block rows (budget_rows block rows each at the
    longest list), rows in order of their list length across batch and heads: still the
    reference's out, lse and gradients."""
    monkeypatch.setattr(gather, "GATHER_MAX_DENSITY", 1.0)
    b, hq, _, _, _, d, _, _, (bq, bk), _, _ = case
    q, k, v, mask, kw = bs_inputs(case, torch.float32, seed_extra=budget_rows)
    chunks = []
    real = gather._Rows.index
    monkeypatch.setattr(gather._Rows, "index", lambda self, longest: chunks.append(self.rid.numel())
                        or real(self, longest))
    inp = attnlib.api.build_inputs(q, k, v, method="block_sparse", block_mask=mask, **kw)
    longest = int(gather.gathered_blocks(inp, mask, (bq, bk)).sum(-1).max())  # causal drops some blocks
    monkeypatch.setattr(chunked, "SCORE_BUDGET_BYTES", budget_rows * longest * bk * (bq + 2 * d) * 4)
    check_block_sparse(q, k, v, mask, with_dlse=True, **kw)
    assert len(chunks) > 2 and max(chunks) <= budget_rows


def test_gathered_work_follows_the_listed_blocks(monkeypatch):
    """At density ~0.1 with rows listing 0 to 8 key blocks, the gathered form computes scores for
    the listed blocks plus the padding of each chunk to its longest list, not for every block:
    rows sorted by list length keep that padding small. And it is the form a sparse CPU call takes
    (block_sparse_gather.gathered_blocks), also for sla's critical blocks."""
    q, k, v = make_qkv(1, 4, 512, 16, seed=9)
    gen = torch.Generator().manual_seed(9)
    counts = torch.randint(0, 9, (1, 4, 32, 1), generator=gen)
    mask = torch.arange(32)[None, None, None, :] < counts  # rows list 0..8 of 32 key blocks
    mask = torch.gather(mask, -1, torch.rand(1, 4, 32, 32, generator=gen).argsort(-1))  # scattered
    computed = []
    real = gather._Rows.scores
    monkeypatch.setattr(gather._Rows, "scores", lambda self, qc, kc: computed.append(kc.shape[0] * kc.shape[1])
                        or real(self, qc, kc))
    monkeypatch.setattr(chunked, "SCORE_BUDGET_BYTES", 16 * 8 * 16 * (16 + 32) * 4)  # 16 block rows a chunk
    out = attnlib.block_sparse_attention(q, k, v, mask, block_size=(16, 16), backend="torch")
    listed_keys = int(mask.sum()) * 16
    assert computed and listed_keys <= sum(computed) <= 1.35 * listed_keys, (sum(computed), listed_keys)
    want = block_sparse_reference(q.double(), k.double(), v.double(), mask, block_size=(16, 16))
    assert_fp32_close(out, want, "out")
    n = len(computed)
    attnlib.sla_attention(q, k, v, block_size=(16, 16), critical=0.1, negligible=0.5, backend="torch")
    assert len(computed) > n  # sla's critical part went through the gathered form


def test_block_sparse_nothing_allowed(form):
    """An all-False mask: every row 0 and -inf, zero gradients, no NaN."""
    q, k, v = make_qkv(2, 4, 33, 16, kv_heads=2, seq_k=40, requires_grad=True, seed=4)
    mask = torch.zeros(2, 4, 3, 3, dtype=torch.bool)
    out, lse = attnlib.block_sparse_attention(q, k, v, mask, block_size=(16, 16), return_lse=True, backend="torch")
    assert (out == 0).all() and (lse == float("-inf")).all()
    (out.sum() + finite_part(lse).sum()).backward()
    assert all((t.grad == 0).all() for t in (q, k, v))


def test_block_sparse_deterministic(form):
    q, k, v, mask, kw = bs_inputs(BS_CASES[5], torch.float32)
    runs = []
    for _ in range(2):
        out, lse = attnlib.block_sparse_attention(q, k, v, mask, return_lse=True, backend="torch", **kw)
        runs.append((out, lse, *torch.autograd.grad((out * out).sum() + finite_part(lse).sum(), (q, k, v))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_block_sparse_dispatch(monkeypatch):
    """Outranks the reference on the torch backend for fp16/bf16/fp32; fp64 keeps the reference;
    auto picks it on CPU without the Triton interpreter, and for block sizes Triton refuses."""
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    for dtype in DTYPES:
        q, k, v = make_qkv(1, 2, 8, 16, dtype=dtype, seed=1)
        ex = attnlib.explain(q, k, v, method="block_sparse", block_mask=mask, block_size=(16, 16), backend="torch")
        assert ex.chosen.name == KERNEL and "block_sparse-torch-reference" not in ex.reasons
    q, k, v = make_qkv(1, 2, 8, 16, dtype=torch.float64, seed=1)
    ex = attnlib.explain(q, k, v, method="block_sparse", block_mask=mask, block_size=(16, 16), backend="torch")
    assert ex.chosen.name == "block_sparse-torch-reference"
    assert ex.reasons[KERNEL] == ["dtype fp64 not supported (supports fp16, bf16, fp32)"]
    q, k, v = make_qkv(1, 2, 40, 16, seed=1)
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attnlib.explain(q, k, v, method="block_sparse", block_mask=mask, block_size=(24, 24)).chosen.name == KERNEL
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    assert attnlib.explain(q, k, v, method="block_sparse", block_mask=mask, block_size=(16, 16)).chosen.name == KERNEL


def test_block_sparse_backward_is_its_own(monkeypatch):
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    assert_backward_is_its_own(monkeypatch, lambda q, k, v: attnlib.block_sparse_attention(
        q, k, v, mask, block_size=(16, 16), backend="torch"))


def test_block_sparse_never_forms_the_token_mask(monkeypatch):
    """No (Sq, Sk) token mask: the reference's expansion is never called, and each chunk's mask
    covers only its own rows."""
    import attnlib.reference.block_sparse as ref_module
    from attnlib.kernels import block_sparse_gather as gather

    monkeypatch.setattr(ref_module, "block_mask_to_tokens", lambda *a, **kw: pytest.fail("token mask formed"))

    shapes = []
    real = gather.blocked_rows_from

    def spy(inp, block_mask, block_size):
        f = real(inp, block_mask, block_size)
        return lambda r0, r1, kend: shapes.append(tuple(f(r0, r1, kend).shape)) or f(r0, r1, kend)

    monkeypatch.setattr(gather, "blocked_rows_from", spy)
    monkeypatch.setattr(gather, "GATHER_MAX_DENSITY", 0.0)  # the masked form (the gathered: its own test)
    monkeypatch.setattr(chunked, "SCORE_BUDGET_BYTES", 8 * 2 * 4 * 100 * 4)  # 8 rows
    q, k, v = make_qkv(2, 4, 50, 16, seq_k=100, requires_grad=True, seed=5)
    mask = random_mask(1, 4, 50, 100, (16, 16), 0.5, seed=5)
    out = attnlib.block_sparse_attention(q, k, v, mask, block_size=(16, 16), backend="torch")
    out.sum().backward()
    assert shapes and all(s[:2] == (1, 4) and s[2] <= 8 for s in shapes)


# -- flash_attention_varlen --------------------------------------------------------------------

def cu_seqlens(lengths):
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)


def packed(lengths_q, lengths_k, heads_q, heads_kv, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(n, h):
        return torch.randn(n, h, head_dim, generator=gen).to(dtype).requires_grad_()

    return rnd(sum(lengths_q), heads_q), rnd(sum(lengths_k), heads_kv), rnd(sum(lengths_k), heads_kv)


def same_dtype_varlen(q, k, v, cq, ck, causal, scale):
    """PyTorch in the inputs' dtype, sequence by sequence: (out, lse (H, total_q))."""
    return per_sequence(lambda *qkv: torch_same_dtype(*qkv, causal=causal, scale=scale), q, k, v, cq, ck)


def check_varlen(lq, lk, hq, hkv, d, dtype, causal, *, seed=0, with_dlse=False):
    q, k, v = packed(lq, lk, hq, hkv, d, dtype, seed=seed)
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    scale = d ** -0.5
    out, lse = attnlib.flash_attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=causal, return_lse=True,
                                              backend="torch")
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (hq, sum(lq))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = flash_varlen_reference(*leaves, cq, ck, causal=causal, scale=scale, return_lse=True)
    gen = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    dlse = torch.randn(lse.shape, generator=gen) if with_dlse else None
    got = loss_grads(out, lse, (q, k, v), dout, dlse)
    want = loss_grads(ref, ref_lse, leaves, dout.double(), None if dlse is None else dlse.double())
    have = (None,) * 5
    if dtype != torch.float32:
        same = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        base, base_lse = same_dtype_varlen(*same, cq, ck, causal, scale)
        have = (base, base_lse, *loss_grads(base, base_lse, same, dout, dlse))
    compare((out, lse, *got), (ref, ref_lse, *want), have, dtype)
    return out, lse, got


# (lengths_q, lengths_k, heads_q, heads_kv, head_dim)
VARLEN_CASES = [
    ([5, 0, 1, 17, 33], [7, 3, 0, 17, 20], 4, 2, 40),   # empty sequences both ways, GQA
    ([1, 40, 0], [1, 23, 9], 2, 2, 64),                 # seq_q > seq_k: causal rows see no key
    ([16, 13], [16, 48], 4, 1, 24),                     # MQA, seq_q < seq_k
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=["ragged-gqa", "with-empty", "mqa"])
def test_varlen_matches_reference(case, dtype, causal):
    check_varlen(*case, dtype, causal, seed=sum(case[0]), with_dlse=causal)


@pytest.mark.parametrize("budget_rows", [1, 7])
def test_varlen_several_chunks(budget_rows, monkeypatch):
    lq, lk, hq, hkv, d = VARLEN_CASES[0]
    # a budget of budget_rows rows of the longest key sequence: more rows for shorter ones
    calls = count_chunks(monkeypatch, budget_rows, 1, hq, max(lk))
    check_varlen(lq, lk, hq, hkv, d, torch.float32, True, seed=budget_rows, with_dlse=True)
    assert len(set(calls)) > 1 and max(calls) > 0


def test_varlen_runs_chunked_and_fp64_the_reference(monkeypatch):
    import attnlib.reference.flash_varlen as rv

    lq, lk, hq, hkv, d = VARLEN_CASES[0]
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    real = rv.flash_varlen_reference
    seen = []
    monkeypatch.setattr(rv, "flash_varlen_reference", lambda *a, **kw: seen.append(a[0].dtype) or real(*a, **kw))
    for dtype in (torch.float32, torch.float64):
        q, k, v = packed(lq, lk, hq, hkv, d, dtype, seed=2)
        out = attnlib.flash_attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=True, backend="torch")
        out.sum().backward()
    assert seen and set(seen) == {torch.float64}  # forward and backward of the fp64 call only


def test_varlen_deterministic():
    lq, lk, hq, hkv, d = VARLEN_CASES[0]
    q, k, v = packed(lq, lk, hq, hkv, d, torch.float32, seed=9)
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    runs = []
    for _ in range(2):
        out, lse = attnlib.flash_attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=True,
                                                  return_lse=True, backend="torch")
        runs.append((out, lse, *torch.autograd.grad((out * out).sum() + finite_part(lse).sum(), (q, k, v))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# -- memory ------------------------------------------------------------------------------------

SEQ, BUDGET_MIB = 4096, 4  # H2: 128 MiB of fp32 scores; the references peak above twice that


def assert_bounded(peak: int, seq: int, heads: int, io: int) -> None:
    budget = chunked.SCORE_BUDGET_BYTES
    scores = heads * seq * seq * 4
    # two chunks of scores (the backward's P and dS), their chunk's bool masks, inputs and outputs
    assert peak <= 2.5 * budget + io, f"peak {peak / 2**20:.1f} MiB, budget {budget / 2**20:.0f} MiB"
    assert peak < scores / 3, f"peak {peak / 2**20:.1f} MiB against {scores / 2**20:.0f} MiB of scores"


def test_block_sparse_peak_memory(monkeypatch):
    monkeypatch.setattr(chunked, "SCORE_BUDGET_BYTES", BUDGET_MIB << 20)
    q, k, v = make_qkv(1, 2, SEQ, 32, requires_grad=True, seed=6)
    mask = random_mask(1, 2, SEQ, SEQ, (64, 64), 0.5, seed=6)

    def step():
        out = attnlib.block_sparse_attention(q, k, v, mask, block_size=(64, 64), causal=True, backend="torch")
        out.backward(torch.ones_like(out))

    assert_bounded(peak_cpu_bytes(step), SEQ, 2, 16 * q.numel() * 4)
    assert torch.isfinite(q.grad).all()


def test_varlen_peak_memory(monkeypatch):
    """One long sequence (the per-sequence reference forms its whole (s, s) scores) and a short one."""
    monkeypatch.setattr(chunked, "SCORE_BUDGET_BYTES", BUDGET_MIB << 20)
    lens = [SEQ, 100]
    q, k, v = packed(lens, lens, 2, 2, 32, torch.float32, seed=6)
    cq = cu_seqlens(lens)

    def step():
        out = attnlib.flash_attention_varlen(q, k, v, cq, cq, SEQ, SEQ, causal=True, backend="torch")
        out.backward(torch.ones_like(out))

    assert_bounded(peak_cpu_bytes(step), SEQ, 2, 16 * q.numel() * 4)
    assert torch.isfinite(q.grad).all()
