"""Seeded random combinations of the options the other tests vary one or two at a time.

Each case draws method (flash with or without a key mask, block_sparse, linear, sla), dtype,
GQA ratio, head dims (value head dim different from the query's in some), sequence lengths
(1, odd, off the block size, seq_q != seq_k), causal, layout, scale, feature map, block size,
mask density and broadcast shape, SLA fractions and projection, and whether gradients are
taken, and compares the forced backend's answer with the float64 reference on the same
(dtype-rounded) inputs. A combination a forced backend cannot run is skipped with the
dispatcher's reasons. The seeds are fixed so a failure reproduces: the case id names them.
"""
from __future__ import annotations

import random

import pytest
import torch

import attnlib
from attnlib.inputs import from_bhsd, to_bhsd
from attnlib.reference.block_sparse import block_sparse_reference
from attnlib.reference.flash import flash_reference
from attnlib.reference.linear import linear_reference
from attnlib.reference.sla import sla_reference
from attnlib.testing import describe_mismatch, relative_rmse, triton_interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu" and triton_interpreting()

# Accuracy contract here: relative RMSE (||out - ref64|| / ||ref64||) of the output and of each
# gradient, per input dtype. Inputs are standard normal and scales at most 4 / sqrt(d), so the
# problems stay well conditioned. Worst seen on the CPU (2026-11-30) over 600 cases drawn as
# below for the torch backend and 200 for Triton under its interpreter: forward 7.6e-7 / 3.4e-4
# / 2.4e-3 and gradients 3.6e-5 / 7.7e-4 / 3.8e-3 for float32 / float16 / bfloat16 (float16: 2.2e-3
# for an SLA dq with one key, zero in exact arithmetic; see the floor below).
FWD_RTOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
BWD_RTOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 8e-3, torch.bfloat16: 5e-2}

N_TORCH, N_TRITON = 64, 32
METHODS = ("flash", "block_sparse", "linear", "sla")  # in turn, so each gets a quarter of the cases


def draw_case(seed: int, backend: str) -> dict:
    rng = random.Random(seed)
    small = backend == "triton" and INTERPRETED
    if backend == "triton":
        dtypes = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])
    else:
        dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    hk = rng.choice([1, 2])
    d = rng.choice([16, 32, 64] if small else [16, 32, 64, 128])
    sq = rng.choice([1, 17, 64, 65, 100, 150])
    case = dict(seed=seed, method=METHODS[seed % len(METHODS)], dtype=rng.choice(dtypes),
                batch=rng.choice([1, 2]), kv_heads=hk, heads=hk * rng.choice([1, 1, 2, 3]), head_dim=d,
                head_dim_v=d if rng.random() < 0.85 else rng.choice([16, 32]), seq_q=sq,
                seq_k=sq if rng.random() < 0.6 else rng.choice([1, 33, 64, 129, 190]),
                causal=rng.random() < 0.4, layout=rng.choice(["bhsd", "bshd"]),
                scale=None if rng.random() < 0.7 else rng.choice([0.5, 2.0, 4.0]) * d ** -0.5,
                grad=rng.random() < 0.5, options={})
    opts = case["options"]
    if case["method"] == "flash":
        if rng.random() < 0.3:
            shape = rng.choice([(case["batch"], case["seq_k"]), (1, case["seq_k"]),
                                (case["batch"], case["heads"], case["seq_k"]), (1, 1, case["seq_k"])])
            opts["key_mask"] = shape
    elif case["method"] == "block_sparse":
        bs = rng.choice([(64, 64), (128, 64)])
        blocks = (-(-case["seq_q"] // bs[0]), -(-case["seq_k"] // bs[1]))
        lead = rng.choice([(1, 1), (case["batch"], case["heads"]), (case["batch"], 1), (1, case["heads"])])
        opts.update(block_size=bs, block_mask=(lead + blocks, rng.choice([1.0, 0.5, 0.2])))
    elif case["method"] == "linear":
        opts["feature_map"] = rng.choice(["elu", "relu", "softmax"])
        case["scale"] = None
    else:
        critical = rng.choice([0.0, 0.1, 0.3, 0.5, 1.0])
        negligible = rng.choice([0.0, 0.1, 0.3])
        opts.update(block_size=rng.choice([(64, 64), (128, 64)]), critical=critical,
                    negligible=negligible if critical + negligible <= 1 else 0.0,
                    feature_map=rng.choice(["softmax", "elu", "relu"]),
                    projection=rng.choice(["none", "weight", "weight+bias"]))
    return case


def case_id(c: dict) -> str:
    dt = str(c["dtype"]).replace("torch.", "")
    return (f"seed{c['seed']}-{c['method']}-{dt}-hq{c['heads']}hk{c['kv_heads']}-d{c['head_dim']}dv{c['head_dim_v']}"
            f"-sq{c['seq_q']}sk{c['seq_k']}-{c['layout']}{'-causal' if c['causal'] else ''}{'-grad' if c['grad'] else ''}")


def materialise(c: dict, gen: torch.Generator):
    """q, k, v (float64, bhsd, already rounded to the case's dtype) and the method's options
    (attnlib.attention's keywords) with their tensors."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(c["dtype"]).double()

    b, dv = c["batch"], c["head_dim_v"]
    q = rnd(b, c["heads"], c["seq_q"], c["head_dim"])
    k = rnd(b, c["kv_heads"], c["seq_k"], c["head_dim"])
    v = rnd(b, c["kv_heads"], c["seq_k"], dv)
    opts = dict(c["options"])
    if "key_mask" in opts:
        opts["key_mask"] = torch.rand(opts["key_mask"], generator=gen) < 0.7
    if "block_mask" in opts:
        shape, density = opts["block_mask"]
        opts["block_mask"] = torch.rand(shape, generator=gen) < density
    if c["method"] == "linear" and opts["feature_map"] == "relu":
        q[..., 0, :] = -q[..., 0, :].abs()  # a query row whose relu features are all zero
    if "projection" in opts:
        kind = opts.pop("projection")
        opts["proj_weight"] = None if kind == "none" else 0.1 * rnd(dv, dv)
        opts["proj_bias"] = 0.1 * rnd(dv) if kind == "weight+bias" else None
    return q, k, v, opts


def reference(c: dict, q, k, v, opts):
    m, kw = c["method"], dict(causal=c["causal"])
    if m == "flash":
        return flash_reference(q, k, v, scale=c["scale"], key_mask=opts.get("key_mask"), **kw)
    if m == "block_sparse":
        return block_sparse_reference(q, k, v, opts["block_mask"], block_size=opts["block_size"],
                                      scale=c["scale"], **kw)
    if m == "linear":
        return linear_reference(q, k, v, feature_map=opts["feature_map"], **kw)
    return sla_reference(q, k, v, opts["proj_weight"], opts["proj_bias"], critical=opts["critical"],
                         negligible=opts["negligible"], block_size=opts["block_size"],
                         feature_map=opts["feature_map"], scale=c["scale"], **kw)


CASES = [("torch", draw_case(1000 + i, "torch")) for i in range(N_TORCH)] + \
        [("triton", draw_case(2000 + i, "triton")) for i in range(N_TRITON)]


@pytest.mark.parametrize("backend,case", CASES, ids=[f"{b}-{case_id(c)}" for b, c in CASES])
def test_random_combination_matches_float64_reference(backend, case):
    gen = torch.Generator().manual_seed(case["seed"])
    q64, k64, v64, opts64 = materialise(case, gen)
    dtype, layout = case["dtype"], case["layout"]

    def to_kernel(t, in_layout=False):
        if t is None or not t.is_floating_point():
            return None if t is None else t.to(DEVICE)
        t = t.to(device=DEVICE, dtype=dtype)
        if in_layout:
            t = from_bhsd(t, layout).contiguous()
        return t.requires_grad_(case["grad"])

    q, k, v = (to_kernel(t, True) for t in (q64, k64, v64))
    opts = {name: to_kernel(t) if isinstance(t, torch.Tensor) else t for name, t in opts64.items()}
    call = dict(method=case["method"], backend=backend, layout=layout, causal=case["causal"], scale=case["scale"],
                **opts)
    explained = attnlib.explain(q, k, v, **call)
    if explained.chosen is None:
        pytest.skip("; ".join(r for _, reasons in explained.rejected for r in reasons))
    out = attnlib.attention(q, k, v, **call)
    leaves64 = {"q": q64, "k": k64, "v": v64, "proj_weight": opts64.get("proj_weight"),
                "proj_bias": opts64.get("proj_bias")}
    for t in leaves64.values():
        if t is not None:
            t.requires_grad_(case["grad"])
    ref = reference(case, q64, k64, v64, opts64)
    out_bhsd = to_bhsd(out, layout)
    assert out.dtype == dtype and out_bhsd.shape == ref.shape
    err = relative_rmse(out_bhsd, ref)
    assert err <= FWD_RTOL[dtype], f"forward relative RMSE {err:.3g} > {FWD_RTOL[dtype]}\n" + \
        describe_mismatch(out_bhsd.cpu(), ref)
    if not case["grad"]:
        return
    dout = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(dtype)
    leaves = {"q": q, "k": k, "v": v, "proj_weight": opts.get("proj_weight"), "proj_bias": opts.get("proj_bias")}
    names = [n for n, t in leaves64.items() if t is not None]
    got = torch.autograd.grad(out_bhsd, [leaves[n] for n in names], dout.to(DEVICE))
    want = torch.autograd.grad(ref, [leaves64[n] for n in names], dout.double())
    # a gradient that is zero in exact arithmetic (dq and dk with one key) is measured against a
    # tenth of dv's size, not its own rounding noise: a 16-bit delta (rowsum dO . O, from the
    # rounded output as FlashAttention-2 forms it; SLA's also carries O_l W^T + b) leaves
    # rounding-sized dS, so dq = scale dS K is rounding-sized too, not 0
    floor = 0.1 * want[names.index("v")].norm().item()
    for name, g, w in zip(names, got, want):
        if name in ("q", "k", "v"):
            g = to_bhsd(g, layout)
        err = relative_rmse(g, w, floor)
        assert err <= BWD_RTOL[dtype], f"d{name}: relative RMSE {err:.3g} > {BWD_RTOL[dtype]}\n" + \
            describe_mismatch(g.cpu(), w)
