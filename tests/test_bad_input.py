"""Every public function validates before any kernel runs, with errors naming the argument."""
import math

import numpy as np
import pytest
import torch

import attnlib
from attnlib.testing import make_qkv


def qkv(**kw):
    return make_qkv(1, 4, 16, 16, **kw)


def mask_for(sq=16, sk=16, bq=64, bk=64):
    return torch.ones(1, 1, -(-sq // bq), -(-sk // bk), dtype=torch.bool)


BAD = [
    # (id, call, exception type, text the message must contain)
    ("rank", lambda q, k, v: attnlib.flash_attention(q[0], k, v), ValueError, "q must be 4-D"),
    ("not-a-tensor", lambda q, k, v: attnlib.flash_attention(q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    ("batch", lambda q, k, v: attnlib.flash_attention(q, k[:0], v[:0]), ValueError, "batch"),
    ("head-dim", lambda q, k, v: attnlib.flash_attention(q, k[..., :8], v), ValueError, "head_dim"),
    ("kv-seq", lambda q, k, v: attnlib.flash_attention(q, k, v[:, :, :5]), ValueError, "k and v must agree"),
    ("kv-heads", lambda q, k, v: attnlib.flash_attention(q, k[:, :2], v), ValueError, "k and v must agree"),
    ("gqa", lambda q, k, v: attnlib.flash_attention(q, k[:, :3], v[:, :3]), ValueError, "multiple of key/value heads"),
    ("no-kv-heads", lambda q, k, v: attnlib.flash_attention(q, k[:, :0], v[:, :0]), ValueError, "at least one head"),
    ("dtype-mix", lambda q, k, v: attnlib.flash_attention(q, k.half(), v), TypeError, "share one dtype"),
    ("int-dtype", lambda q, k, v: attnlib.flash_attention(q.int(), k.int(), v.int()), TypeError, "q must be float16"),
    ("device", lambda q, k, v: attnlib.flash_attention(q, k.to("meta"), v), ValueError, "one device"),
    ("scale-nan", lambda q, k, v: attnlib.flash_attention(q, k, v, scale=math.nan), ValueError, "scale"),
    ("scale-neg", lambda q, k, v: attnlib.flash_attention(q, k, v, scale=-1.0), ValueError, "scale"),
    ("scale-inf", lambda q, k, v: attnlib.flash_attention(q, k, v, scale=math.inf), ValueError, "scale"),
    ("scale-str", lambda q, k, v: attnlib.flash_attention(q, k, v, scale="0.1"), TypeError, "scale"),
    ("scale-bool", lambda q, k, v: attnlib.flash_attention(q, k, v, scale=True), TypeError, "scale"),
    ("scale-tensor", lambda q, k, v: attnlib.flash_attention(q, k, v, scale=torch.tensor(0.1)), TypeError, "scale"),
    ("scale-np-bool", lambda q, k, v: attnlib.flash_attention(q, k, v, scale=np.bool_(True)), TypeError, "scale"),
    # finite but beyond float32: the kernels' scaled scores overflow to inf, then NaN
    ("scale-overflow", lambda q, k, v: attnlib.flash_attention(q, k, v, scale=1e300), ValueError,
     "scale must fit in float32"),
    ("scale-overflow-np", lambda q, k, v: attnlib.flash_attention(q, k, v, scale=np.float64(4e38)), ValueError,
     "scale must fit in float32"),
    ("scale-overflow-varlen", lambda q, k, v: attnlib.flash_attention_varlen(
        q[0], k[0], v[0], *(torch.tensor([0, 4], dtype=torch.int32),) * 2, 4, 4, scale=1e39), ValueError,
     "scale must fit in float32"),
    # positive but below float32's normal range: the kernels' scale rounds to 0 and -inf * 0 is NaN
    ("scale-underflow", lambda q, k, v: attnlib.flash_attention(q, k, v, scale=1e-46), ValueError,
     "smallest normal float32"),
    ("scale-underflow-varlen", lambda q, k, v: attnlib.flash_attention_varlen(
        q[0], k[0], v[0], *(torch.tensor([0, 4], dtype=torch.int32),) * 2, 4, 4, scale=1e-40), ValueError,
     "smallest normal float32"),
    ("scale-overflow-predict", lambda q, k, v: attnlib.predict_block_mask(q, k, topk=0.5, scale=1e300), ValueError,
     "scale must fit in float32"),
    ("layout", lambda q, k, v: attnlib.flash_attention(q, k, v, layout="bsdh"), ValueError, "layout"),
    ("method", lambda q, k, v: attnlib.attention(q, k, v, method="flash3"), ValueError, "method"),
    ("backend", lambda q, k, v: attnlib.attention(q, k, v, backend="metal"), ValueError, "backend"),
    ("causal-type", lambda q, k, v: attnlib.flash_attention(q, k, v, causal="yes"), TypeError, "causal"),
    ("unknown-option", lambda q, k, v: attnlib.attention(q, k, v, method="flash", dropout=0.1), TypeError, "dropout"),
    ("feature-map", lambda q, k, v: attnlib.linear_attention(q, k, v, feature_map="cosh"), ValueError, "feature_map"),
    ("linear-scale", lambda q, k, v: attnlib.attention(q, k, v, method="linear", scale=0.1), ValueError, "scale"),
    ("linear-lse", lambda q, k, v: attnlib.attention(q, k, v, method="linear", return_lse=True), ValueError, "return_lse"),
    ("eps", lambda q, k, v: attnlib.linear_attention(q, k, v, eps=-1.0), ValueError, "eps"),
    ("mask-dtype", lambda q, k, v: attnlib.block_sparse_attention(q, k, v, mask_for().float()), TypeError, "block_mask"),
    ("mask-shape", lambda q, k, v: attnlib.block_sparse_attention(q, k, v, torch.ones(1, 1, 2, 1, dtype=torch.bool)),
     ValueError, "block_mask must have shape"),
    ("mask-rank", lambda q, k, v: attnlib.block_sparse_attention(q, k, v, torch.ones(1, 1, dtype=torch.bool)),
     ValueError, "block_mask must be 4-D"),
    ("mask-heads", lambda q, k, v: attnlib.block_sparse_attention(q, k, v, torch.ones(1, 3, 1, 1, dtype=torch.bool)),
     ValueError, "block_mask must have shape"),
    ("mask-missing", lambda q, k, v: attnlib.attention(q, k, v, method="block_sparse"), TypeError, "block_mask"),
    ("block-size", lambda q, k, v: attnlib.block_sparse_attention(q, k, v, mask_for(), block_size=(0, 64)),
     ValueError, "block_size"),
    ("critical", lambda q, k, v: attnlib.sla_attention(q, k, v, critical=1.5), ValueError, "critical"),
    ("negligible", lambda q, k, v: attnlib.sla_attention(q, k, v, negligible=-0.1), ValueError, "negligible"),
    ("fractions-sum", lambda q, k, v: attnlib.sla_attention(q, k, v, critical=0.6, negligible=0.6),
     ValueError, r"critical \+ negligible"),
    ("proj-shape", lambda q, k, v: attnlib.sla_attention(q, k, v, torch.zeros(3, 3)), ValueError, "proj_weight"),
    ("proj-bias", lambda q, k, v: attnlib.sla_attention(q, k, v, None, torch.zeros(3)), ValueError, "proj_bias"),
    ("smooth-k", lambda q, k, v: attnlib.sage_attention(q, k, v, smooth_k=1), TypeError, "smooth_k"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_clear_error(case):
    _, call, exc, text = case
    q, k, v = qkv()
    with pytest.raises(exc, match=text):
        call(q, k, v)


@pytest.mark.parametrize("method,kw", [
    ("flash", {"causal": True}), ("sage", {}), ("linear", {"causal": True}), ("sla", {}),
    ("block_sparse", {"block_mask": mask_for(), "block_size": (64, 64)}),
])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_inputs_are_not_modified(method, kw, layout):
    q, k, v = make_qkv(1, 4, 16, 16, kv_heads=2, layout=layout, k_bias=3.0)
    before = [t.clone() for t in (q, k, v)]
    attnlib.attention(q, k, v, method=method, layout=layout, backend="torch", **kw)
    for a, b in zip((q, k, v), before):
        assert torch.equal(a, b)


def test_explain_validates_too():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="layout"):
        attnlib.explain(q, k, v, layout="xyz")


@pytest.mark.parametrize("scale", [np.float32(0.3), np.float16(0.3), np.float64(0.3), np.int64(1), 1],
                         ids=["np-float32", "np-float16", "np-float64", "np-int64", "int"])
def test_real_scalar_scales_are_accepted(scale):
    q, k, v = qkv()
    out = attnlib.flash_attention(q, k, v, scale=scale, backend="torch")
    assert torch.equal(out, attnlib.flash_attention(q, k, v, scale=float(scale), backend="torch"))


def test_largest_scale_is_accepted_and_one_past_it_refused():
    # the kernels multiply by scale * log2(e) in float32: the largest scale keeps that finite
    q, k, v = qkv()
    top = attnlib.inputs.SCALE_MAX
    assert math.isfinite(float(torch.tensor(top * math.log2(math.e), dtype=torch.float32)))
    assert attnlib.api.build_inputs(q, k, v, scale=top).scale == top
    for too_big in (top * 1.0001, float(torch.finfo(torch.float32).max)):
        with pytest.raises(ValueError, match="scale"):
            attnlib.flash_attention(q, k, v, scale=too_big, backend="torch")


def test_numpy_fractions_are_accepted():
    q, k, _ = qkv()
    a = attnlib.predict_block_mask(q, k, topk=np.float32(0.5), block_size=(16, 16))
    assert torch.equal(a, attnlib.predict_block_mask(q, k, topk=0.5, block_size=(16, 16)))


def test_numpy_eps_is_accepted_and_a_non_number_is_a_type_error():
    q, k, v = qkv()
    want = attnlib.linear_attention(q, k, v, eps=1e-3, backend="torch")
    assert torch.equal(attnlib.linear_attention(q, k, v, eps=np.float32(1e-3).item(), backend="torch"), want)
    got = attnlib.linear_attention(q, k, v, eps=np.float64(1e-3), backend="torch")
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="eps"):
        attnlib.linear_attention(q, k, v, eps="1e-3", backend="torch")
