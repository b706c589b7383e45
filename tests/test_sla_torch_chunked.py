"""sla-torch-chunked, the memory-bounded torch kernel of method sla: forward and every gradient
(dq, dk, dv, dW, db) against the float64 reference, dispatch, and peak memory.

Accuracy: flash_attn's rule, error against float64 at most 2x that of the reference itself given
inputs (and W, b) of the same dtype, plus ATOL[dtype] (dW, db: attnlib.testing.SLA_PROJ_ATOL, sums over every row).
That reference computes in float32 and rounds once, so this is tighter than the rule
tests/test_sla_triton.py states against the formula evaluated in fp16/bf16. A score budget of a
few rows (autouse fixture) runs several chunks of the critical part and of the linear branch at
these small shapes: odd lengths, GQA and MQA, causal with seq_q != seq_k both ways, blocks
(64, 64) and (128, 64), each feature map, value head_dim != head_dim, both layouts through
attnlib.sla_attention and attnlib.SparseLinearAttention.
"""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.inputs import to_bhsd
from attnlib.kernels import block_sparse_gather as gather
from attnlib.kernels import flash_torch_chunked as chunked
from attnlib.kernels import sla_torch_chunked as sla_chunked
from attnlib.reference import sla_reference
from attnlib.testing import assert_sla_rule, make_qkv, sla_float64_reference

from test_flash_torch_chunked import peak_cpu_bytes

KERNEL = "sla-torch-chunked"
SMALL_BUDGET = 48 << 10  # about ten query rows of scores and one query block's states per chunk


@pytest.fixture(autouse=True)
def small_budget(monkeypatch):
    monkeypatch.setattr(chunked, "SCORE_BUDGET_BYTES", SMALL_BUDGET)


def make_proj(dv, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(dv, dv, generator=gen) * dv ** -0.5).to(dtype).requires_grad_()
    b = (torch.randn(dv, generator=gen) * 0.1).to(dtype).requires_grad_()
    return w, b


def check(q, k, v, w, b, *, layout="bhsd", causal=False, critical=0.3, negligible=0.2, block_size=(64, 64),
          feature_map="softmax", module=False):
    """attnlib's sla on the torch backend (which must pick sla-torch-chunked) against the float64
    reference: out, dq, dk, dv, and dW, db where given. module: through SparseLinearAttention
    (w and b become its projection's parameters)."""
    kw = dict(critical=critical, negligible=negligible, block_size=block_size, feature_map=feature_map)
    ex = attnlib.explain(q, k, v, method="sla", layout=layout, causal=causal, proj_weight=w, proj_bias=b,
                         backend="torch", **kw)
    assert ex.chosen is not None and ex.chosen.name == KERNEL, str(ex)
    if module:
        m = attnlib.SparseLinearAttention(q.shape[-1], **kw)
        with torch.no_grad():
            m.proj.weight.copy_(w)
            m.proj.bias.copy_(b)
        m = m.to(w.dtype)
        w, b = m.proj.weight, m.proj.bias
        out = m(q, k, v, causal=causal, layout=layout, backend="torch")
    else:
        out = attnlib.sla_attention(q, k, v, w, b, causal=causal, layout=layout, backend="torch", **kw)
    assert out.dtype == q.dtype and out.shape == q.shape[:3] + (v.shape[-1],) and out.is_contiguous()
    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    classes, leaves, proj64, ref = sla_float64_reference(qb, kb, vb, w, b, causal=causal, **kw)
    assert (classes == 1).any() and (classes == 0).any()
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(q.shape[2])).to(q.dtype)
    assert_sla_rule(out, q, k, v, w, b, layout=layout, ref=ref, leaves=leaves, proj64=proj64,
                    baseline=lambda *t: sla_reference(*t, causal=causal, **kw), dout=dout, check_dtypes=True)


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, head_dim_v, causal, layout, block_size, critical,
#  negligible, feature_map)
CASES = [
    (1, 4, 2, 200, 300, 32, 32, False, "bhsd", (64, 64), 0.3, 0.2, "softmax"),   # GQA 2:1, ragged tails
    (2, 4, 1, 300, 200, 32, 32, True, "bshd", (128, 64), 0.25, 0.25, "elu"),     # MQA, Sq > Sk: rows see nothing
    (1, 2, 2, 201, 290, 24, 24, True, "bhsd", (64, 64), 0.3, 0.3, "relu"),       # Sq < Sk, head_dim 24
    (1, 4, 2, 250, 250, 16, 16, False, "bshd", (128, 64), 0.2, 0.3, "identity"), # positive q, k
    (1, 2, 1, 190, 260, 32, 40, True, "bshd", (64, 64), 0.2, 0.2, "softmax"),    # value head_dim 40
]


def case_id(c):
    return "b{}h{}kv{}q{}k{}d{}v{}{}-{}-bs{}x{}-c{}-n{}-{}".format(*c[:7], "-causal" if c[7] else "", c[8],
                                                                   *c[9], *c[10:])


def case_inputs(case, dtype, seed_extra=0):
    b, hq, hkv, sq, sk, d, dv, causal, layout, bs, crit, neg, fm = case
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, head_dim_v=dv, layout=layout, dtype=dtype,
                       seed=sq * 1000 + sk + seed_extra)
    if fm == "identity":  # phi(q) . phi(k) > 0: a denominator near 0 would make any error unbounded
        q, k = q.abs(), k.abs()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    w, bias = make_proj(dv, dtype, seed=sq + seed_extra)
    kw = dict(layout=layout, causal=causal, critical=crit, negligible=neg, block_size=bs, feature_map=fm)
    return q, k, v, w, bias, kw


DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(params=["masked", "gathered"])
def form(request, monkeypatch):
    """The critical part's two forms (block_sparse_gather.py: dense chunks masked, or the listed
    blocks gathered), forced by the density threshold. The backward's out=None (delta from P and
    dP) and into= (adding to the linear branch's gradients) modes exist in both for sla only."""
    monkeypatch.setattr(gather, "GATHER_MAX_DENSITY", 0.0 if request.param == "masked" else 1.0)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, dtype, form):
    q, k, v, w, b, kw = case_inputs(case, dtype)
    check(q, k, v, w, b, **kw)


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=case_id)
def test_bf16(case):
    q, k, v, w, b, kw = case_inputs(case, torch.bfloat16)
    check(q, k, v, w, b, **kw)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_module_fp16_activations_fp32_parameters(layout):
    """SparseLinearAttention with fp32 parameters and fp16 activations (mixed precision): the
    output stays fp16, dW and db come in fp32."""
    q, k, v, _, _, kw = case_inputs(CASES[2], torch.float16)
    w, b = make_proj(24, torch.float32, seed=3)
    if layout == "bshd":
        q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    check(q, k, v, w, b, **dict(kw, layout=layout), module=True)


@pytest.mark.parametrize("proj", ["both", "bias", "weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_gradients_under_a_large_projection(dtype, proj):
    """dq and dk as accurate when b and O_l W^T outweigh O_s (|b|, |O_l W^T| ~ 100, |O_s| ~ 1):
    the critical part's delta = rowsum(dO * O_s) cannot come from the saved output less b and
    O_l W^T, which rounding to fp16/bf16 has already taken O_s's low digits from (that gave dq
    100x the reference's error in fp16, 150x in bf16)."""
    q, k, v, w, b, kw = case_inputs(CASES[1], dtype, seed_extra=2)
    with torch.no_grad():
        w.mul_(100)
        b.mul_(1000)
    w, b = {"both": (w, b), "bias": (None, b), "weight": (w, None)}[proj]
    check(q, k, v, w, b, **kw)


@pytest.mark.parametrize("proj", ["bias", "none", "weight"])
def test_partial_projection(proj, monkeypatch):
    """W or b None: without W no linear branch is formed (the output is O_sparse [+ b])."""
    q, k, v, w, b, kw = case_inputs(CASES[1], torch.float32, seed_extra=1)
    w, b = {"bias": (None, b), "none": (None, None), "weight": (w, None)}[proj]
    if w is None:
        monkeypatch.setattr(sla_chunked, "LinearBranch", lambda *a, **kw_: pytest.fail("linear branch formed"))
    check(q, k, v, w, b, **kw)


def test_runs_several_chunks(monkeypatch, form):
    """The small budget splits the critical part into chunks of a few rows (or block rows) and the
    linear branch into chunks of one query block, forward and backward."""
    rows, blocks = [], []
    real_scores, real_states = chunked._scores, sla_chunked.LinearBranch.row_states
    real_index = gather._Rows.index
    monkeypatch.setattr(chunked, "_scores", lambda *a: rows.append(a[3]) or real_scores(*a))
    monkeypatch.setattr(gather._Rows, "index", lambda self, longest: rows.append(int(self.rid[0]))
                        or real_index(self, longest))
    monkeypatch.setattr(sla_chunked.LinearBranch, "row_states",
                        lambda self, i0, i1: blocks.append((i0, i1)) or real_states(self, i0, i1))
    q, k, v, w, b, kw = case_inputs(CASES[0], torch.float32)
    out = attnlib.sla_attention(q, k, v, w, b, backend="torch", **kw)
    out.backward(torch.randn_like(out))
    assert len(set(rows)) > 4 and max(rows) > 0
    assert len(set(blocks)) == 4 and len(blocks) == 8  # Mq = 4, one block a chunk, forward and backward
    assert all(i1 - i0 == 1 for i0, i1 in blocks)


def test_deterministic_and_leaves_its_inputs_alone():
    """fp32, where the kernel's float32 views of q, k, v and dout are the caller's tensors."""
    q, k, v, w, b, kw = case_inputs(CASES[1], torch.float32)
    before = [t.detach().clone() for t in (q, k, v, w, b)]
    runs = []
    for _ in range(2):
        out = attnlib.sla_attention(q, k, v, w, b, backend="torch", **kw)
        dout = out.detach() * 2
        runs.append((out, *torch.autograd.grad(out, (q, k, v, w, b), dout)))
        assert torch.equal(dout, out.detach() * 2)
    assert all(torch.equal(x, y) for x, y in zip(*runs))
    assert all(torch.equal(t, t0) for t, t0 in zip((q, k, v, w, b), before))


def test_backward_is_its_own_and_never_runs_the_reference(monkeypatch):
    """Forward and backward run this kernel's own code: not the reference (through the
    ReferenceKernel or otherwise), not the base class's recompute under vjp."""
    import attnlib.reference as ref_pkg
    import attnlib.reference.sla as ref_sla
    from attnlib.dispatch import Kernel

    fail = lambda *a, **kw: pytest.fail("sla_reference ran")  # noqa: E731
    monkeypatch.setattr(ref_sla, "sla_reference", fail)
    monkeypatch.setattr(ref_pkg, "sla_reference", fail)
    monkeypatch.setattr(Kernel, "backward", lambda *a, **kw: pytest.fail("Kernel.backward (vjp) ran"))
    ran = []
    real = chunked.chunked_backward

    def spy(inp, out, *a, **kw):
        if out is not None:
            pytest.fail("delta from the saved output")
        ran.append(1)
        return real(inp, out, *a, **kw)

    monkeypatch.setattr(chunked, "chunked_backward", spy)
    q, k, v, w, b, kw = case_inputs(CASES[2], torch.float16)
    out = attnlib.sla_attention(q, k, v, w, b, backend="torch", **kw)
    torch.autograd.grad(out.float().sum(), (q, k, v, w, b))
    assert ran == [1]


def test_dispatch(monkeypatch):
    """Outranks the reference on CPU for fp16/bf16/fp32, whether the torch backend is named or
    auto picks; fp64 keeps the reference; under the Triton interpreter sla-triton still wins
    where it applies, and this kernel takes the block sizes it refuses."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = make_qkv(1, 2, 40, 16, dtype=dtype, seed=1)
        for backend in ("auto", "torch"):
            ex = attnlib.explain(q, k, v, method="sla", backend=backend)
            assert ex.chosen.name == KERNEL and "sla-torch-reference" not in ex.reasons, str(ex)
    q, k, v = make_qkv(1, 2, 40, 16, dtype=torch.float64, seed=1)
    ex = attnlib.explain(q, k, v, method="sla", backend="torch")
    assert ex.chosen.name == "sla-torch-reference"
    assert ex.reasons[KERNEL] == ["dtype fp64 not supported (supports fp16, bf16, fp32)"]
    kernel = next(k_ for k_ in attnlib.dispatch.kernels("sla") if k_.name == KERNEL)
    triton = next(k_ for k_ in attnlib.dispatch.kernels("sla") if k_.name == "sla-triton")
    assert kernel.options == triton.options and kernel.keeps_lse_for_backward and not kernel.supports_lse
    q, k, v = make_qkv(1, 2, 40, 32, seed=1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attnlib.explain(q, k, v, method="sla", block_size=(24, 24)).chosen.name == KERNEL
    if not triton.unavailable_reasons():
        assert attnlib.explain(q, k, v, method="sla", block_size=(16, 16)).chosen.name == "sla-triton"


def test_no_keys_gives_the_bias_and_zero_gradients():
    q, k, v = make_qkv(1, 4, 70, 16, kv_heads=2, seq_k=0, requires_grad=True, seed=2)
    w, b = make_proj(16, seed=2)
    out = attnlib.sla_attention(q, k, v, w, b, block_size=(64, 64), causal=True, backend="torch")
    assert torch.equal(out, b.detach().expand_as(out))
    dq, dw, db = torch.autograd.grad((out * out).sum(), (q, w, b))
    assert (dq == 0).all() and (dw == 0).all() and torch.allclose(db, 2 * out.detach().sum((0, 1, 2)))


SEQ = 4096  # H2: 128 MiB of fp32 scores, which the reference forms and keeps for backward


def test_peak_memory_stays_far_below_the_score_matrix(monkeypatch):
    """A forward + backward with W and b, causal, at a 4 MiB budget peaks at about two chunks of
    scores plus the inputs, outputs, gradients and the states; never near the (Sq, Sk) scores."""
    budget = 4 << 20
    monkeypatch.setattr(chunked, "SCORE_BUDGET_BYTES", budget)
    q, k, v = make_qkv(1, 2, SEQ, 32, requires_grad=True, seed=6)
    w, b = make_proj(32, seed=6)

    def step():
        out = attnlib.sla_attention(q, k, v, w, b, critical=0.1, negligible=0.2, block_size=(64, 64), causal=True,
                                    backend="torch")
        out.backward(torch.ones_like(out))

    peak = peak_cpu_bytes(step)
    io = 16 * q.numel() * 4
    scores = 2 * SEQ * SEQ * 4
    assert peak <= 2.5 * budget + io, f"peak {peak / 2**20:.1f} MiB, budget {budget / 2**20:.0f} MiB"
    assert peak < scores / 3, f"peak {peak / 2**20:.1f} MiB against {scores / 2**20:.0f} MiB of scores"
    assert torch.isfinite(q.grad).all() and w.grad.abs().sum() > 0


@pytest.mark.parametrize("seq,head_dim", [(1024, 128), (4096, 32)])
def test_backward_peak_memory(seq, head_dim, monkeypatch):
    """The backward alone holds its three gradients, phi(K), the states h and their gradient dh
    (each B x Hkv x Mk x D x Dv) and a few score budgets: no copy of the saved output (the old
    delta), no per-chunk temporary as large as dh, no second set of float32 gradients to add the
    linear branch's to. At 32k tokens x 12 heads x hd128 each of those was 0.2 to 0.4 GB."""
    budget = 1 << 20
    monkeypatch.setattr(chunked, "SCORE_BUDGET_BYTES", budget)
    q, k, v = make_qkv(1, 2, seq, head_dim, requires_grad=True, seed=7)
    w, b = make_proj(head_dim, seed=7)
    out = attnlib.sla_attention(q, k, v, w, b, critical=0.1, negligible=0.2, block_size=(64, 64), causal=True,
                                backend="torch")
    dout = torch.ones_like(out)
    peak = peak_cpu_bytes(lambda: torch.autograd.grad(out, (q, k, v, w, b), dout))
    tensor, states = 4 * q.numel(), 4 * 2 * (seq // 64) * head_dim ** 2
    bound = 3 * tensor + 2 * states + 3 * budget  # before: 12.1 and 10.6 MiB against 10 and 7 MiB
    assert peak <= bound, f"peak {peak / 2**20:.2f} MiB > {bound / 2**20:.2f} MiB"


def test_backward_runs_under_a_torch_dispatch_mode():
    """FlopCounterMode (how training scripts measure MFU) keeps a TorchDispatchMode on the stack
    through the backward; torch.func.vjp of the feature map failed there ("Cannot access data
    pointer of Tensor that doesn't have storage"). The same gradients with and without it."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = make_qkv(1, 2, 70, 16, kv_heads=1, requires_grad=True, seed=5)
    gen = torch.Generator().manual_seed(6)
    w, b = torch.randn(16, 16, generator=gen), torch.randn(16, generator=gen)
    kw = dict(critical=0.3, negligible=0.2, block_size=(16, 16), feature_map="elu", backend="torch")
    want = torch.autograd.grad(attnlib.sla_attention(q, k, v, w, b, **kw).square().sum(), (q, k, v))
    with FlopCounterMode(display=False):
        got = torch.autograd.grad(attnlib.sla_attention(q, k, v, w, b, **kw).square().sum(), (q, k, v))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
