"""sla_block_classes and sla_reference: block classification, causal structure, both branches."""
import math

import pytest
import torch

import attnlib
from attnlib.inputs import to_bhsd
from attnlib.reference import block_sparse_reference, flash_reference, sla_block_classes, sla_reference
from attnlib.reference.sla import _causal_block_structure, _eligible_counts, sla_block_counts
from attnlib.testing import assert_verbose_allclose, make_qkv

ATOL64, ATOL32 = 1e-12, 2e-6


def _pooled_probs(q, k, block_size, scale):
    """P_c by explicit per-block means over the real tokens, float64."""
    bq, bk = block_size
    hq, hkv = q.shape[1], k.shape[1]
    pq = torch.stack([q[:, :, i:i + bq].double().mean(dim=2) for i in range(0, q.shape[2], bq)], dim=2)
    pk = torch.stack([k[:, :, j:j + bk].double().mean(dim=2) for j in range(0, k.shape[2], bk)], dim=2)
    pk = pk.repeat_interleave(hq // hkv, dim=1)
    return torch.softmax(pq @ pk.transpose(-1, -2) * scale, dim=-1)


def _token_visibility(sq, sk, block_size):
    """Per block pair, by explicit loops: (all tokens visible, any token visible) under causal."""
    bq, bk = block_size
    mq, mk = math.ceil(sq / bq), math.ceil(sk / bk)
    full = torch.zeros(mq, mk, dtype=torch.bool)
    some = torch.zeros(mq, mk, dtype=torch.bool)
    for r in range(mq):
        for c in range(mk):
            vis = [j <= i + sk - sq for i in range(r * bq, min((r + 1) * bq, sq))
                   for j in range(c * bk, min((c + 1) * bk, sk))]
            full[r, c], some[r, c] = all(vis), any(vis)
    return full, some


# -- classification --------------------------------------------------------------------------------
def test_block_counts():
    assert sla_block_counts(30, 0.1, 0.1) == (3, 3)  # 0.1 * 30 is 3.0000000000000004 in floats
    assert sla_block_counts(10, 0.05, 0.10) == (1, 1)
    assert sla_block_counts(5, 0.6, 0.6) == (3, 2)  # negligible capped by what is left
    assert sla_block_counts(7, 1.0, 0.0) == (7, 0)
    assert sla_block_counts(0, 0.5, 0.5) == (0, 0)
    assert sla_block_counts(3, 0.0, 1.0) == (0, 3)


def test_all_critical_non_causal():
    q, k, _ = make_qkv(2, 2, 100, 16, seq_k=130)
    classes = sla_block_classes(q, k, critical=1.0, negligible=0.0, block_size=(32, 32))
    assert classes.dtype == torch.int8 and classes.shape == (2, 2, 4, 5)
    assert (classes == 1).all()


@pytest.mark.parametrize("critical,negligible", [(0.2, 0.35), (0.05, 0.10), (0.0, 1.0), (0.5, 0.5)])
def test_counts_and_ranking(critical, negligible):
    bs = (16, 8)
    q, k, _ = make_qkv(1, 4, 50, 16, kv_heads=2, seq_k=77, dtype=torch.float64)  # 10 key blocks, ragged
    classes = sla_block_classes(q, k, critical=critical, negligible=negligible, block_size=bs)
    n_crit, n_neg = sla_block_counts(10, critical, negligible)
    assert ((classes == 1).sum(-1) == n_crit).all()
    assert ((classes == -1).sum(-1) == n_neg).all()
    p_c = _pooled_probs(q, k, bs, 16 ** -0.5)
    # every critical block outranks every marginal one, which outranks every negligible one
    for hi, lo in ((1, 0), (0, -1), (1, -1)):
        p_hi = torch.where(classes == hi, p_c, torch.full_like(p_c, math.inf)).amin(-1)
        p_lo = torch.where(classes == lo, p_c, torch.full_like(p_c, -math.inf)).amax(-1)
        assert (p_hi >= p_lo).all()


def test_ties_broken_by_index():
    # identical key blocks -> equal P_c: the lowest indices are critical, the highest negligible
    q, k, _ = make_qkv(1, 1, 8, 4)
    k = k[:, :, :2].repeat(1, 1, 4, 1)  # four identical 2-token blocks
    classes = sla_block_classes(q, k, critical=0.25, negligible=0.5, block_size=(8, 2))
    assert classes[0, 0, 0].tolist() == [1, 0, -1, -1]


@pytest.mark.parametrize("seq_q,seq_k,block_size", [(64, 64, (16, 16)), (50, 77, (16, 8)), (77, 50, (8, 16))])
def test_causal_structure(seq_q, seq_k, block_size):
    q, k, _ = make_qkv(1, 2, seq_q, 16, seq_k=seq_k)
    classes = sla_block_classes(q, k, critical=0.3, negligible=0.3, block_size=block_size, causal=True)
    full, some = _token_visibility(seq_q, seq_k, block_size)
    assert (classes[..., ~some] == -1).all()          # nothing visible: negligible
    assert (classes[..., some & ~full] == 1).all()    # crossing the diagonal: critical
    for r in range(full.shape[0]):  # the fractions apply to the fully visible blocks
        n_crit, n_neg = sla_block_counts(int(full[r].sum()), 0.3, 0.3)
        row = classes[..., r, full[r]]
        assert ((row == 1).sum(-1) == n_crit).all() and ((row == -1).sum(-1) == n_neg).all()
    everything = sla_block_classes(q, k, critical=1.0, negligible=0.0, block_size=block_size, causal=True)
    assert torch.equal(everything == 1, some.expand_as(everything))


# -- outputs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_all_critical_equals_flash(causal):
    q, k, v = make_qkv(1, 4, 50, 16, kv_heads=2, seq_k=70, dtype=torch.float64)
    out = sla_reference(q, k, v, torch.eye(16, dtype=torch.float64), critical=1.0, negligible=0.0,
                        block_size=(16, 16), causal=causal)
    assert_verbose_allclose(out, flash_reference(q, k, v, causal=causal), atol=ATOL64)


@pytest.mark.parametrize("causal", [False, True])
def test_zero_projection_equals_block_sparse_on_critical(causal):
    bs = (16, 8)
    q, k, v = make_qkv(2, 2, 37, 16, seq_k=45, dtype=torch.float64)  # ragged tails
    kw = dict(critical=0.3, negligible=0.2, block_size=bs, causal=causal)
    classes = sla_block_classes(q, k, **kw)
    ref = block_sparse_reference(q, k, v, classes == 1, block_size=bs, causal=causal)
    assert_verbose_allclose(sla_reference(q, k, v, **kw), ref, atol=ATOL64)
    w0 = torch.zeros(16, 16, dtype=torch.float64)
    assert_verbose_allclose(sla_reference(q, k, v, w0, **kw), ref, atol=ATOL64)
    b = torch.randn(16, dtype=torch.float64)
    assert_verbose_allclose(sla_reference(q, k, v, w0, b, **kw), ref + b, atol=ATOL64)


def _marginal_loops(q, k, v, classes, block_size, eps=1e-6):
    """Float64 linear attention over each row's marginal-block keys, softmax feature map."""
    bq, bk = block_size
    b_, hq, sq, _ = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.zeros(b_, hq, sq, dv, dtype=torch.float64)
    for b in range(b_):
        for h in range(hq):
            hk = h // (hq // hkv)
            for i in range(sq):
                fq = torch.softmax(q[b, h, i].double(), dim=0)
                num, den = torch.zeros(dv, dtype=torch.float64), 0.0
                for j in range(sk):
                    if classes[b, h, i // bq, j // bk] == 0:
                        a = fq @ torch.softmax(k[b, hk, j].double(), dim=0)
                        num, den = num + a * v[b, hk, j].double(), den + a
                out[b, h, i] = num / (den + eps)
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_identity_projection_marginal_matches_loops(causal):
    bs = (8, 8)
    q, k, v = make_qkv(1, 4, 29, 8, kv_heads=2, seq_k=35, dtype=torch.float64)
    kw = dict(critical=0.25, negligible=0.25, block_size=bs, causal=causal)
    classes = sla_block_classes(q, k, **kw)
    assert (classes == 0).any()
    eye = torch.eye(8, dtype=torch.float64)
    marginal = sla_reference(q, k, v, eye, **kw) - sla_reference(q, k, v, **kw)
    assert_verbose_allclose(marginal, _marginal_loops(q, k, v, classes, bs), atol=ATOL64)


@pytest.mark.parametrize("causal", [False, True])
def test_projection_is_applied_as_linear_layer(causal):
    """A random, non-symmetric proj_weight W and bias b: the output is the sparse part plus
    marginal @ W^T + b (nn.Linear's convention), with marginal from the loops above. The identity
    and zero projections elsewhere cannot tell W from W^T."""
    bs = (8, 8)
    q, k, v = make_qkv(1, 4, 29, 8, kv_heads=2, seq_k=35, head_dim_v=6, dtype=torch.float64, seed=11)
    kw = dict(critical=0.25, negligible=0.25, block_size=bs, causal=causal)
    classes = sla_block_classes(q, k, **kw)
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    assert not torch.allclose(w, w.T)
    want = (block_sparse_reference(q, k, v, classes == 1, block_size=bs, causal=causal)
            + _marginal_loops(q, k, v, classes, bs) @ w.T + b)
    assert_verbose_allclose(sla_reference(q, k, v, w, b, **kw), want, atol=ATOL64)
    assert_verbose_allclose(sla_reference(q, k, v, w, **kw), want - b, atol=ATOL64)


def test_gqa_equals_expanded_kv():
    q, k, v = make_qkv(1, 4, 40, 16, kv_heads=2, seq_k=52)
    w, b = torch.randn(16, 16), torch.randn(16)
    kx, vx = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    kw = dict(critical=0.3, negligible=0.2, block_size=(16, 8), causal=True)
    assert torch.equal(sla_block_classes(q, k, **kw), sla_block_classes(q, kx, **kw))
    assert_verbose_allclose(sla_reference(q, k, v, w, b, **kw), sla_reference(q, kx, vx, w, b, **kw),
                            atol=ATOL32)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients(causal):
    q, k, v = make_qkv(1, 2, 21, 8, kv_heads=1, seq_k=27, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    out = sla_reference(q, k, v, w, b, critical=0.3, negligible=0.3, block_size=(8, 4), causal=causal)
    (out * torch.randn_like(out)).sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v), ("w", w), ("b", b)):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name


def test_gradcheck():
    q, k, v = make_qkv(1, 2, 6, 3, kv_heads=1, seq_k=8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, w, b: sla_reference(q, k, v, w, b, critical=0.25, negligible=0.25,  # noqa: E731
                                             block_size=(2, 2))
    assert torch.autograd.gradcheck(fn, (q, k, v, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_attention_api_torch_backend(dtype, layout):
    """fp64 runs this reference (bitwise); fp32 runs sla-torch-chunked, which computes the same
    float32 quantities in another order (tests/test_sla_torch_chunked.py holds it to float64)."""
    q, k, v = make_qkv(1, 4, 50, 16, kv_heads=2, seq_k=70, dtype=dtype, layout=layout)
    w, b = torch.randn(16, 16, dtype=dtype), torch.randn(16, dtype=dtype)
    opts = dict(critical=0.3, negligible=0.2, block_size=(16, 16))
    out = attnlib.attention(q, k, v, method="sla", backend="torch", layout=layout, causal=True,
                            proj_weight=w, proj_bias=b, **opts)
    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    ref = sla_reference(qb, kb, vb, w, b, causal=True, **opts)
    assert out.dtype == dtype and out.shape == q.shape
    same = torch.equal if dtype == torch.float64 else (
        lambda x, y: torch.allclose(x, y, atol=ATOL32, rtol=1e-6))
    assert same(to_bhsd(out, layout), ref)
    out2 = attnlib.sla_attention(q, k, v, layout=layout, backend="torch", **opts)  # zero projection
    ref2 = sla_reference(qb, kb, vb, **opts)
    assert same(out2 if layout == "bhsd" else out2.transpose(1, 2), ref2)


def test_attention_api_backward_matches_reference():
    """fp32 runs sla-torch-chunked (its own backward): the reference's gradients to float32
    rounding, relative to their size."""
    q, k, v = make_qkv(1, 4, 40, 16, kv_heads=2, seq_k=50, layout="bshd", requires_grad=True)
    gen = torch.Generator().manual_seed(220)
    w = torch.randn(16, 16, generator=gen).requires_grad_()
    b = torch.randn(16, generator=gen).requires_grad_()
    opts = dict(critical=0.3, negligible=0.2, block_size=(8, 8))
    out = attnlib.attention(q, k, v, method="sla", backend="torch", layout="bshd", causal=True,
                            proj_weight=w, proj_bias=b, **opts)
    g = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v, w, b))
    ref = sla_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), w, b, causal=True, **opts)
    grads_ref = torch.autograd.grad((ref * g.transpose(1, 2)).sum(), (q, k, v, w, b))
    for name, ga, gr in zip("qkvwb", grads, grads_ref):
        # dW, db sum 40 rows of entries ~10 in float32: a few ulps of that (was flaky at 1e-6)
        assert_verbose_allclose(ga, gr, atol=ATOL32, rtol=1e-5, name=f"d{name}")


def test_eligible_counts_from_shapes_equal_the_causal_structure():
    """The classification counts each row's eligible blocks from the shapes (no host read of a
    tensor inside torch.func); it must equal the fully-visible mask's row sums, for every length
    relation (Sq < Sk, Sq > Sk, ragged last blocks, empty sequences)."""
    for bq, bk in ((64, 64), (128, 64), (16, 32), (32, 16)):
        for sq in (0, 1, 15, 16, 17, 63, 64, 65, 130, 200):
            for sk in (0, 1, 15, 16, 17, 63, 64, 65, 130, 200):
                full, _ = _causal_block_structure(sq, sk, (bq, bk), "cpu")
                assert _eligible_counts(sq, sk, (bq, bk), True) == full.sum(-1).tolist(), (bq, bk, sq, sk)
                mk = full.shape[1]
                assert _eligible_counts(sq, sk, (bq, bk), False) == [mk] * full.shape[0]
