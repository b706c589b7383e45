"""flash_attn_with_kvcache on attnlib: the cache after an append (every element, written by a loop
here) and the output and lse against the float64 reference, on contiguous caches (with and without
cache_batch_idx) and paged ones with a shuffled block_table, rotary embedding in both styles
(checked against a complex-number rotation written here), and each refusal."""
from __future__ import annotations

import pytest
import torch

from attnlib.compat import flash_attn as fa
from attnlib.reference import flash_reference
from attnlib.testing import assert_flash_rule

BATCH, HEADS, HEADS_K, DIM, ROTARY_DIM = 3, 4, 2, 16, 8
CAPACITY, PAGE = 40, 16
CACHE_ROWS = 5  # more cache rows than batch rows: cache_batch_idx picks some


def rotary_reference(x, cos, sin, interleaved):
    """Rotary embedding as a complex multiplication by cos + i sin, in float64: x (..., D), cos/sin
    (..., rotary_dim / 2). Interleaved pairs channels (2i, 2i + 1), GPT-NeoX pairs (i, i + rotary_dim / 2)."""
    x = x.double()
    r = 2 * cos.shape[-1]
    if interleaved:
        pairs = x[..., :r].reshape(*x.shape[:-1], r // 2, 2)
    else:
        pairs = torch.stack((x[..., :r // 2], x[..., r // 2:r]), dim=-1)
    z = torch.view_as_complex(pairs.contiguous()) * torch.complex(cos.double(), sin.double())
    rotated = torch.view_as_real(z)
    rotated = rotated.flatten(-2) if interleaved else torch.cat((rotated[..., 0], rotated[..., 1]), dim=-1)
    return torch.cat((rotated, x[..., r:]), dim=-1)


class Cache:
    """A KV cache in one of three layouts, addressed by (batch row, position) through slot()."""

    def __init__(self, layout, dtype, gen):
        self.layout = layout
        if layout == "paged":
            blocks_per_row = -(-CAPACITY // PAGE)
            blocks = BATCH * blocks_per_row + 2  # two pages no row uses: they must stay untouched
            self.table = torch.randperm(blocks, generator=gen)[:BATCH * blocks_per_row].view(BATCH, -1).int()
            shape = (blocks, PAGE)
            self.capacity = blocks_per_row * PAGE
        else:
            self.rows = (torch.randperm(CACHE_ROWS, generator=gen)[:BATCH] if layout == "batch_idx"
                         else torch.arange(BATCH)).int()
            shape = (CACHE_ROWS, CAPACITY)
            self.capacity = CAPACITY
        self.k = torch.randn(*shape, HEADS_K, DIM, generator=gen).to(dtype)
        self.v = torch.randn(*shape, HEADS_K, DIM, generator=gen).to(dtype)

    def kwargs(self):
        if self.layout == "paged":
            return {"block_table": self.table}
        return {"cache_batch_idx": self.rows} if self.layout == "batch_idx" else {}

    def slot(self, b, t):
        if self.layout == "paged":
            return int(self.table[b, t // PAGE]), t % PAGE
        return int(self.rows[b]), t


def expected_call(cache, q, k, v, lengths, cos, sin, interleaved, causal, scale):
    """What flash_attn_with_kvcache must do, element by element: the caches after the append and,
    from them, (out, lse) of the float64 reference and of the reference on inputs in their dtype
    (rotated q rounded to it: the error a user already accepts)."""
    k_cache, v_cache = cache.k.clone(), cache.v.clone()
    new = k.shape[1]
    if cos is not None:  # k at positions lengths[b] + j; q the same if causal, else all at lengths[b]
        positions = torch.tensor(lengths)[:, None] + torch.arange(new)
        k = rotary_reference(k, cos[positions][:, :, None], sin[positions][:, :, None], interleaved).to(k.dtype)
        q_pos = (torch.tensor(lengths)[:, None] + (torch.arange(q.shape[1]) if causal else 0)).expand(-1, q.shape[1])
        q = rotary_reference(q, cos[q_pos][:, :, None], sin[q_pos][:, :, None], interleaved)
    for b in range(BATCH):
        for j in range(new):
            k_cache[cache.slot(b, lengths[b] + j)] = k[b, j]
            v_cache[cache.slot(b, lengths[b] + j)] = v[b, j]
    outs, lses, base_outs = [], [], []
    for b in range(BATCH):
        keys = torch.stack([k_cache[cache.slot(b, t)] for t in range(lengths[b] + new)] or
                           [k_cache.new_zeros(0, HEADS_K, DIM)]).reshape(-1, HEADS_K, DIM)
        values = torch.stack([v_cache[cache.slot(b, t)] for t in range(lengths[b] + new)] or
                             [v_cache.new_zeros(0, HEADS_K, DIM)]).reshape(-1, HEADS_K, DIM)
        bhsd = lambda x, dt: x.transpose(0, 1)[None].to(dt)  # noqa: E731
        out, lse = flash_reference(bhsd(q[b], torch.float64), bhsd(keys, torch.float64), bhsd(values, torch.float64),
                                   causal=causal, scale=scale, return_lse=True)
        base, base_lse = flash_reference(bhsd(q[b], k.dtype), bhsd(keys, k.dtype), bhsd(values, k.dtype),
                                         causal=causal, scale=scale, return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
        base_outs.append((base[0].transpose(0, 1), base_lse[0]))
    base_out, base_lse = (torch.stack(t) for t in zip(*base_outs))
    return k_cache, v_cache, (torch.stack(outs), torch.stack(lses)), (base_out, base_lse)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("rotary", [None, "interleaved", "neox"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "paged"])
def test_append_and_attend(layout, dtype, rotary, causal):
    seed = torch.randint(0, 2**31, ()).item()
    print(f"seed {seed}")  # fresh inputs each run; pytest shows this on a failure
    gen = torch.Generator().manual_seed(seed)
    cache = Cache(layout, dtype, gen)
    seq_q = new = 3
    lengths = [0, 17, cache.capacity - new]  # an empty row, one across a page boundary, one filled up
    q = torch.randn(BATCH, seq_q, HEADS, DIM, generator=gen).to(dtype)
    k = torch.randn(BATCH, new, HEADS_K, DIM, generator=gen).to(dtype)
    v = torch.randn(BATCH, new, HEADS_K, DIM, generator=gen).to(dtype)
    cos = sin = None
    if rotary:
        theta = torch.rand(cache.capacity, ROTARY_DIM // 2, generator=gen) * 6.3
        cos, sin = theta.cos().to(dtype), theta.sin().to(dtype)
    scale = 0.3
    k_cache, v_cache, (ref, ref_lse), (base, base_lse) = expected_call(
        cache, q, k, v, lengths, cos, sin, rotary == "interleaved", causal, scale)
    out, lse = fa.flash_attn_with_kvcache(q, cache.k, cache.v, k, v, rotary_cos=cos, rotary_sin=sin,
                                          cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
                                          softmax_scale=scale, causal=causal, rotary_interleaved=rotary != "neox",
                                          return_softmax_lse=True, **cache.kwargs())
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (BATCH, HEADS, seq_q)
    assert lse.dtype == torch.float32 and lse.is_contiguous()
    assert torch.equal(cache.v, v_cache)
    if rotary is None:
        assert torch.equal(cache.k, k_cache)
    else:  # the appended keys within a rounding of the float64 rotation, everything else equal
        written = torch.zeros(cache.k.shape[:2], dtype=torch.bool)
        for b in range(BATCH):
            for j in range(new):
                written[cache.slot(b, lengths[b] + j)] = True
        assert torch.equal(cache.k[~written], k_cache[~written])
        tol = 1e-5 if dtype == torch.float32 else 4e-3
        assert_flash_rule(cache.k[written], k_cache[written].double(), k_cache[written], atol=tol, name="k_cache")
    assert_flash_rule(out, ref, base)
    assert_flash_rule(lse, ref_lse, base_lse, atol=1e-4 if dtype == torch.float16 else 1e-5, name="lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_decode_int_seqlens_full_cache_and_mqa(dtype):
    """Sq = 1 decoding with MQA: cache_seqlens as an int (every row), None (every row full) and 0
    without an append (no key: output 0, lse -inf), the cache unchanged without k/v."""
    seed = torch.randint(0, 2**31, ()).item()
    print(f"seed {seed}")  # fresh inputs each run; pytest shows this on a failure
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 1, 4, DIM, generator=gen).to(dtype)
    k_cache, v_cache = (torch.randn(2, 9, 1, DIM, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(2, 1, 1, DIM, generator=gen).to(dtype) for _ in range(2))

    def reference(keys, values, length):
        t = lambda x, dt: x.transpose(1, 2).to(dt)  # noqa: E731
        ref = flash_reference(*(t(x, torch.float64) for x in (q, keys[:, :length], values[:, :length])))
        base = flash_reference(*(t(x, dtype) for x in (q, keys[:, :length], values[:, :length])))
        return ref.transpose(1, 2), base.transpose(1, 2)

    before = k_cache.clone(), v_cache.clone()
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, causal=True)  # None: all 9 positions
    assert_flash_rule(out, *reference(k_cache, v_cache, 9))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=0, return_softmax_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=6, causal=True)
    want_k, want_v = before[0].clone(), before[1].clone()
    want_k[:, 6], want_v[:, 6] = k[:, 0], v[:, 0]
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert_flash_rule(out, *reference(want_k, want_v, 7))


def test_windows_equal_to_causal_or_full_and_num_splits_are_accepted():
    """Window bounds are compared with the cache's capacity (10 here), as flash_attn does."""
    q = torch.randn(2, 3, 2, DIM)
    k_cache, v_cache = torch.randn(2, 10, 2, DIM), torch.randn(2, 10, 2, DIM)
    lens = torch.tensor([4, 10], dtype=torch.int32)
    causal = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True)
    full = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    assert not torch.equal(full, causal)
    for window, flag, want in [((-1, 0), False, causal), ((10, 0), False, causal), ((-1, 5), True, causal),
                               ((10, 10), False, full), ((-1, -1), False, full)]:
        got = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, window_size=window, causal=flag,
                                         num_splits=4)
        assert torch.equal(got, want), (window, flag)


def refusal_inputs():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 4, DIM, generator=gen)
    k_cache, v_cache = torch.randn(3, 8, 2, DIM, generator=gen), torch.randn(3, 8, 2, DIM, generator=gen)
    k, v = torch.randn(2, 2, 2, DIM, generator=gen), torch.randn(2, 2, 2, DIM, generator=gen)
    lens = torch.tensor([1, 3], dtype=torch.int32)
    return {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v, "cache_seqlens": lens}


i32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
ROT = torch.ones(8, 4)

REFUSALS = [
    ({"cache_leftpad": i32(0, 0)}, ValueError, "cache_leftpad"),
    ({"softcap": 5.0}, ValueError, "softcap"),
    ({"alibi_slopes": torch.ones(4)}, ValueError, "alibi_slopes"),
    ({"window_size": (3, 0)}, ValueError, "window_size.*no sliding-window kernels"),
    ({"window_size": (2, 5)}, ValueError, "window_size.*no sliding-window kernels"),
    ({"softmax_scale": -1.0}, ValueError, "softmax_scale"),
    ({"causal": 1}, TypeError, "causal must be a bool"),
    ({"num_splits": "auto"}, TypeError, "num_splits"),
    ({"cache_seqlens": i32(1, 7)}, ValueError, "cache_seqlens"),  # 7 + 2 new > 8 positions
    ({"cache_seqlens": 7}, ValueError, "cache_seqlens"),
    ({"cache_seqlens": i32(-1, 0)}, ValueError, "cache_seqlens"),
    ({"cache_seqlens": None}, ValueError, "cache_seqlens: appending k/v needs cache_seqlens"),
    ({"cache_seqlens": torch.tensor([1, 3])}, TypeError, "cache_seqlens must have dtype torch.int32"),
    ({"cache_seqlens": i32(1, 3, 0)}, ValueError, "cache_seqlens must have shape"),
    ({"cache_seqlens": 1.0}, TypeError, "cache_seqlens must be None, an int"),
    ({"cache_seqlens": i32(1, 3).to("meta")}, ValueError, "cache_seqlens must be on the device of q"),
    ({"cache_batch_idx": i32(0, 3)}, ValueError, "cache_batch_idx"),
    ({"cache_batch_idx": torch.tensor([0, 1])}, TypeError, "cache_batch_idx must have dtype torch.int32"),
    ({"cache_batch_idx": i32(0)}, ValueError, "cache_batch_idx must have shape"),
    ({"block_table": i32([0], [1]), "cache_batch_idx": i32(0, 1)}, ValueError, "cache_batch_idx: a paged"),
    ({"block_table": torch.tensor([[0], [1]])}, TypeError, "block_table must have dtype torch.int32"),
    ({"block_table": i32([0], [3])}, ValueError, "block_table: the blocks rows read"),
    ({"block_table": i32([0, 1])}, ValueError, "block_table must have shape"),
    ({"block_table": i32([0], [1], [2])}, ValueError, "block_table must have shape"),
    ({"k_cache": torch.randn(1, 8, 2, DIM), "v_cache": torch.randn(1, 8, 2, DIM)}, ValueError, "k_cache: batch rows"),
    ({"k": None}, ValueError, "k and v: pass both"),
    ({"k": torch.randn(2, 2, 1, DIM)}, ValueError, "k must have shape"),
    ({"v": torch.randn(2, 3, 2, DIM)}, ValueError, "v must have shape"),
    ({"k": torch.randn(2, 2, 2, DIM).half()}, TypeError, "k must have q's dtype"),
    ({"k_cache": torch.randn(3, 8, 2, DIM).half()}, TypeError, "k_cache must have q's dtype"),
    ({"v_cache": torch.randn(3, 9, 2, DIM)}, ValueError, "v_cache must have k_cache's shape"),
    ({"q": torch.randn(2, 2, 3, DIM)}, ValueError, "multiple of k_cache's heads"),
    ({"q": torch.randn(2, 2, 4, 8)}, ValueError, "head_dim"),
    ({"q": torch.randn(2, 4, DIM)}, ValueError, "q must have shape"),
    ({"q": torch.randn(2, 2, 4, DIM).int()}, TypeError, "q must be float16"),
    ({"q": torch.randn(0, 2, 4, DIM)}, ValueError, "at least one batch row"),
    ({"k_cache": [1]}, TypeError, "k_cache must be a torch.Tensor"),
    ({"rotary_cos": ROT}, ValueError, "rotary_cos and rotary_sin: pass both"),
    ({"rotary_cos": ROT, "rotary_sin": ROT, "k": None, "v": None}, ValueError, "rotary_cos: rotary embedding applies"),
    ({"rotary_cos": torch.ones(8, 9), "rotary_sin": torch.ones(8, 9)}, ValueError, "rotary_dim"),
    ({"rotary_cos": ROT[:4], "rotary_sin": ROT[:4]}, ValueError, "rotary_cos: 4 positions"),
    ({"rotary_cos": ROT, "rotary_sin": ROT[:, :2]}, ValueError, "rotary_sin must have rotary_cos's shape"),
    ({"rotary_cos": ROT.int(), "rotary_sin": ROT.int()}, TypeError, "rotary_cos must be a floating-point"),
]


@pytest.mark.parametrize("change,error,match", REFUSALS, ids=[str(i) for i in range(len(REFUSALS))])
def test_refusals_name_the_argument_and_leave_the_cache_alone(change, error, match):
    args = refusal_inputs()
    args.update(change)
    caches = {name: args[name].clone() for name in ("k_cache", "v_cache") if isinstance(args[name], torch.Tensor)}
    with pytest.raises(error, match=match):
        fa.flash_attn_with_kvcache(**args)
    for name, before in caches.items():
        assert torch.equal(args[name], before), f"{name} was written before the refusal"


def test_lengths_are_read_to_the_host_once(monkeypatch):
    """The cache lengths are read and checked on the host once (_cache_lengths); the packed
    cu_seqlens built from them are not read back by the varlen call (on a GPU that was a second
    synchronisation per decoding step). Direct flash_attention_varlen calls still check them."""
    from attnlib import varlen

    reads = []
    real = varlen._check_cu_values
    monkeypatch.setattr(varlen, "_check_cu_values", lambda *a: reads.append(a) or real(*a))
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    q = torch.randn(2, 1, 4, DIM, generator=gen)
    k_cache, v_cache = (torch.randn(2, 9, 2, DIM, generator=gen) for _ in range(2))
    lengths = torch.tensor([3, 7], dtype=torch.int32)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)
    assert reads == []
    t = lambda x, n: x[:, :n].transpose(1, 2).double()  # noqa: E731
    for b, n in enumerate(lengths.tolist()):
        ref = flash_reference(t(q[b:b + 1], 1), t(k_cache[b:b + 1], n), t(v_cache[b:b + 1], n))
        torch.testing.assert_close(out[b:b + 1].double(), ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    varlen.flash_attention_varlen(q.view(2, 4, DIM), k_cache[0, :2], v_cache[0, :2], cu, cu, 1, 1)
    assert len(reads) == 1


@pytest.mark.parametrize("window", [(-1, 5), (9, -1)])
def test_rotary_q_positions_are_consecutive_for_local_windows_that_cut_nothing(window):
    """flash_attn rotates q at cache_seqlens + i when causal or local, local meaning a window bound
    below its seqlen_k (the cache's capacity, 10 here), even one that cuts no key (attention is then
    full): here the same call as on inputs rotated that way beforehand, without window or rotary."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, 2, DIM, generator=gen) for _ in range(3))
    k_cache, v_cache = torch.randn(2, 10, 2, DIM, generator=gen), torch.randn(2, 10, 2, DIM, generator=gen)
    lens = [2, 5]
    angles = torch.rand(16, DIM // 2, generator=gen) * 6.28
    cos, sin = angles.cos(), angles.sin()
    pos = torch.tensor(lens)[:, None] + torch.arange(3)
    q_rot, k_rot = (rotary_reference(t, cos[pos][:, :, None], sin[pos][:, :, None], True).float() for t in (q, k))
    kc, vc = k_cache.clone(), v_cache.clone()
    want = fa.flash_attn_with_kvcache(q_rot, kc, vc, k_rot, v, cache_seqlens=torch.tensor(lens, dtype=torch.int32))
    got = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                     cache_seqlens=torch.tensor(lens, dtype=torch.int32), window_size=window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache, kc, atol=1e-6, rtol=1e-6)


def test_a_backend_that_cannot_run_the_call_raises_before_the_cache_is_written():
    import attnlib
    q, k, v = (torch.randn(2, 1, 2, DIM) for _ in range(3))
    k_cache, v_cache = torch.randn(2, 10, 2, DIM), torch.randn(2, 10, 2, DIM)
    before = k_cache.clone(), v_cache.clone()
    with attnlib.use_backend("cuda"), pytest.raises(attnlib.NoKernelError):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=3)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
