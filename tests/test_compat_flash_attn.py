"""flash_attn 2 signatures on attnlib, against the float64 reference; import aliases."""
import subprocess
import sys

import pytest
import torch

from attnlib.compat import flash_attn as fa
from attnlib.reference import flash_reference
from attnlib.testing import assert_flash_rule, input_grads, make_qkv


def ref_bshd(q, k, v, causal, scale=None, dtype=torch.float64):
    t = lambda x: x.transpose(1, 2).to(dtype)  # noqa: E731
    out, lse = flash_reference(t(q), t(k), t(v), causal=causal, scale=scale, return_lse=True)
    return out.transpose(1, 2), lse


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_matches_reference(causal):
    q, k, v = make_qkv(2, 4, 17, 32, kv_heads=2, seq_k=29, layout="bshd")
    out, lse, probs = fa.flash_attn_func(q, k, v, 0.0, 0.3, causal, return_attn_probs=True)
    ref, ref_lse = ref_bshd(q, k, v, causal, 0.3)
    base, _ = ref_bshd(q, k, v, causal, 0.3, dtype=torch.float32)
    assert probs is None and out.shape == q.shape and lse.shape == (2, 4, 17)
    assert_flash_rule(out, ref, base)
    assert_flash_rule(lse, ref_lse.float(), ref_lse.float(), atol=1e-4, name="lse")


def test_packed_variants():
    q, k, v = make_qkv(1, 2, 13, 16, layout="bshd")
    qkv = torch.stack([q, k, v], dim=2)
    kv = torch.stack([k, v], dim=2)
    ref, _ = ref_bshd(q, k, v, True)
    base, _ = ref_bshd(q, k, v, True, dtype=torch.float32)
    assert_flash_rule(fa.flash_attn_qkvpacked_func(qkv, causal=True), ref, base)
    assert_flash_rule(fa.flash_attn_kvpacked_func(q, kv, causal=True), ref, base)
    with pytest.raises(ValueError, match="qkv"):
        fa.flash_attn_qkvpacked_func(kv)


@pytest.mark.parametrize("kw,text", [
    ({"dropout_p": 0.1}, "dropout_p"), ({"window_size": (3, 0)}, "window_size"), ({"softcap": 30.0}, "softcap"),
    ({"alibi_slopes": torch.ones(2)}, "alibi_slopes"),
])
def test_unsupported_options_are_rejected_clearly(kw, text):
    q, k, v = make_qkv(1, 2, 8, 16, layout="bshd")
    with pytest.raises(ValueError, match=text):
        fa.flash_attn_func(q, k, v, **kw)


def test_varlen_matches_per_sequence_reference():
    lens_q, lens_k = [5, 0, 17, 1], [7, 3, 17, 1]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), 4, 16)
    k, v = torch.randn(2, int(cu_k[-1]), 2, 16).unbind(0)
    out = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True)
    for i in range(4):
        sq, sk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        if lens_q[i] == 0:
            continue
        r, _ = ref_bshd(q[None, sq], k[None, sk], v[None, sk], True)
        b, _ = ref_bshd(q[None, sq], k[None, sk], v[None, sk], True, dtype=torch.float32)
        assert_flash_rule(out[None, sq], r, b)


def test_deterministic_reaches_attnlib(monkeypatch):
    """flash_attn's deterministic (default False) becomes attnlib's option, in the dense and the
    varlen call, so a training call may take the fastest (non-deterministic) backward as with
    flash_attn, and deterministic=True keeps attnlib's deterministic one."""
    from attnlib import api, varlen

    seen = []
    real_dense, real_varlen = api.flash_attention, varlen.flash_attention_varlen
    monkeypatch.setattr(api, "flash_attention", lambda *a, **kw: seen.append(kw["deterministic"]) or real_dense(*a, **kw))
    monkeypatch.setattr(varlen, "flash_attention_varlen",
                        lambda *a, **kw: seen.append(kw["deterministic"]) or real_varlen(*a, **kw))
    q, k, v = make_qkv(1, 2, 9, 16, layout="bshd", requires_grad=True, seed=4)
    fa.flash_attn_func(q, k, v).sum().backward()
    fa.flash_attn_func(q, k, v, deterministic=True)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5)
    fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5, deterministic=True)
    assert seen == [False, True, False, True]
    with pytest.raises(TypeError, match="deterministic"):
        fa.flash_attn_func(q, k, v, deterministic="yes")


def test_install_aliases_in_a_subprocess():
    code = (
        "import attnlib.compat, torch\n"
        "attnlib.compat.install_aliases()\n"
        "from flash_attn import flash_attn_func\n"
        "from flash_attn.flash_attn_interface import flash_attn_varlen_func\n"
        "from flash_attn import flash_attn_with_kvcache, flash_attn_varlen_kvpacked_func\n"
        "from flash_attn.bert_padding import pad_input, unpad_input, index_first_axis\n"
        "import flash_attn, importlib.util\n"
        "assert importlib.util.find_spec('flash_attn') is not None\n"
        "assert importlib.util.find_spec('flash_attn.bert_padding') is not None\n"
        "assert importlib.util.find_spec('sageattention') is not None\n"
        "q = torch.randn(1, 8, 2, 16)\n"
        "o = flash_attn_func(q, q, q, causal=True)\n"
        "assert o.shape == q.shape and flash_attn.__version__.endswith('attnlib')\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


BAD_ARGUMENTS = [
    ({"dropout_p": torch.tensor([0.1, 0.0])}, TypeError, "dropout_p must be a float"),
    ({"dropout_p": True}, TypeError, "dropout_p must be a float"),
    ({"dropout_p": 1.5}, ValueError, "dropout_p must lie in"),
    ({"dropout_p": -0.1}, ValueError, "dropout_p must lie in"),
    ({"window_size": None}, TypeError, "window_size must be a pair of ints"),
    ({"window_size": 3}, TypeError, "window_size must be a pair of ints"),
    ({"window_size": (-1, -1, -1)}, TypeError, "window_size must be a pair of ints"),
    ({"window_size": (-1.0, -1)}, TypeError, "window_size must be a pair of ints"),
    ({"window_size": (True, -1)}, TypeError, "window_size must be a pair of ints"),
    ({"softcap": torch.tensor([1.0, 2.0])}, TypeError, "softcap must be a float"),
    ({"softmax_scale": "0.3"}, TypeError, "softmax_scale must be a float"),
    ({"softmax_scale": 0.0}, ValueError, "softmax_scale must be finite and positive"),
    ({"softmax_scale": float("nan")}, ValueError, "softmax_scale must be finite and positive"),
]


@pytest.mark.parametrize("kw,exc,text", BAD_ARGUMENTS)
@pytest.mark.parametrize("func", ["func", "qkvpacked", "kvpacked", "varlen"])
def test_bad_arguments_name_the_argument(func, kw, exc, text):
    q, k, v = make_qkv(1, 2, 8, 16, layout="bshd")
    cu = torch.tensor([0, 8], dtype=torch.int32)
    call = {
        "func": lambda: fa.flash_attn_func(q, k, v, **kw),
        "qkvpacked": lambda: fa.flash_attn_qkvpacked_func(torch.stack([q, k, v], dim=2), **kw),
        "kvpacked": lambda: fa.flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2), **kw),
        "varlen": lambda: fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 8, 8, **kw),
    }[func]
    with pytest.raises(exc, match=text):
        call()


def test_accepted_argument_forms():
    np = pytest.importorskip("numpy")
    q, k, v = make_qkv(1, 2, 8, 16, layout="bshd")
    ref = fa.flash_attn_func(q, k, v, softmax_scale=0.25)
    # a list window (flash_attn only indexes it), numpy scalars, an int dropout of 0
    out = fa.flash_attn_func(q, k, v, dropout_p=0, softmax_scale=np.float32(0.25), window_size=[-1, -1],
                             softcap=np.float64(0.0))
    assert torch.equal(out, ref)


def cu_seqlens(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def varlen_references(q, k, v, lens_q, lens_k, causal, scale):
    """(float64 reference, PyTorch in the inputs' dtype) on (total, H, D) packs, each (out, lse (H, total_q)),
    differentiable to q, k, v. The caller passes float64 leaves for the first, same-dtype ones for the second."""
    from attnlib.reference.flash_varlen import flash_varlen_reference, per_sequence
    from test_flash_triton import torch_same_dtype

    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    if q.dtype == torch.float64:
        return flash_varlen_reference(q, k, v, cu_q, cu_k, causal=causal, scale=scale, return_lse=True)
    return per_sequence(lambda *qkv: torch_same_dtype(*qkv, causal=causal, scale=scale), q, k, v, cu_q, cu_k)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("packing", ["qkv", "kv"])
def test_varlen_packed_forward_backward(packing, dtype, causal):
    """flash_attn_varlen_qkvpacked_func / _kvpacked_func against the float64 reference: output, lse and
    the packed tensors' gradients, on ragged sequences with lengths 0 and 1 (GQA for kv)."""
    seed = torch.randint(0, 2**31, ()).item()
    print(f"seed {seed}")  # fresh inputs each run; pytest shows this on a failure
    gen = torch.Generator().manual_seed(seed)
    heads, d, scale = 4, 16, 0.3
    lens_q = [5, 0, 1, 9]
    if packing == "qkv":
        lens_k = lens_q
        inputs = [torch.randn(sum(lens_q), 3, heads, d, generator=gen)]

        def call(qkv):
            return fa.flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens(lens_q), max(lens_q), softmax_scale=scale,
                                                       causal=causal, return_attn_probs=True)

        def split(qkv):
            return qkv.unbind(1)
    else:
        lens_k = [7, 3, 1, 0]
        inputs = [torch.randn(sum(lens_q), heads, d, generator=gen), torch.randn(sum(lens_k), 2, 2, d, generator=gen)]

        def call(q, kv):
            return fa.flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q),
                                                      max(lens_k), softmax_scale=scale, causal=causal,
                                                      return_attn_probs=True)

        def split(q, kv):
            return (q, *kv.unbind(1))
    inputs = [t.to(dtype).requires_grad_() for t in inputs]
    out, lse, probs = call(*inputs)
    assert probs is None and out.shape == (sum(lens_q), heads, d) and lse.shape == (heads, sum(lens_q))
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    leaves_same = [t.detach().clone().requires_grad_() for t in inputs]
    ref, ref_lse = varlen_references(*split(*leaves64), lens_q, lens_k, causal, scale)
    base, base_lse = varlen_references(*split(*leaves_same), lens_q, lens_k, causal, scale)
    assert_flash_rule(out, ref, base)
    assert_flash_rule(lse, ref_lse, base_lse, atol=1e-4, name="lse")
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    got, want, have = input_grads(out, inputs, dout), input_grads(ref, leaves64, dout.double()), input_grads(base, leaves_same, dout)
    for g, w, h in zip(got, want, have):
        assert torch.isfinite(g).all()
        assert_flash_rule(g, w, h, factor=3.0, name="grad")


@pytest.mark.parametrize("window,causal,same_as", [
    ((-1, -1), False, False), ((-1, 0), False, True), ((-7, 0), False, True), ((29, 0), False, True),
    ((100, 0), False, True), ((29, 29), False, False), ((-1, -1), True, True), ((-1, 5), True, True),
    ((40, 3), True, True), ((28, 0), False, True), ((28, 10), False, False), ((-1, 10), False, False),
])
def test_windows_equal_to_full_or_causal_are_accepted(window, causal, same_as):
    """flash_attn's window (left, right) with every bound unbounded (negative, or >= the key length)
    is full attention, and (unbounded, 0) bottom-right causal; causal=True forces right = 0."""
    q, k, v = make_qkv(1, 2, 11, 16, seq_k=29, layout="bshd")
    want = fa.flash_attn_func(q, k, v, causal=same_as)
    assert torch.equal(fa.flash_attn_func(q, k, v, causal=causal, window_size=window), want)
    qv, kv_, vv = q[0], k[0], v[0]
    cu_q, cu_k = cu_seqlens([11]), cu_seqlens([29])
    want = fa.flash_attn_varlen_func(qv, kv_, vv, cu_q, cu_k, 11, 29, causal=same_as)
    got = fa.flash_attn_varlen_func(qv, kv_, vv, cu_q, cu_k, 11, 29, causal=causal, window_size=window)
    assert torch.equal(got, want)


@pytest.mark.parametrize("seq_q,seq_k", [(11, 29), (29, 11), (1, 7), (7, 1), (16, 16)])
def test_window_rule_matches_flash_attns_mask(seq_q, seq_k):
    """Every window (left, right) in a range, with and without causal: accepted exactly when
    flash_attn's own mask (query i sees keys i + Sk - Sq - left .. i + Sk - Sq + right, a negative
    bound or one >= Sk unbounded, causal making right 0) equals the full or the bottom-right causal
    mask, and then as that one (with Sq > Sk, (-1, Sk) was refused, flash_attn runs it full)."""
    i = torch.arange(seq_q)[:, None]
    j = torch.arange(seq_k)[None, :]
    off = seq_k - seq_q
    full, causal_mask = torch.ones(seq_q, seq_k, dtype=torch.bool), j <= i + off
    for causal in (False, True):
        for left in range(-2, seq_k + 2):
            for right in range(-2, seq_q + 2):
                # flash_attn's C++ entry points first drop bounds >= seq_k (-1), then causal sets right 0
                lo = -1 if left >= seq_k else left
                r = 0 if causal else (-1 if right >= seq_k else right)
                mask = ((j >= i + off - lo) if lo >= 0 else full) & ((j <= i + off + r) if r >= 0 else full)
                want = True if torch.equal(mask, causal_mask) else False if torch.equal(mask, full) else None
                try:
                    got = fa._window_causal((left, right), causal, seq_k, seq_q)
                except ValueError:
                    got = None
                if want is not None and got is not None:
                    # both masks agree where causal hides nothing (seq_q == 1 ... ): either answer is exact
                    assert torch.equal(causal_mask, full) or got == want, (left, right, causal)
                else:
                    assert got == want, (left, right, causal, got, want)


@pytest.mark.parametrize("window,causal", [((3, 0), False), ((27, 0), False), ((-1, 2), False), ((2, -1), False),
                                           ((0, 0), False), ((3, -1), True), ((27, 27), False), ((-1, 27), False)])
@pytest.mark.parametrize("func", ["func", "qkvpacked", "kvpacked", "varlen", "varlen_qkvpacked", "varlen_kvpacked"])
def test_local_windows_are_refused(func, window, causal):
    q, k, v = make_qkv(1, 2, 29, 16, layout="bshd")
    cu = cu_seqlens([29])
    kw = {"causal": causal, "window_size": window}
    call = {
        "func": lambda: fa.flash_attn_func(q, k, v, **kw),
        "qkvpacked": lambda: fa.flash_attn_qkvpacked_func(torch.stack([q, k, v], dim=2), **kw),
        "kvpacked": lambda: fa.flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2), **kw),
        "varlen": lambda: fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 29, 29, **kw),
        "varlen_qkvpacked": lambda: fa.flash_attn_varlen_qkvpacked_func(torch.stack([q[0], k[0], v[0]], 1), cu, 29,
                                                                        **kw),
        "varlen_kvpacked": lambda: fa.flash_attn_varlen_kvpacked_func(q[0], torch.stack([k[0], v[0]], 1), cu, cu,
                                                                      29, 29, **kw),
    }[func]
    with pytest.raises(ValueError, match=r"window_size.*no sliding-window kernels"):
        call()


@pytest.mark.parametrize("func", ["varlen_qkvpacked", "varlen_kvpacked"])
def test_varlen_packed_shapes_are_checked(func):
    q = torch.randn(8, 2, 16)
    cu = cu_seqlens([8])
    with pytest.raises(ValueError, match=r"(qkv|kv) must have shape \(total_tokens"):
        if func == "varlen_qkvpacked":
            fa.flash_attn_varlen_qkvpacked_func(torch.stack([q, q], 1), cu, 8)
        else:
            fa.flash_attn_varlen_kvpacked_func(q, torch.stack([q, q, q], 1), cu, cu, 8, 8)
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
        fa.flash_attn_varlen_qkvpacked_func([q, q, q], cu, 8)


def test_new_names_are_exported():
    """install_aliases copies __all__ onto the flash_attn alias package, so these import from it too."""
    for name in ("flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"):
        assert name in fa.__all__ and callable(getattr(fa, name))


@pytest.mark.parametrize("softcap", [0.0, -1.0, -30.0])
def test_softcap_at_or_below_zero_is_no_softcap(softcap):
    """flash_attn soft-caps only for softcap > 0 ("anything > 0 activates softcapping"); a value <= 0
    is plain attention there, so it runs here too, with the uncapped call's exact output."""
    q, k, v = make_qkv(1, 2, 8, 16, layout="bshd", seed=7)
    want = fa.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(fa.flash_attn_func(q, k, v, causal=True, softcap=softcap), want)
    cu = cu_seqlens([8])
    got = fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 8, 8, causal=True, softcap=softcap)
    assert torch.equal(got, fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 8, 8, causal=True))
    with pytest.raises(ValueError, match="softcap"):
        fa.flash_attn_func(q, k, v, softcap=0.5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dense_packed_gradients(causal):
    """flash_attn_qkvpacked_func / flash_attn_kvpacked_func: gradients reach the packed tensors,
    each slice's against the float64 reference (GQA 2:1 for kv, seq_q != seq_k)."""
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(2, 9, 3, 2, 16, generator=gen).requires_grad_()
    q = torch.randn(2, 5, 4, 16, generator=gen).requires_grad_()
    kv = torch.randn(2, 9, 2, 2, 16, generator=gen).requires_grad_()
    cases = [(fa.flash_attn_qkvpacked_func, [qkv], lambda x: x.unbind(2)),
             (fa.flash_attn_kvpacked_func, [q, kv], lambda a, b: (a, *b.unbind(2)))]
    for func, leaves, split in cases:
        out = func(*leaves, softmax_scale=0.3, causal=causal)
        dout = torch.randn(out.shape, generator=gen)
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        leaves32 = [t.detach().clone().requires_grad_() for t in leaves]
        ref, _ = ref_bshd(*split(*leaves64), causal, 0.3)
        base, _ = ref_bshd(*split(*leaves32), causal, 0.3, dtype=torch.float32)
        assert_flash_rule(out, ref, base)
        got, want, have = input_grads(out, leaves, dout), input_grads(ref, leaves64, dout.double()), input_grads(base, leaves32, dout)
        for g, w, h in zip(got, want, have):
            assert g.shape == w.shape
            assert_flash_rule(g, w, h, factor=3.0, name="grad")


def test_rows_that_see_no_key_give_zero_and_minus_inf_lse():
    """Bottom-right causal with Sq > Sk: the first Sq - Sk query rows see no key. Their output is 0
    (as flash_attn's) and their lse -inf (flash_attn writes +inf; the module docstring says why),
    in the dense and the varlen call; the other rows match the reference."""
    q, k, v = make_qkv(1, 2, 7, 16, seq_k=3, layout="bshd", seed=9)
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    cu_q, cu_k = cu_seqlens([7]), cu_seqlens([3])
    vout, vlse, _ = fa.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, 7, 3, causal=True, return_attn_probs=True)
    ref, ref_lse = ref_bshd(q, k, v, True)
    base, _ = ref_bshd(q, k, v, True, dtype=torch.float32)
    for o, l in ((out, lse), (vout[None], vlse[None])):
        assert bool((o[:, :4] == 0).all()) and bool((l[..., :4] == float("-inf")).all())
        assert_flash_rule(o[:, 4:], ref[:, 4:], base[:, 4:])
        assert_flash_rule(l[..., 4:], ref_lse[..., 4:].float(), ref_lse[..., 4:].float(), atol=1e-4, name="lse")
