"""flash_attn 2 signatures on attnlib, against the float64 reference; import aliases."""
import subprocess
import sys

import pytest
import torch

from attnlib.compat import flash_attn as fa
from attnlib.reference import flash_reference
from attnlib.testing import assert_flash_rule, make_qkv


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
    ({"dropout_p": 0.1}, "dropout_p"), ({"window_size": (8, 0)}, "window_size"), ({"softcap": 30.0}, "softcap"),
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
        "import flash_attn\n"
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
