"""Triton flash kernel (flash-triton): forward, backward, lse, layouts, GQA, masking, dispatch.

On CPU these run under TRITON_INTERPRET=1 at small shapes; tests marked gpu (bf16, hd256,
32k sequences) run only with a CUDA device. Accuracy follows flash_attn's rule: error against
the float64 reference at most 2x (gradients 3x) PyTorch's own error in the kernel's dtype.
"""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.reference import flash_reference
from attnlib.reference._common import causal_mask
from attnlib.testing import assert_flash_rule, input_grads, make_qkv, poison_

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float16, torch.float32]  # bf16 tl.dot is wrong in the interpreter: gpu tests


@pytest.fixture(autouse=True)
def _release_cuda_cache():
    """The gpu tests below peak at 10-25 GB (float64 references with autograd at 4k-16k tokens,
    the 4.6 GB key buffer, the 2**31-element q). torch's caching allocator keeps that reserved in
    the test's process; with the xdist workers of bench/gpu_check.py sharing one card, what each
    worker holds adds up past its memory. Hand it back after every test."""
    yield
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def torch_same_dtype(q, k, v, *, causal: bool, scale: float):
    """Plain PyTorch math in the inputs' own dtype (the error users already accept): (out, lse).
    Rows with no visible key give 0 and -inf; masked scores use the dtype's min, not -inf, so
    such rows have no NaN in their gradients either."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
    if causal:
        visible = causal_mask(q.shape[2], k.shape[2], q.device)
    scores = scores.masked_fill(~visible, torch.finfo(q.dtype).min)
    has_key = visible.any(-1)[:, None]
    out = torch.where(has_key, scores.softmax(-1) @ v, torch.zeros((), dtype=q.dtype, device=q.device))
    lse = torch.where(has_key[:, 0], torch.logsumexp(scores, -1).float(), float("-inf"))
    return out, lse


def check_against_reference(q, k, v, *, causal: bool, layout: str = "bhsd", backward: bool = True,
                            backend: str = "auto", deterministic: bool = True):
    """Run attnlib (auto dispatch, or the backend named) on q, k, v and hold output, lse and
    gradients to the rule."""
    scale = q.shape[-1] ** -0.5
    to_bhsd = (lambda x: x) if layout == "bhsd" else (lambda x: x.transpose(1, 2))
    out, lse = attnlib.flash_attention(q, k, v, causal=causal, layout=layout, return_lse=True, backend=backend,
                                       deterministic=deterministic)
    qb, kb, vb = (to_bhsd(t) for t in (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (qb, kb, vb)]
    ref, ref_lse = flash_reference(*leaves, causal=causal, scale=scale, return_lse=True)
    same = [t.detach().clone().requires_grad_() for t in (qb, kb, vb)]
    base, base_lse = torch_same_dtype(*same, causal=causal, scale=scale)
    assert_flash_rule(to_bhsd(out), ref, base, name="out")
    assert_flash_rule(lse, ref_lse, base_lse, atol=1e-4 if q.dtype == torch.float16 else 2e-5, name="lse")
    if not backward:
        return
    dout = torch.randn_like(out)
    got = input_grads(out, (q, k, v), dout)
    want = input_grads(ref, leaves, to_bhsd(dout).double())
    have = input_grads(base, same, to_bhsd(dout))
    for name, g, w, h in zip(("dq", "dk", "dv"), got, want, have):
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        assert_flash_rule(to_bhsd(g), w, h, factor=3.0, name=name)


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, layout)
CASES = [
    (1, 2, 2, 1, 1, 64, False, "bhsd"),
    (1, 2, 2, 17, 17, 64, True, "bshd"),
    (2, 2, 2, 113, 113, 64, False, "bhsd"),
    (1, 2, 2, 129, 129, 64, True, "bhsd"),
    (1, 4, 1, 33, 70, 40, True, "bshd"),     # MQA, seq_q < seq_k, head-dim tail
    (1, 4, 1, 70, 33, 72, True, "bhsd"),     # seq_q > seq_k: rows with no visible key
    (1, 8, 2, 47, 47, 64, False, "bshd"),    # GQA 4:1
    (1, 8, 2, 40, 90, 40, True, "bhsd"),
    (1, 2, 2, 17, 113, 72, False, "bhsd"),
]


def case_id(c) -> str:
    return "b{}h{}kv{}q{}k{}d{}{}-{}".format(c[0], c[1], c[2], c[3], c[4], c[5], "-causal" if c[6] else "", c[7])


@pytest.fixture
def triton_runs(monkeypatch):
    """Records each call of flash-triton's forward and backward, so a test sees which kernel ran
    (on a GPU, auto dispatch may pick another kernel: the tests name backend="triton").

    Wraps the registered instance's methods through its __dict__ (setitem: undone by deleting the
    entry), not the class: pytest < 9.2's monkeypatch.setattr on an instance (test_dispatch's
    fixtures) leaves the bound method in the instance's __dict__ on undo, which shadows any later
    patch of the class for the rest of the worker (on the H100, every test_forward_backward after
    test_training_on_gpu_runs_the_kernel_explain_names on the same xdist worker saw ['bwd'])."""
    from attnlib import dispatch
    from attnlib.kernels.flash_triton import FlashTriton

    runs = []
    kernel = next(k for k in dispatch.kernels("flash") if isinstance(k, FlashTriton))
    for name, tag in (("forward", "fwd"), ("backward", "bwd")):
        real = getattr(kernel, name)  # bound method, or what an earlier patch left on the instance
        monkeypatch.setitem(vars(kernel), name,
                            (lambda real, tag: lambda *a, **kw: runs.append(tag) or real(*a, **kw))(real, tag))
    return runs


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward(case, dtype, triton_runs):
    b, hq, hkv, sq, sk, d, causal, layout = case
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, dtype=dtype, device=DEVICE, layout=layout,
                       requires_grad=True, seed=sq * 1000 + sk)
    if DEVICE == "cpu":  # under the interpreter auto dispatch must pick the Triton kernel
        assert attnlib.explain(q, k, v, causal=causal, layout=layout).chosen.name == "flash-triton"
    check_against_reference(q, k, v, causal=causal, layout=layout, backend="triton")
    assert triton_runs == ["fwd", "bwd"]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES[1:], ids=case_id)
def test_forward_backward_atomic_dq(case, dtype, dq_launches):
    """deterministic=False: dQ is added with atomics inside the dK/dV kernel, no dQ kernel runs;
    the same accuracy rule against the float64 reference."""
    b, hq, hkv, sq, sk, d, causal, layout = case
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, dtype=dtype, device=DEVICE, layout=layout,
                       requires_grad=True, seed=sq * 1000 + sk + 1)
    check_against_reference(q, k, v, causal=causal, layout=layout, backend="triton", deterministic=False)
    assert dq_launches == ["dkdv+dq"]


@pytest.fixture
def dq_launches(monkeypatch):
    """Names the backward's dQ launches: "dq" for the dQ kernel, "dkdv+dq" for the atomic path,
    with the atomic path switched on (ATTNLIB_FLASH_ATOMIC_DQ=1; deterministic=False alone keeps
    the dQ kernel, measured faster)."""
    import attnlib.triton_kernels.flash.backward as bw

    monkeypatch.setenv("ATTNLIB_FLASH_ATOMIC_DQ", "1")
    launches = []
    real_dq, real_dkdv = bw.bwd_dq, bw.bwd_dkdv
    monkeypatch.setattr(bw, "bwd_dq", lambda *a, **kw: launches.append("dq") or real_dq(*a, **kw))
    monkeypatch.setattr(bw, "bwd_dkdv", lambda *a, **kw: (
        launches.append("dkdv+dq") if kw.get("dq_acc") is not None else None) or real_dkdv(*a, **kw))
    return launches


def test_deterministic_algorithms_keep_the_dq_kernel(dq_launches):
    """torch.use_deterministic_algorithms(True) overrides deterministic=False."""
    q, k, v = make_qkv(1, 2, 19, 32, device=DEVICE, requires_grad=True, seed=21)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        attnlib.flash_attention(q, k, v, backend="triton", deterministic=False).sum().backward()
    finally:
        torch.use_deterministic_algorithms(before)
    assert dq_launches == ["dq"]
    attnlib.flash_attention(q, k, v, backend="triton", deterministic=False).sum().backward()
    assert dq_launches == ["dq", "dkdv+dq"]
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        attnlib.flash_attention(q, k, v, backend="triton", deterministic=1)


def test_atomic_dq_only_when_switched_on(dq_launches, monkeypatch):
    """deterministic=False permits the atomic path; without ATTNLIB_FLASH_ATOMIC_DQ=1 the backward
    keeps the dQ kernel (the atomic path measured 1.17-1.42x slower on an H200)."""
    q, k, v = make_qkv(1, 2, 19, 32, device=DEVICE, requires_grad=True, seed=23)
    monkeypatch.delenv("ATTNLIB_FLASH_ATOMIC_DQ")
    attnlib.flash_attention(q, k, v, backend="triton", deterministic=False).sum().backward()
    assert dq_launches == ["dq"]
    monkeypatch.setenv("ATTNLIB_FLASH_ATOMIC_DQ", "1")
    attnlib.flash_attention(q, k, v, backend="triton", deterministic=False).sum().backward()
    assert dq_launches == ["dq", "dkdv+dq"]


def test_flash_cuda_backward_passes_the_option(monkeypatch):
    """flash-cuda (auto's choice on a GPU where it fits) runs the Triton backward: the option
    must reach it too, not only flash-triton's."""
    from attnlib.kernels import flash_cuda

    seen = []
    monkeypatch.setattr(flash_cuda, "_triton_backward",
                        lambda: lambda *a, **kw: seen.append(kw["deterministic"]) or (a[1], a[2], a[3]))
    q, k, v = make_qkv(1, 2, 8, 16, device=DEVICE, seed=22)
    for det in (False, True):
        inp = attnlib.api.build_inputs(q, k, v, method="flash", deterministic=det)
        flash_cuda.FLASH_CUDA.backward(inp, q, torch.zeros(1, 2, 8), q, None)
    assert seen == [False, True]


def test_atomic_dq_ignores_padded_keys_with_huge_probabilities(dq_launches):
    """Scores all near -120 put lse near -120, so a key row past seq_k (loaded as 0, score 0) gets
    p = exp(120) = inf in fp32: its dS must be zeroed before dS K, or inf * 0 makes dQ NaN.
    seq_k = 37 leaves a partial key block under every config."""
    gen = torch.Generator().manual_seed(8)
    q = (4.0 + 0.1 * torch.randn(1, 2, 21, 64, generator=gen)).to(DEVICE).requires_grad_()
    k = (-4.0 + 0.1 * torch.randn(1, 2, 37, 64, generator=gen)).to(DEVICE).requires_grad_()
    v = torch.randn(1, 2, 37, 64, generator=gen).to(DEVICE).requires_grad_()
    out, lse = attnlib.flash_attention(q, k, v, backend="triton", return_lse=True, deterministic=False)
    assert lse.max() < -100, "the inputs no longer make lse very negative"
    dout = torch.randn_like(out)
    got = input_grads(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = input_grads(flash_reference(*leaves), leaves, dout.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        torch.testing.assert_close(g.double(), w, atol=2e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    assert dq_launches == ["dkdv+dq"]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_is_deterministic(causal, triton_runs):
    """Two backward passes over the same inputs give bitwise identical gradients: dK/dV sum the
    GQA group inside one program, dQ is one program per query block (no atomics anywhere)."""
    q, k, v = make_qkv(1, 4, 45, 40, kv_heads=2, seq_k=37, dtype=torch.float16, device=DEVICE,
                       requires_grad=True, seed=12)
    dout = torch.randn(1, 4, 45, 40, generator=torch.Generator().manual_seed(13)).to(DEVICE, torch.float16)
    runs = [input_grads(attnlib.flash_attention(q, k, v, causal=causal, backend="triton"), (q, k, v), dout)
            for _ in range(2)]
    assert triton_runs == ["fwd", "bwd"] * 2
    for name, a, b in zip(("dq", "dk", "dv"), *runs):
        assert torch.equal(a, b), f"{name} differs between two backward runs"


def test_strided_views_with_storage_offset():
    """q, k, v sliced out of one packed (B, S, 3, H, D+8) buffer: offsets and odd strides, no copy."""
    gen = torch.Generator().manual_seed(7)
    packed = torch.randn(1, 37, 3, 2, 72, generator=gen).to(DEVICE)
    q, k, v = (packed[:, :, i, :, 8:].detach().requires_grad_() for i in range(3))
    assert q.storage_offset() != 0 and not q.is_contiguous()
    check_against_reference(q, k, v, causal=True, layout="bshd")


def test_rows_without_keys_are_zero_with_zero_gradient():
    q, k, v = make_qkv(1, 2, 40, 64, seq_k=9, device=DEVICE, requires_grad=True, seed=3)
    out, lse = attnlib.flash_attention(q, k, v, causal=True, return_lse=True)
    empty = 40 - 9  # query i sees keys j <= i - 31
    assert torch.all(out[:, :, :empty] == 0)
    assert torch.all(lse[:, :, :empty] == float("-inf"))
    assert torch.isfinite(lse[:, :, empty:]).all()
    out.sum().backward()
    assert torch.all(q.grad[:, :, :empty] == 0)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_lse_gradient(dtype):
    """A loss that uses lse too: its gradient folds into the backward's delta term."""
    q, k, v = make_qkv(1, 4, 23, 40, kv_heads=2, seq_k=31, dtype=dtype, device=DEVICE, requires_grad=True, seed=4)
    out, lse = attnlib.flash_attention(q, k, v, causal=True, return_lse=True)
    assert lse.requires_grad and lse.dtype == torch.float32
    w = torch.randn_like(lse)
    got = input_grads(out.float().sum() + (lse * w).sum(), (q, k, v), None)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = flash_reference(*leaves, causal=True, return_lse=True)
    want = input_grads(ref.sum() + (ref_lse * w.double()).sum(), leaves, None)
    same = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    base, base_lse = torch_same_dtype(*same, causal=True, scale=40 ** -0.5)
    have = input_grads(base.float().sum() + (base_lse * w).sum(), same, None)
    for name, g, wt, h in zip(("dq", "dk", "dv"), got, want, have):
        assert_flash_rule(g, wt, h, factor=3.0, name=name)


@pytest.mark.parametrize("causal", [False, True])
def test_launchers_write_every_element(causal):
    """Call the launchers with NaN-filled buffers: every output element must be written, with the
    float64 reference's value (causal, 37 queries over 21 keys: rows 0-15 see no key, so out 0,
    lse -inf and dq 0 there). fp32 errors here are ~1e-6."""
    from attnlib.testing import assert_verbose_allclose
    from attnlib.triton_kernels.flash.backward import bwd_dkdv, bwd_dq, bwd_preprocess
    from attnlib.triton_kernels.flash.forward import flash_fwd

    q, k, v = make_qkv(1, 4, 37, 40, kv_heads=2, seq_k=21, device=DEVICE, seed=5)
    out, lse = poison_(torch.empty_like(q)), poison_(torch.empty(q.shape[:3], device=q.device))
    flash_fwd(q, k, v, out, lse, causal=causal, scale=40 ** -0.5)
    assert torch.isfinite(out).all()
    assert not torch.isnan(lse).any()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = flash_reference(*leaves, causal=causal, scale=40 ** -0.5, return_lse=True)
    assert_verbose_allclose(out, ref, atol=1e-5, name="out")
    assert_verbose_allclose(lse, ref_lse, atol=1e-5, name="lse")  # -inf matches -inf
    dout = torch.randn_like(out)
    delta = poison_(torch.empty_like(lse))
    bwd_preprocess(out, dout, delta, None)
    assert torch.isfinite(delta).all()
    assert_verbose_allclose(delta, (dout.double() * out.double()).sum(-1), atol=1e-5, name="delta")
    dq, dk, dv = (poison_(torch.empty_like(t)) for t in (q, k, v))
    bwd_dkdv(q, k, v, dout, lse, delta, dk, dv, causal=causal, scale=40 ** -0.5, varlen=None)
    bwd_dq(q, k, v, dout, lse, delta, dq, causal=causal, scale=40 ** -0.5, varlen=None)
    want = input_grads(ref, leaves, dout.double())
    for name, t, w in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        assert torch.isfinite(t).all(), f"{name} not fully written"
        assert_verbose_allclose(t, w, atol=1e-5, name=name)


def test_autotune_key_separates_head_dims_and_dtypes():
    """The flash kernels re-tune per real head dim (72 and 96 share D_PAD 128), causal flag and
    dtype. The dtype comes from Triton itself: its Autotuner appends each tensor argument's
    dtype to the key (checked here on a two-config kernel with benchmarking stubbed out)."""
    import triton.language as tl

    from attnlib.triton_kernels.flash import backward, configs, forward

    for kernel in (forward.flash_fwd_kernel, backward.flash_bwd_dkdv_kernel, backward.flash_bwd_dq_kernel):
        assert kernel.keys == configs.AUTOTUNE_KEY
    assert {"HEAD_DIM", "CAUSAL", "VARLEN"} <= set(configs.AUTOTUNE_KEY)
    assert {"HEAD_DIM", "CAUSAL"} <= set(configs.TMA_AUTOTUNE_KEY)

    @triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=configs.AUTOTUNE_KEY)
    @triton.jit
    def scale2(X, n, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
               HAS_KEY_BIAS: tl.constexpr, BIAS_PER_HEAD: tl.constexpr, BLOCK: tl.constexpr):
        # every AUTOTUNE_KEY name is an argument: Triton 3.9's autotuner refuses key names a kernel lacks
        offs = tl.arange(0, BLOCK)
        tl.store(X + offs, tl.load(X + offs, mask=offs < n) * 2, mask=offs < n)

    scale2._bench = lambda *args, config, **kw: [float(config.kwargs["BLOCK"])]  # no GPU timing here
    for dtype in (torch.float16, torch.float32):
        for head_dim in (72, 96):
            scale2[(1,)](torch.ones(8, dtype=dtype, device=DEVICE), 8, HEAD_DIM=head_dim, D_PAD=128, CAUSAL=False,
                         VARLEN=False, HAS_KEY_BIAS=False, BIAS_PER_HEAD=False)
    assert len(scale2.cache) == 4, list(scale2.cache)
    assert {k[0] for k in scale2.cache} == {72, 96}
    assert {k[-1] for k in scale2.cache} == {"torch.float16", "torch.float32"}


def test_output_in_caller_layout():
    q, k, v = make_qkv(1, 2, 17, 64, layout="bshd", device=DEVICE, seed=6)
    out = attnlib.flash_attention(q, k, v, layout="bshd")
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype


def test_dispatcher_picks_flash_triton():
    q, k, v = make_qkv(1, 2, 16, 64, device=DEVICE)
    assert attnlib.explain(q, k, v).chosen.name == "flash-triton"
    assert attnlib.explain(q, k, v, causal=True, layout="bhsd").chosen.name == "flash-triton"


def test_rejections_have_reasons():
    q, k, v = make_qkv(1, 2, 16, 64, head_dim_v=32, device=DEVICE)
    reasons = attnlib.explain(q, k, v, backend="triton").reasons["flash-triton"]
    assert any("value head_dim 32" in r for r in reasons)
    q, k, v = make_qkv(1, 2, 16, 60, device=DEVICE)
    reasons = attnlib.explain(q, k, v, backend="triton").reasons["flash-triton"]
    assert any("head_dim 60" in r for r in reasons)
    # a strided last dim is no reason: the inputs are copied first (tests/test_strided_last_dim.py)
    q, k, v = make_qkv(1, 2, 16, 64, device=DEVICE)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)
    assert attnlib.explain(qt, k, v, backend="triton").chosen.name == "flash-triton"
    assert torch.equal(attnlib.flash_attention(qt, k, v, backend="triton"),
                       attnlib.flash_attention(q, k, v, backend="triton"))


# ---- forward on tensor descriptors (ATTNLIB_FLASH_TMA=1, forward_tma.py) ----------------------
# The Hopper variant must give the default forward's results wherever it runs, and the default
# kernel must take over (with a reason) wherever descriptors cannot express the inputs.
# the warp-specialized variant (one loop, every block masked): the interpreter's small tile, or an
# H100 candidate of configs.FWD_TMA_H100 on a GPU
WS_CONFIG = (32, 16, 1, 1, True) if DEVICE == "cpu" else (128, 64, 4, 3, True)
PRE_HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9
NEEDS_SM90 = pytest.mark.skipif(PRE_HOPPER, reason="tensor descriptors (TMA) need sm_90 or newer")


@pytest.fixture
def tma_launches(monkeypatch):
    """ATTNLIB_FLASH_TMA=1 for the test; the list records each launch of the descriptor forward."""
    from attnlib.triton_kernels.flash import forward_tma

    if PRE_HOPPER:
        pytest.skip("tensor descriptors (TMA) need sm_90 or newer")
    monkeypatch.setenv("ATTNLIB_FLASH_TMA", "1")
    calls, real = [], forward_tma.flash_fwd_tma

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(forward_tma, "flash_fwd_tma", spy)
    return calls


def check_forward(out, lse, q, k, v, *, causal: bool):
    """out, lse of bhsd q, k, v against the float64 reference with flash_attn's rule."""
    scale = q.shape[-1] ** -0.5
    ref, ref_lse = flash_reference(*(t.detach().double() for t in (q, k, v)), causal=causal, scale=scale,
                                   return_lse=True)
    base, base_lse = torch_same_dtype(*(t.detach() for t in (q, k, v)), causal=causal, scale=scale)
    assert_flash_rule(out, ref, base, name="out")
    assert_flash_rule(lse, ref_lse, base_lse, atol=1e-4 if q.dtype == torch.float16 else 2e-5, name="lse")


def _case_qkv(case, dtype, seed_extra=0):
    b, hq, hkv, sq, sk, d, causal, layout = case
    return make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, dtype=dtype, device=DEVICE, layout=layout,
                    seed=sq * 1000 + sk + seed_extra)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tma_forward(case, tma_launches):
    """The public API with ATTNLIB_FLASH_TMA=1 on fp16: the descriptor kernel runs, once."""
    causal, layout = case[6], case[7]
    q, k, v = _case_qkv(case, torch.float16)
    # backend forced here and below: on a GPU auto prefers flash-cuda at hd64/128 fp16/bf16
    out, lse = attnlib.flash_attention(q, k, v, causal=causal, layout=layout, return_lse=True, backend="triton")
    assert len(tma_launches) == 1
    to_bhsd = (lambda x: x) if layout == "bhsd" else (lambda x: x.transpose(1, 2))
    check_forward(to_bhsd(out), lse, *(to_bhsd(t) for t in (q, k, v)), causal=causal)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.skipif(DEVICE == "cuda", reason="withdrawn on GPUs (configs.WS_WITHDRAWN): wrong outputs on an H100")
def test_tma_forward_warp_specialized(case):
    """The warp_specialize candidates' code path (a single masked loop), pinned by config: right
    under the interpreter; on an H100 the autotuner's pick among such candidates gave NaN rows."""
    from attnlib.triton_kernels.flash.forward_tma import flash_fwd_tma, tma_unsupported_reasons

    causal, layout = case[6], case[7]
    q, k, v = _case_qkv(case, torch.float16, seed_extra=1)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(q.shape[:3], device=DEVICE))
    assert tma_unsupported_reasons(q, k, v, out) == []
    flash_fwd_tma(q, k, v, out, lse, causal=causal, scale=q.shape[-1] ** -0.5, config=WS_CONFIG)
    check_forward(out, lse, q, k, v, causal=causal)


@pytest.mark.parametrize("case", [CASES[4], CASES[5]], ids=["mqa-causal-q<k", "causal-q>k"])
def test_tma_forward_backward(case, tma_launches):
    """Gradients from the descriptor forward's out and lse (the backward is the default one)."""
    q, k, v = (t.requires_grad_() for t in _case_qkv(case, torch.float16, seed_extra=2))
    check_against_reference(q, k, v, causal=case[6], layout=case[7], backend="triton")
    assert len(tma_launches) == 1


def test_tma_fp32_falls_back(tma_launches):
    from attnlib.triton_kernels.flash.forward import fwd_variant

    case = CASES[7]  # GQA, causal, seq_q < seq_k, head-dim tail
    q, k, v = _case_qkv(case, torch.float32)
    variant, reasons = fwd_variant(q, k, v, torch.empty_like(q))
    assert variant == "default" and any("fp16/bf16 only" in r for r in reasons)
    out, lse = attnlib.flash_attention(q, k, v, causal=True, return_lse=True, backend="triton")
    assert tma_launches == []
    check_forward(out, lse, q, k, v, causal=True)


@pytest.mark.parametrize("offset,aligned", [(8, True), (4, False)], ids=["offset16B", "offset8B"])
def test_tma_strided_views_with_storage_offset(offset, aligned, tma_launches):
    """fp16 q, k, v sliced out of one (B, S, 3, H, 80) buffer at column `offset`: a 16-byte
    aligned base runs on descriptors, an 8-byte one falls back to the pointer kernel."""
    from attnlib.triton_kernels.flash.forward import fwd_variant

    gen = torch.Generator().manual_seed(8)
    packed = torch.randn(2, 37, 3, 2, 80, generator=gen).to(DEVICE, torch.float16)
    q, k, v = (packed[:, :, i, :, offset:offset + 72] for i in range(3))
    assert q.storage_offset() != 0 and not q.is_contiguous()
    bhsd = [t.transpose(1, 2) for t in (q, k, v)]
    variant, reasons = fwd_variant(*bhsd, torch.empty_like(bhsd[0]))
    assert variant == ("tma" if aligned else "default"), reasons
    if not aligned:
        assert any("16-byte aligned" in r for r in reasons)
    out, lse = attnlib.flash_attention(q, k, v, causal=True, layout="bshd", return_lse=True, backend="triton")
    assert len(tma_launches) == (1 if aligned else 0)
    check_forward(out.transpose(1, 2), lse, *bhsd, causal=True)


def test_tma_single_row_with_odd_stride(tma_launches):
    """A one-row sequence dim's stride is never walked: an unaligned one must not force a fallback."""
    q, k, v = make_qkv(1, 2, 1, 64, seq_k=5, dtype=torch.float16, device=DEVICE, seed=9)
    q = q.clone().as_strided(q.shape, (128, 64, 3, 1))
    out, lse = attnlib.flash_attention(q, k, v, return_lse=True, backend="triton")
    assert len(tma_launches) == 1
    check_forward(out, lse, q, k, v, causal=False)


@pytest.mark.parametrize("causal", [False, True])
def test_tma_launcher_writes_every_element(causal, tma_launches):
    from attnlib.triton_kernels.flash.forward import flash_fwd

    q, k, v = make_qkv(1, 4, 37, 40, kv_heads=2, seq_k=21, dtype=torch.float16, device=DEVICE, seed=5)
    out, lse = poison_(torch.empty_like(q)), poison_(torch.empty(q.shape[:3], device=DEVICE))
    flash_fwd(q, k, v, out, lse, causal=causal, scale=40 ** -0.5)
    assert len(tma_launches) == 1
    assert torch.isfinite(out).all()
    assert not torch.isnan(lse).any()


def test_tma_off_by_default(monkeypatch):
    from attnlib.triton_kernels.flash.forward import fwd_variant

    monkeypatch.delenv("ATTNLIB_FLASH_TMA", raising=False)
    q, k, v = make_qkv(1, 2, 16, 64, dtype=torch.float16, device=DEVICE)
    assert fwd_variant(q, k, v, torch.empty_like(q)) == ("default", [])


# ---- GPU only --------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES[3], CASES[5], CASES[6]], ids=["causal", "empty-rows", "gqa"])
def test_bf16(case):
    b, hq, hkv, sq, sk, d, causal, layout = case
    q, k, v = make_qkv(b, hq, sq, d, kv_heads=hkv, seq_k=sk, dtype=torch.bfloat16, device="cuda",
                       layout=layout, requires_grad=True, seed=11)
    check_against_reference(q, k, v, causal=causal, layout=layout, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_atomic_dq_on_gpu(dtype, head_dim, causal, dq_launches):
    """deterministic=False at realistic sizes (GQA, odd lengths, several key blocks per program
    adding into the same dQ rows): the rule against the float64 reference."""
    q, k, v = make_qkv(2, 8, 1000, head_dim, kv_heads=2, seq_k=777, dtype=dtype, device="cuda",
                       layout="bshd", requires_grad=True, seed=head_dim + causal)
    check_against_reference(q, k, v, causal=causal, layout="bshd", backend="triton", deterministic=False)
    assert dq_launches == ["dkdv+dq"]


def _pinned_candidates():
    """(kernel, head dim, config) of the candidates the GPU tests would otherwise never run: they
    run with autotuning off (bench/gpu_check.py), so only each table's first entry, while a user's
    autotuner may pick any entry. Every later entry of every table, at each table's head dim
    (after the descriptor forward's autotuned picks gave wrong rows on an H100, stop 19)."""
    from attnlib.triton_kernels.flash import configs

    tables = (("fwd", configs.FWD_H100), ("dkdv", configs.BWD_DKDV_H100), ("dq", configs.BWD_DQ_H100),
              ("dkdv_dq", configs.BWD_DKDV_DQ_H100))
    return [(which, hd, c) for which, table in tables for hd, cands in table.items() for c in cands[1:]]


def test_pinned_config_reaches_the_launch(monkeypatch, dq_launches):
    """The pinning test_autotune_candidates_on_gpu relies on, here on another tile than the
    interpreter's (BLOCK_M > BLOCK_N for the atomic dK/dV kernel's causal bounds): the launch
    gets the pinned config and the gradients still meet the rule."""
    from attnlib.triton_kernels.flash import backward

    kernel = backward.flash_bwd_dkdv_dq_kernel
    monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=1,
                                                          num_stages=1)])
    seen, run = [], kernel.fn.run
    # through the instance's __dict__: setattr on an instance leaves the bound method there on
    # undo with pytest < 9.2 (see triton_runs)
    monkeypatch.setitem(vars(kernel.fn), "run",
                        lambda *a, **kw: seen.append((kw["BLOCK_M"], kw["BLOCK_N"])) or run(*a, **kw))
    q, k, v = make_qkv(1, 4, 45, 40, kv_heads=2, seq_k=37, dtype=torch.float16, device=DEVICE,
                       requires_grad=True, seed=16)
    check_against_reference(q, k, v, causal=True, backend="triton", deterministic=False)
    assert seen == [(32, 16)]


@pytest.mark.gpu
@pytest.mark.parametrize("which,head_dim,config", _pinned_candidates(),
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_autotune_candidates_on_gpu(which, head_dim, config, monkeypatch):
    """Each such candidate pinned as the autotuner's only config (a one-config Autotuner launches
    it without tuning), bf16, GQA, causal with seq_q != seq_k: the rule against float64."""
    from attnlib.triton_kernels.flash import backward, forward

    kernel = {"fwd": forward.flash_fwd_kernel, "dkdv": backward.flash_bwd_dkdv_kernel,
              "dq": backward.flash_bwd_dq_kernel, "dkdv_dq": backward.flash_bwd_dkdv_dq_kernel}[which]
    if which == "dkdv_dq":
        monkeypatch.setenv("ATTNLIB_FLASH_ATOMIC_DQ", "1")
    bm, bn, warps, stages = config
    monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps,
                                                          num_stages=stages)])
    q, k, v = make_qkv(2, 4, 300, head_dim, kv_heads=2, seq_k=257, dtype=torch.bfloat16, device="cuda",
                       requires_grad=True, seed=head_dim + bm + bn)
    check_against_reference(q, k, v, causal=True, backend="triton", deterministic=which != "dkdv_dq")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [96, 192, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_large_head_dims(head_dim, dtype):
    q, k, v = make_qkv(2, 4, 300, head_dim, kv_heads=2, seq_k=257, dtype=dtype, device="cuda",
                       requires_grad=True, seed=head_dim)
    check_against_reference(q, k, v, causal=True, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 96, 128, 192, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_tma_bf16_head_dims(head_dim, causal, tma_launches):
    """The descriptor forward in bf16 (wrong in the interpreter) at every table head dim and the
    padded ones, GQA, seq_q != seq_k, with the autotuner's candidates."""
    q, k, v = make_qkv(2, 4, 300, head_dim, kv_heads=2, seq_k=257, dtype=torch.bfloat16, device="cuda",
                       seed=head_dim + causal)
    # backend forced: auto prefers flash-cuda at hd64/128 on a GPU, and the descriptor forward never runs
    out, lse = attnlib.flash_attention(q, k, v, causal=causal, return_lse=True, backend="triton")
    assert len(tma_launches) == 1
    check_forward(out, lse, q, k, v, causal=causal)


@pytest.mark.gpu
@NEEDS_SM90
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_gpu_tma_each_candidate(head_dim, causal, dtype):
    """Every candidate of the descriptor forward's table pinned in turn (the autotuner's pick
    varies by card and run, so a test through it may never run some entry): GQA, seq_q != seq_k,
    odd lengths, each output and lse element written."""
    from attnlib.triton_kernels.flash import configs
    from attnlib.triton_kernels.flash.forward_tma import flash_fwd_tma, tma_unsupported_reasons

    q, k, v = make_qkv(2, 4, 300, head_dim, kv_heads=2, seq_k=257, dtype=dtype, device="cuda",
                       seed=head_dim + 2 * causal)
    for config in configs.tma_fitting(configs.padded_head_dim(head_dim), configs.device_smem_limit(q)):
        out = poison_(torch.empty_like(q))
        lse = poison_(torch.empty(q.shape[:3], device="cuda"))
        assert tma_unsupported_reasons(q, k, v, out) == []
        flash_fwd_tma(q, k, v, out, lse, causal=causal, scale=head_dim ** -0.5, config=config)
        try:
            check_forward(out, lse, q, k, v, causal=causal)
        except AssertionError as e:
            raise AssertionError(f"candidate {config}: {e}") from None


@pytest.mark.gpu
@NEEDS_SM90
def test_gpu_tma_warp_specialized_refused():
    from attnlib.triton_kernels.flash import configs
    from attnlib.triton_kernels.flash.forward_tma import flash_fwd_tma

    q, k, v = make_qkv(1, 2, 200, 128, dtype=torch.bfloat16, device="cuda", seed=5)
    with pytest.raises(ValueError, match="warp-specialized"):
        flash_fwd_tma(q, k, v, torch.empty_like(q), torch.empty(q.shape[:3], device="cuda"), causal=False,
                      scale=0.1, config=configs.WS_WITHDRAWN[128][0])


# realistic sizes: layouts x GQA x odd lengths x 16-bit dtypes x head dims, forward and backward
# on the Triton kernel (forced: auto prefers flash-cuda where it fits), flash_attn's rule
GPU_GRID_LENGTHS = [(1000, 1000, False), (4097, 4097, True)]  # (seq_q, seq_k, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("lengths", GPU_GRID_LENGTHS, ids=lambda x: f"q{x[0]}k{x[1]}{'-causal' if x[2] else ''}")
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_gpu_grid_forward_backward(layout, heads, lengths, dtype, head_dim, triton_runs):
    (hq, hkv), (sq, sk, causal) = heads, lengths
    q, k, v = make_qkv(1, hq, sq, head_dim, kv_heads=hkv, seq_k=sk, dtype=dtype, device="cuda", layout=layout,
                       requires_grad=True, seed=sq + head_dim + hq)
    check_against_reference(q, k, v, causal=causal, layout=layout, backend="triton")
    assert triton_runs == ["fwd", "bwd"]


@pytest.mark.gpu
def test_32k_tokens_index_overflow():
    """q with more than 2**31 elements: batch/head offsets must be 64-bit. Checked on the last
    64 query rows of two heads with flash_attn's rule (float64 reference, fp16 PyTorch baseline)."""
    b, s, hq, hkv, d = 17, 32768, 32, 8, 128  # q: 2.28e9 elements, > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.float16, generator=gen)
    k = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.float16, generator=gen)
    v = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.float16, generator=gen)
    out = attnlib.flash_attention(q, k, v, causal=True, layout="bshd", backend="triton")  # auto: flash-cuda
    rows = slice(s - 64, s)
    for hh in (0, hq - 1):
        qb = q[-1:, rows, hh:hh + 1].transpose(1, 2)
        kb, vb = (t[-1:, :, hh // (hq // hkv):hh // (hq // hkv) + 1].transpose(1, 2) for t in (k, v))
        # 64 queries aligned to the last keys (causal is bottom-right aligned)
        ref = flash_reference(qb.double(), kb.double(), vb.double(), causal=True, scale=d ** -0.5)
        base, _ = torch_same_dtype(qb, kb, vb, causal=True, scale=d ** -0.5)
        got = out[-1:, rows, hh:hh + 1].transpose(1, 2)
        assert_flash_rule(got, ref, base, name=f"out rows {rows.start}: of head {hh}")


@pytest.mark.gpu
def test_key_offsets_past_2_31_elements():
    """K and V rows 2**21 elements apart (views into one 4.6 GB buffer, only their rows written):
    the key-block offset lo * stride passes 2**31 for the tail blocks of 1100 keys, in the
    forward and in dQ's key loop, and must be computed in 64 bits."""
    s, d, row = 1100, 64, 2 ** 21
    buf = torch.empty(s * row, device="cuda", dtype=torch.float16)
    k = buf.as_strided((1, 1, s, d), (0, 0, row, 1))
    v = buf.as_strided((1, 1, s, d), (0, 0, row, 1), storage_offset=d)
    kc, vc = make_qkv(1, 1, s, d, dtype=torch.float16, device="cuda", seed=14)[1:]
    k.copy_(kc), v.copy_(vc)
    q = make_qkv(1, 1, s, d, dtype=torch.float16, device="cuda", seed=15)[0]
    for causal in (False, True):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # views: the strides stay
        assert leaves[1].stride() == (0, 0, row, 1)
        out = attnlib.flash_attention(*leaves, causal=causal, backend="triton")
        ref = flash_reference(q.double(), kc.double(), vc.double(), causal=causal)
        base, _ = torch_same_dtype(q, kc, vc, causal=causal, scale=d ** -0.5)
        assert_flash_rule(out, ref, base)
        dout = torch.randn_like(out)
        got = input_grads(out, leaves, dout)
        dense = [t.detach().clone().requires_grad_() for t in (q, kc, vc)]
        want = input_grads(attnlib.flash_attention(*dense, causal=causal, backend="triton"), dense, dout)
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)
    del buf, k, v
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_long_sequence_backward():
    q, k, v = make_qkv(1, 1, 16384, 64, dtype=torch.float16, device="cuda", requires_grad=True, seed=1)
    check_against_reference(q, k, v, causal=True, backend="triton")
