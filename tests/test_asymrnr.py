"""AsymRnR (method asymrnr): partition, matching, reduce/restore, schedule and cache, the module
and the dispatcher path, on the torch pieces (the Triton kernels: test_asymrnr_triton.py).

Inputs are fresh seeded normals (never zeros) at small grids. Tolerances: index facts (coverage,
lengths, restore at kept / removed positions, ratio 0 = full attention, determinism) are exact;
end-to-end outputs against the loop-based reference below within 1e-5 (fp32) / 1e-12 (fp64).
"""
from __future__ import annotations

import math

import pytest
import torch

import attnlib
from attnlib.asymrnr import AsymRnR, Partition, match, partition, plan_reduction, reduce, restore
from attnlib.asymrnr.config import removed_count
from attnlib.inputs import to_bhsd
from attnlib.reference.asymrnr import asymrnr_similarity
from attnlib.testing import assert_verbose_allclose, make_qkv

GRID = (3, 4, 5)  # not divisible by the stride (2, 2, 2): clipped edge tiles
S = 60


def tile_ids(tokens: torch.Tensor, grid, stride, offset: int = 0) -> torch.Tensor:
    F, H, W = grid
    t = tokens - offset
    f, h, w = t // (H * W), (t // W) % H, t % W
    nh, nw = -(-H // stride[1]), -(-W // stride[2])
    return ((f // stride[0]) * nh + h // stride[1]) * nw + w // stride[2]


def loop_reference(q, k, v, grid, *, q_ratio, kv_ratio, seed=0, metric="euclidean", mode="replace",
                   text_tokens=0, text_side="end", scale=None, return_lse=False):
    """AsymRnR written head by head with Python sets: the partition is shared, everything else
    (matching by brute force, which sources go, restoring) is independent of the library."""
    part = partition(grid, seed=seed, text_tokens=text_tokens, text_side=text_side)
    src, dst = part.src.tolist(), part.dst.tolist()
    N, n_dst = part.n_video, part.n_dst
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def side(x, ratio):
        """per (b, h): (kept positions, {removed: its destination})."""
        n_rm = N - max(n_dst, math.floor(N * (1 - ratio) + 1e-7))
        out = {}
        for b in range(x.shape[0]):
            for h in range(x.shape[1]):
                xs = x[b, h].double()
                sim = {}
                for s in src:
                    best, best_d = None, None
                    for d in dst:
                        diff = xs[s] - xs[d]
                        val = {"euclidean": -(diff @ diff), "dot": xs[s] @ xs[d],
                               "cosine": (xs[s] @ xs[d]) / (xs[s].norm() * xs[d].norm())}[metric].item()
                        if best is None or val > best:
                            best, best_d = val, d
                    sim[s] = (best, best_d)
                ranked = sorted(src, key=lambda s: (-sim[s][0], src.index(s)))
                removed = {s: sim[s][1] for s in ranked[:n_rm]}
                kept = [i for i in range(x.shape[2]) if i not in removed]
                out[b, h] = kept, removed
        return out

    def reduced(x, plan, b, h):
        kept, removed = plan[b, h]
        rows = []
        for i in kept:
            members = [i] + [s for s, d in removed.items() if d == i]
            rows.append(x[b, h, members].double().mean(0) if mode == "mean" else x[b, h, i].double())
        return torch.stack(rows)

    qp, kvp = side(q, q_ratio), side(v, kv_ratio)
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=torch.float64)
    lse = torch.empty(q.shape[:3], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            qr = reduced(q, qp, b, h)
            kr, vr = reduced(k, kvp, b, h // group), reduced(v, kvp, b, h // group)
            o = torch.softmax(qr @ kr.T * scale, -1) @ vr
            l = torch.logsumexp(qr @ kr.T * scale, -1)
            kept, removed = qp[b, h]
            row = {i: j for j, i in enumerate(kept)}
            for i in range(q.shape[2]):
                out[b, h, i] = o[row[removed.get(i, i)]]
                lse[b, h, i] = l[row[removed.get(i, i)]]
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# partition
@pytest.mark.parametrize("grid,stride,text", [
    ((3, 4, 5), (2, 2, 2), 0), ((4, 4, 4), (2, 2, 2), 0), ((1, 1, 1), (2, 2, 2), 0), ((2, 7, 3), (1, 2, 3), 5),
    ((5, 3, 9), (3, 2, 4), 0),
])
@pytest.mark.parametrize("side", ["start", "end"])
def test_partition_covers_every_token_once(grid, stride, text, side):
    p = partition(grid, stride, seed=3, text_tokens=text, text_side=side)
    all_tok = torch.cat([p.dst, p.src, p.text]).sort().values
    assert torch.equal(all_tok, torch.arange(math.prod(grid) + text)), "dst, src and text must tile the sequence"
    n_tiles = math.prod(-(-g // s) for g, s in zip(grid, stride))
    assert p.n_dst == n_tiles
    offset = text if side == "start" else 0
    assert torch.equal(tile_ids(p.dst, grid, stride, offset).sort().values, torch.arange(n_tiles)), \
        "exactly one destination per tile (edge tiles included)"
    assert bool((p.text < offset + text).all() if side == "start" else (p.text >= math.prod(grid)).all())


def test_partition_seeded():
    a, b, c = (partition((4, 6, 6), seed=s) for s in (7, 7, 8))
    assert torch.equal(a.dst, b.dst) and torch.equal(a.src, b.src)
    assert not torch.equal(a.dst, c.dst)


# ---------------------------------------------------------------------------------------------
# matching
def test_euclidean_matmul_form_equals_cdist_squared():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 40, 24, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 3, 17, 24, generator=gen, dtype=torch.float64)
    assert_verbose_allclose(-asymrnr_similarity(a, b, "euclidean"), torch.cdist(a, b) ** 2, atol=1e-10, rtol=1e-12)
    # float32 (what the kernels use): cancellation error scales with |x|^2 ~ D
    sim32 = asymrnr_similarity(a.float(), b.float(), "euclidean")
    assert_verbose_allclose(-sim32, torch.cdist(a, b) ** 2, atol=24 * 1e-5, rtol=1e-5)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
def test_match_is_the_best_destination(metric):
    x = make_qkv(2, 3, S, 16, seed=1, dtype=torch.float64)[0]
    p = partition(GRID, seed=2)
    m = match(x, p, metric=metric, backend="torch")
    sim = asymrnr_similarity(x[:, :, p.src], x[:, :, p.dst], metric)
    assert torch.equal(m.node, sim.argmax(-1))
    assert_verbose_allclose(m.score, sim.amax(-1), atol=1e-12)
    ordered = m.score.gather(-1, m.order)
    assert bool((ordered[..., :-1] >= ordered[..., 1:]).all()), "sources ordered from the closest match"


# ---------------------------------------------------------------------------------------------
# reduce / restore
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("text", [0, 6])
def test_reduced_lengths(ratio, text):
    x = make_qkv(1, 2, S + text, 8, seed=4)[0]
    p = partition(GRID, seed=0, text_tokens=text)
    plan = plan_reduction(p, match(x, p, backend="torch"), ratio)
    want = max(p.n_dst, math.floor(p.n_video * (1 - ratio) + 1e-7)) + text
    assert plan.reduced_len == want and plan.keep_idx.shape[-1] == want
    assert reduce(x, plan, backend="torch").shape == (1, 2, want, 8)
    assert reduce(x, plan, mode="mean", backend="torch").shape == (1, 2, want, 8)
    assert removed_count(10, 1, 0.3) == 3  # floor(10 * 0.7) = 7 despite 0.7's binary rounding


def test_restore_exact_at_kept_and_copies_at_removed():
    x = make_qkv(2, 3, S, 16, seed=5)[0]
    p = partition(GRID, seed=1)
    m = match(x, p, backend="torch")
    plan = plan_reduction(p, m, 0.5)
    y = reduce(x, plan, backend="torch")
    back = restore(y, plan, backend="torch")
    for b in range(2):
        for h in range(3):
            n_rm = plan.n_removed
            removed = p.src[m.order[b, h, :n_rm]]
            dsts = p.dst[m.node[b, h, m.order[b, h, :n_rm]]]
            kept = torch.ones(S, dtype=torch.bool)
            kept[removed] = False
            assert torch.equal(back[b, h, kept], x[b, h, kept]), "kept tokens take their own row"
            assert torch.equal(back[b, h, removed], x[b, h, dsts]), "removed tokens copy their destination"
            assert torch.equal(plan.keep_idx[b, h], kept.nonzero().flatten()), "kept tokens keep their order"
            worst_removed = m.score[b, h, m.order[b, h, n_rm - 1]]
            assert bool((m.score[b, h, m.order[b, h, n_rm:]] <= worst_removed).all()), "the closest are removed"


def test_reduce_mean_averages_into_destination():
    x = make_qkv(1, 2, S, 8, seed=6, dtype=torch.float64)[0]
    p = partition(GRID, seed=0)
    m = match(x, p, backend="torch")
    plan = plan_reduction(p, m, 0.6)
    y = reduce(x, plan, mode="mean", backend="torch")
    for h in range(2):
        for j, i in enumerate(plan.keep_idx[0, h].tolist()):
            members = (plan.restore_idx[0, h] == j).nonzero().flatten()
            assert i in members.tolist()
            assert_verbose_allclose(y[0, h, j], x[0, h, members].mean(0), atol=1e-12)


def test_plan_refuses_matches_of_another_partition():
    """Two seeds give partitions with the same counts but other destinations: matches made on one
    must not plan the other (their node indices would point at the wrong tokens)."""
    x = make_qkv(1, 2, S, 8, seed=21)[0]
    p0, p1 = partition(GRID, seed=0), partition(GRID, seed=1)
    assert p0.n_src == p1.n_src and not torch.equal(p0.dst, p1.dst)
    m0 = match(x, p0, backend="torch")
    with pytest.raises(ValueError, match="another partition"):
        plan_reduction(p1, m0, 0.5)
    # the same split built by hand (no fingerprint stored: formed from its tensors) is accepted
    same = Partition(p0.grid, p0.stride, p0.text_tokens, p0.text_side, p0.dst.clone(), p0.src.clone())
    assert same.key == p0.key == m0.partition_key
    assert plan_reduction(same, m0, 0.5).reduced_len == plan_reduction(p0, m0, 0.5).reduced_len
    # text tokens on the other side: same counts and video split, another token numbering
    pt0 = partition(GRID, seed=0, text_tokens=4, text_side="start")
    pt1 = partition(GRID, seed=0, text_tokens=4, text_side="end")
    with pytest.raises(ValueError, match="another partition"):
        plan_reduction(pt1, match(make_qkv(1, 2, S + 4, 8, seed=22)[0], pt0, backend="torch"), 0.5)


def test_reduce_restore_name_a_tensor_on_another_device():
    x = make_qkv(1, 2, S, 8, seed=23)[0]
    p = partition(GRID, seed=0)
    plan = plan_reduction(p, match(x, p, backend="torch"), 0.5)
    with pytest.raises(ValueError, match="x is on meta"):
        reduce(torch.empty(x.shape, device="meta"), plan, backend="torch")
    y = reduce(x, plan, backend="torch")
    with pytest.raises(ValueError, match="y is on meta"):
        restore(torch.empty(y.shape, device="meta"), plan, backend="torch")
    with pytest.raises(ValueError, match="out is on meta"):
        restore(y, plan, out=torch.empty(x.shape, device="meta"), backend="torch")


# ---------------------------------------------------------------------------------------------
# end to end
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (4, 1)])
def test_ratio_zero_is_exactly_full_attention(layout, heads, kv_heads):
    q, k, v = make_qkv(2, heads, S, 16, kv_heads=kv_heads, seed=7, layout=layout)
    full = attnlib.attention(q, k, v, layout=layout, backend="torch")
    got = attnlib.attention(q, k, v, method="asymrnr", grid=GRID, q_ratio=0.0, kv_ratio=0.0, layout=layout,
                            backend="torch")
    assert torch.equal(got, full)
    rnr = AsymRnR(GRID, q_ratio=0.0, kv_ratio=0.0, backend="torch")
    assert torch.equal(rnr.attention(q, k, v, layout=layout), full)


SAGE_COS_MIN, SAGE_REL_L1_MAX = 0.999, 0.02  # sage's accuracy contract (tests/test_sage_triton.py)


def record_inner_methods(monkeypatch) -> list:
    """The methods the AsymRnR code asks attnlib.api.attention for (it imports it at call time)."""
    import attnlib.api

    calls, real = [], attnlib.api.attention

    def spy(*args, **kw):
        calls.append(kw.get("method", "flash"))
        return real(*args, **kw)

    monkeypatch.setattr(attnlib.api, "attention", spy)
    return calls


def test_inner_sage_is_sage(monkeypatch):
    """inner_method / method "sage" (forward only) runs sage: at ratio 0 the output is sage's own
    (its torch simulation here, bit for bit, so not flash's) and within sage's contract of exact
    attention; with reduction, within that contract of the same reduction with flash inside."""
    from attnlib.reference import flash_reference, sage_reference
    from attnlib.testing import metrics

    q, k, v = make_qkv(1, 4, S, 64, kv_heads=2, seed=24)
    calls = record_inner_methods(monkeypatch)
    kw = dict(method="asymrnr", grid=GRID, q_ratio=0.0, kv_ratio=0.0, inner_method="sage", backend="torch")
    got = attnlib.attention(q, k, v, **kw)
    assert calls == ["sage"], calls
    assert torch.equal(got, sage_reference(q, k, v)) and not torch.equal(got, flash_reference(q, k, v))
    m = metrics(got, flash_reference(q.double(), k.double(), v.double()))
    assert m["cos_sim"] >= SAGE_COS_MIN and m["rel_l1"] <= SAGE_REL_L1_MAX, m
    assert torch.equal(AsymRnR(GRID, q_ratio=0.0, kv_ratio=0.0, method="sage", backend="torch").attention(q, k, v),
                       got)
    calls.clear()
    kw.update(q_ratio=0.5, kv_ratio=0.3)
    reduced_sage = attnlib.attention(q, k, v, **kw)
    assert calls == ["sage"], calls
    reduced_flash = attnlib.attention(q, k, v, **{**kw, "inner_method": "flash"})
    m = metrics(reduced_sage, reduced_flash)
    assert m["cos_sim"] >= SAGE_COS_MIN and m["rel_l1"] <= SAGE_REL_L1_MAX and m["max_abs"] > 0, m
    assert torch.equal(AsymRnR(GRID, q_ratio=0.5, kv_ratio=0.3, method="sage", backend="torch").attention(q, k, v),
                       reduced_sage)


@pytest.mark.parametrize("heads,kv_heads,layout,mode,metric,text,side", [
    (2, 2, "bhsd", "replace", "euclidean", 0, "end"),
    (4, 2, "bshd", "replace", "cosine", 4, "start"),
    (4, 1, "bhsd", "mean", "dot", 4, "end"),
    (2, 2, "bshd", "mean", "euclidean", 0, "end"),
])
def test_dispatcher_matches_loop_reference(heads, kv_heads, layout, mode, metric, text, side):
    q, k, v = make_qkv(1, heads, S + text, 8, kv_heads=kv_heads, seed=8, layout=layout, dtype=torch.float64)
    got = attnlib.attention(q, k, v, method="asymrnr", grid=GRID, q_ratio=0.5, kv_ratio=0.3, metric=metric,
                            mode=mode, text_tokens=text, text_side=side, seed=3, layout=layout, backend="torch")
    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    want = loop_reference(qb, kb, vb, GRID, q_ratio=0.5, kv_ratio=0.3, seed=3, metric=metric, mode=mode,
                          text_tokens=text, text_side=side)
    assert_verbose_allclose(to_bhsd(got, layout), want, atol=1e-12)
    if layout == "bhsd" and kv_heads == heads:  # fp32 through the same path
        got32 = attnlib.attention(q.float(), k.float(), v.float(), method="asymrnr", grid=GRID, metric=metric,
                                  mode=mode, text_tokens=text, text_side=side, seed=3, backend="torch")
        assert_verbose_allclose(got32, want, atol=1e-5)


def test_layouts_agree_and_module_equals_dispatcher():
    q, k, v = make_qkv(2, 4, S, 16, kv_heads=2, seed=9)
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    a = attnlib.attention(q, k, v, method="asymrnr", grid=GRID, seed=5, backend="torch")
    b = attnlib.attention(qs, ks, vs, method="asymrnr", grid=GRID, seed=5, layout="bshd", backend="torch")
    assert b.shape == qs.shape
    assert_verbose_allclose(b.transpose(1, 2), a, atol=1e-6)
    rnr = AsymRnR(GRID, seed=5, backend="torch")  # block 0, step 0 uses the seed itself
    assert_verbose_allclose(rnr.attention(qs, ks, vs, layout="bshd").transpose(1, 2), a, atol=1e-6)


def test_text_tokens_untouched():
    T = 7
    q, k, v = make_qkv(1, 2, S + T, 8, seed=10, dtype=torch.float64)
    for side, text_pos, spec in (("start", torch.arange(T), slice(0, T)), ("end", torch.arange(S, S + T),
                                                                           slice(-T, None))):
        p = partition(GRID, seed=0, text_tokens=T, text_side=side)
        for ratio in (0.5, 1.0):
            plan = plan_reduction(p, match(q, p, backend="torch"), ratio)
            assert bool(torch.isin(text_pos, plan.keep_idx).all()), "text tokens are never removed"
            reads = plan.keep_idx.gather(-1, plan.restore_idx[..., text_pos])
            assert torch.equal(reads, text_pos.expand_as(reads)), "text tokens restore from themselves"
        # a text query's output is attention over the reduced K/V: the same whatever q_ratio
        rnr = AsymRnR(GRID, q_ratio=0.7, kv_ratio=0.3, text_tokens=spec, backend="torch")
        rnr_q0 = AsymRnR(GRID, q_ratio=0.0, kv_ratio=0.3, text_tokens=T, text_side=side, backend="torch")
        assert_verbose_allclose(rnr.attention(q, k, v)[:, :, text_pos], rnr_q0.attention(q, k, v)[:, :, text_pos],
                                atol=1e-12)


def test_seeded_determinism():
    q, k, v = make_qkv(1, 2, S, 16, seed=11)
    outs = [attnlib.attention(q, k, v, method="asymrnr", grid=GRID, seed=s, backend="torch") for s in (4, 4, 5)]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    m1, m2 = AsymRnR(GRID, seed=4, backend="torch"), AsymRnR(GRID, seed=4, backend="torch")
    for step in range(3):
        assert torch.equal(m1.attention(q, k, v, step=step, block=2), m2.attention(q, k, v, step=step, block=2))


def test_cache_reuses_then_refreshes():
    rnr = AsymRnR(GRID, q_ratio=0.5, kv_ratio=0.3, cache_steps=3, backend="torch")
    inputs = [make_qkv(1, 2, S, 16, seed=20 + s) for s in range(5)]

    def fresh(step_of_matches, step):
        """Output at `step` with partition + matches computed on the tensors of `step_of_matches`."""
        from attnlib.asymrnr.schedule import derived_seed

        part = partition(GRID, seed=derived_seed(0, 0, step_of_matches // 3))
        qm, _, vm = inputs[step_of_matches]
        q, k, v = inputs[step]
        from attnlib.asymrnr import reduced_attention
        return reduced_attention(q, k, v, (part, match(qm, part, backend="torch")),
                                 (part, match(vm, part, backend="torch")), q_ratio=0.5, kv_ratio=0.3,
                                 backend="torch")

    for step in range(5):
        got = rnr.attention(*inputs[step], step=step)
        assert torch.equal(got, fresh(0 if step < 3 else 3, step)), f"step {step}"
    # steps 0 and 3 computed (Q and K/V each); 1, 2, 4 reused
    assert rnr.cache_info()["misses"] == 4 and rnr.cache_info()["hits"] == 6
    assert not torch.equal(rnr.attention(*inputs[4], step=4), fresh(4, 4)), "step 4 reuses step 3's matches"
    rnr.reset_cache()
    assert torch.equal(rnr.attention(*inputs[4], step=4), fresh(4, 4)), "a cleared cache recomputes"


def test_schedule_table_and_callable():
    q, k, v = make_qkv(1, 2, S, 16, seed=12)
    full = attnlib.attention(q, k, v, backend="torch")
    table = AsymRnR(GRID, q_ratio={(0, 0): 0.5}, kv_ratio={(0, 0): 0.3}, backend="torch")
    const = AsymRnR(GRID, q_ratio=0.5, kv_ratio=0.3, backend="torch")
    assert torch.equal(table.attention(q, k, v, block=0, step=0), const.attention(q, k, v))
    assert torch.equal(table.attention(q, k, v, block=1, step=0), full), "missing table entries mean 0"
    fn = AsymRnR(GRID, q_ratio=lambda b, s: 0.5 if s >= 2 else 0.0, kv_ratio=lambda b, s: 0.3 if s >= 2 else 0.0,
                 backend="torch")
    assert torch.equal(fn.attention(q, k, v, step=1), full)
    assert torch.equal(fn.attention(q, k, v, step=2), const.attention(q, k, v, step=2))
    bad = AsymRnR(GRID, q_ratio=lambda b, s: 1.5, backend="torch")
    with pytest.raises(ValueError, match=r"q_ratio\(0, 0\)"):
        bad.attention(q, k, v)


def test_backward_and_lse():
    q, k, v = make_qkv(1, 4, S, 8, kv_heads=2, seed=13, dtype=torch.float64, requires_grad=True)
    out, lse = attnlib.attention(q, k, v, method="asymrnr", grid=GRID, return_lse=True, backend="torch")
    assert lse.shape == (1, 4, S) and torch.isfinite(lse).all()
    # defaults: q_ratio 0.5, kv_ratio 0.3, seed 0; a removed query takes its destination's lse
    want, want_lse = loop_reference(q.detach(), k.detach(), v.detach(), GRID, q_ratio=0.5, kv_ratio=0.3,
                                    return_lse=True)
    assert_verbose_allclose(out, want, atol=1e-12)
    assert_verbose_allclose(lse, want_lse, atol=1e-12, name="lse")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    # directional derivative by central differences (the matching is piecewise constant: tiny eps)
    dirs = [torch.randn_like(t) for t in (q, k, v)]
    eps = 1e-6

    def f(sign):
        with torch.no_grad():
            shifted = [t + sign * eps * d for t, d in zip((q, k, v), dirs)]
            return (attnlib.attention(*shifted, method="asymrnr", grid=GRID, backend="torch") * dout).sum()
    numeric = (f(1) - f(-1)) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(grads, dirs))
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric.item(), analytic.item())


def test_inner_attention_is_asked_for_lse_only_when_read(monkeypatch):
    """The inner attention computes lse only when the caller asks for it or a backward will read
    it: a kernel asked for lse may be a slower one (on a GPU torch SDPA, the fastest flash kernel
    for inference, returns none)."""
    from attnlib import api

    asked = []
    real = api.attention
    monkeypatch.setattr(api, "attention", lambda *a, **kw: asked.append(kw["return_lse"]) or real(*a, **kw))
    q, k, v = make_qkv(1, 2, S, 16, seed=5)
    kw = dict(method="asymrnr", grid=GRID, q_ratio=0.5, kv_ratio=0.3)
    attnlib.attention(q, k, v, **kw)
    attnlib.attention(q, k, v, return_lse=True, **kw)
    assert asked == [False, True]


def test_opcheck_and_compile_fullgraph():
    from attnlib import ops

    q, k, v = make_qkv(1, 2, 12, 8, dtype=torch.float64, requires_grad=True, seed=18)
    opts = dict(grid=(2, 2, 3), q_ratio=0.5, kv_ratio=0.5)
    torch.library.opcheck(ops.attention_op, (q, k, v), dict(
        method="asymrnr", backend="torch", layout="bhsd", causal=False, scale=None, return_lse=True,
        needs_grad=True, **ops.op_arguments("asymrnr", opts)))
    torch._dynamo.reset()
    f = lambda q, k, v: attnlib.attention(q, k, v, method="asymrnr", layout="bshd", backend="torch", **opts)
    qs, ks, vs = (t.detach().float().transpose(1, 2).contiguous() for t in (q, k, v))
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(qs, ks, vs)
    assert torch.equal(got, f(qs, ks, vs))


def test_better_than_random_dropping_on_video_latents():
    from bench.bench_asymrnr import CPU_EVAL, evaluate

    rows = evaluate(CPU_EVAL["grid"], heads=CPU_EVAL["heads"], head_dim=CPU_EVAL["head_dim"], backend="torch")
    by = {(r["q_ratio"], r["kv_ratio"], r["method"]): r for r in rows}
    for rq, rkv in [(0.3, 0.3), (0.5, 0.5), (0.7, 0.7), (0.5, 0.3)]:
        a, b = by[rq, rkv, "asymrnr"], by[rq, rkv, "random"]
        assert a["rel_l1"] <= 0.8 * b["rel_l1"], (rq, rkv, a, b)
        assert a["cos_sim"] >= b["cos_sim"] + 0.05, (rq, rkv, a, b)


def test_bench_providers_run_on_cpu():
    from bench import runner
    from bench.bench_asymrnr import CPU_CASE, TIMING_PROVIDERS, run_asymrnr_suite, summary_markdown

    case = runner.Case(**CPU_CASE)
    timing = runner.TimingConfig(target_s=0.0, min_reps=1, max_reps=1)
    for p in TIMING_PROVIDERS:
        if p.startswith("sdpa"):
            continue
        rec = runner.measure(p, case, timing=timing)
        assert rec["status"] == "ok", rec
    res = run_asymrnr_suite(device="cpu", log=None)
    assert len(res["accuracy"]) == 8 and "| 0.5 | 0.3 |" in summary_markdown(res)


def test_bench_cache_provider_refreshes_once_per_step(monkeypatch):
    """attnlib-asymrnr-cache<n>: each timed step is n calls of which exactly the first matches
    (Q and V: two matchings), and time_ratios reports its time per call."""
    import attnlib.asymrnr.module as module
    from bench import runner
    from bench.bench_asymrnr import CACHE_STEPS, CPU_CASE, calls_per_step, time_ratios

    counted = {"match": 0}
    real = module.match

    def spy(*a, **k):
        counted["match"] += 1
        return real(*a, **k)

    monkeypatch.setattr(module, "match", spy)
    case = runner.Case(**CPU_CASE)
    q, k, v = runner.make_inputs(case)
    n = CACHE_STEPS[0]
    step = runner.PROVIDERS[f"attnlib-asymrnr-cache{n}"].make(case, q, k, v)
    for _ in range(3):
        before = counted["match"]
        step()
        assert counted["match"] - before == 2
    assert calls_per_step(f"attnlib-asymrnr-cache{n}") == n and calls_per_step("attnlib-asymrnr") == 1
    recs = [{"provider": "attnlib-auto", "shape": "s", "ms": 2.0, "status": "ok"},
            {"provider": f"attnlib-asymrnr-cache{n}", "shape": "s", "ms": 3.0 * n, "status": "ok"}]
    assert time_ratios(recs)[0]["ratio"] == 1.5


# ---------------------------------------------------------------------------------------------
# bad input
def call(**kw):
    q, k, v = make_qkv(1, 2, S, 8, seed=14)
    return attnlib.attention(q, k, v, method="asymrnr", backend="torch", **{"grid": GRID, **kw})


@pytest.mark.parametrize("kw,exc,word", [
    (dict(grid=(3, 4, 6)), ValueError, "grid"),
    (dict(grid=(3, 4)), TypeError, "grid"),
    (dict(grid=(3, 0, 5)), ValueError, "grid"),
    (dict(stride=(2, 2)), TypeError, "stride"),
    (dict(q_ratio=1.5), ValueError, "q_ratio"),
    (dict(kv_ratio="a"), TypeError, "kv_ratio"),
    (dict(metric="l1"), ValueError, "metric"),
    (dict(mode="drop"), ValueError, "mode"),
    (dict(text_tokens=-1), ValueError, "text_tokens"),
    (dict(text_tokens=3), ValueError, "text_tokens"),  # 60 + 3 != 60
    (dict(text_side="middle"), ValueError, "text_side"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(inner_method="linear"), ValueError, "inner_method"),
    (dict(block_size=(64, 64)), TypeError, "block_size"),
])
def test_bad_options(kw, exc, word):
    with pytest.raises(exc, match=word):
        call(**kw)


def test_bad_calls():
    q, k, v = make_qkv(1, 2, S, 8, seed=15)
    with pytest.raises(TypeError, match="grid"):
        attnlib.attention(q, k, v, method="asymrnr")
    with pytest.raises(attnlib.NoKernelError, match="causal"):
        attnlib.attention(q, k, v, method="asymrnr", grid=GRID, causal=True, backend="torch")
    k2, v2 = make_qkv(1, 2, S, 8, seq_k=S + 4, seed=16)[1:]
    with pytest.raises(ValueError, match="self-attention"):
        attnlib.attention(q, k2, v2, method="asymrnr", grid=GRID, backend="torch")
    with pytest.raises(ValueError, match="grid"):
        AsymRnR(GRID).attention(*make_qkv(1, 2, S + 1, 8, seed=17))
    with pytest.raises(TypeError, match="q_ratio table keys"):
        AsymRnR(GRID, q_ratio={0: 0.5})
    with pytest.raises(ValueError, match="text_tokens slice"):
        AsymRnR(GRID, text_tokens=slice(2, 5))
    with pytest.raises(ValueError, match="cache_steps"):
        AsymRnR(GRID, cache_steps=0)
    with pytest.raises(ValueError, match="method"):
        AsymRnR(GRID, method="linear")
    with pytest.raises(ValueError, match="backend"):
        AsymRnR(GRID, backend="cuda")
    with pytest.raises(ValueError, match="partition"):
        match(q, partition((2, 2, 2)))
