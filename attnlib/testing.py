"""Helpers shared by tests/ and bench/: input factories, accuracy metrics, tolerance rules."""
from __future__ import annotations

import math
import os
import sys
from typing import Optional

import torch

# Small absolute slack added to the flash_attn rule, per output dtype.
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5, torch.float64: 1e-10}


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def make_qkv(batch: int = 1, heads: int = 2, seq_q: int = 64, head_dim: int = 64, *,
             kv_heads: Optional[int] = None, seq_k: Optional[int] = None, head_dim_v: Optional[int] = None,
             dtype: torch.dtype = torch.float32, device="cpu", layout: str = "bhsd", k_bias: float = 0.0,
             requires_grad: bool = False, seed: Optional[int] = None):
    """Fresh standard-normal q, k, v in the given layout (never zeros).

    k_bias > 0 adds a large per-channel offset to K (shared by all tokens), as DiT activations
    have; it is what SageAttention's K smoothing removes.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    seq_k = seq_q if seq_k is None else seq_k
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    gen = torch.Generator(device="cpu")
    gen.manual_seed(torch.randint(0, 2**62, ()).item() if seed is None else seed)

    def rnd(h, s, d):
        return torch.randn(batch, h, s, d, generator=gen, dtype=torch.float32)

    q, k, v = rnd(heads, seq_q, head_dim), rnd(kv_heads, seq_k, head_dim), rnd(kv_heads, seq_k, head_dim_v)
    if k_bias:
        k = k + k_bias * torch.randn(1, kv_heads, 1, head_dim, generator=gen)
    out = []
    for t in (q, k, v):
        t = t.to(device=device, dtype=dtype)
        if layout == "bshd":
            t = t.transpose(1, 2).contiguous()
        t.requires_grad_(requires_grad)
        out.append(t)
    return tuple(out)


def input_grads(out: torch.Tensor, inputs, dout: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of (out * dout).sum() with respect to each of inputs, detached (nothing is
    accumulated into .grad)."""
    return [g.detach() for g in torch.autograd.grad(out, list(inputs), dout)]


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (or the dtype's max for integers) so unwritten elements show."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


def relative_rmse(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """||out - ref|| / max(||ref||, floor), in float64 (the RMS ratio): inf when out is not finite.
    floor: the size to measure against when ref is (near) zero in exact arithmetic."""
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    if not bool(torch.isfinite(o).all()):
        return float("inf")
    return ((o - r).norm() / max(r.norm().item(), floor, 1e-30)).item()


def metrics(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """max abs error, cosine similarity and relative L1 (sum|o - r| / sum|r|), in float64."""
    o, r = out.detach().double().flatten(), ref.detach().double().flatten()
    finite = bool(torch.isfinite(o).all())
    diff = (o - r).abs()
    cos = torch.nn.functional.cosine_similarity(o, r, dim=0, eps=1e-30).item() if o.numel() else 1.0
    return {
        "max_abs": diff.max().item() if o.numel() else 0.0,
        "cos_sim": cos,
        "rel_l1": (diff.sum() / r.abs().sum().clamp_min(1e-30)).item() if o.numel() else 0.0,
        "finite": finite,
    }


def describe_mismatch(out: torch.Tensor, ref: torch.Tensor, name: str = "out", worst: int = 5) -> str:
    """The worst elements with their indices, for assertion messages."""
    o, r = out.detach().double(), ref.detach().double()
    diff = (o - r).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    flat = diff.flatten()
    k = min(worst, flat.numel())
    vals, idx = flat.topk(k)
    lines = [f"{name}: shape {tuple(o.shape)}, {int((diff > 0).sum())} elements differ; worst:"]
    for val, i in zip(vals.tolist(), idx.tolist()):
        pos = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), o.shape))
        lines.append(f"  {pos}: got {o[pos].item():.6g}, expected {r[pos].item():.6g}, |diff| {val:.3g}")
    m = metrics(out, ref)
    lines.append(f"  max_abs={m['max_abs']:.3g} cos_sim={m['cos_sim']:.6f} rel_l1={m['rel_l1']:.3g}")
    return "\n".join(lines)


def assert_verbose_allclose(out: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float = 0.0,
                            name: str = "out") -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o, r = out.detach().double(), ref.detach().double()
    ok = torch.isclose(o, r, atol=atol, rtol=rtol, equal_nan=False)
    # -inf == -inf counts as equal (lse of fully masked rows)
    ok |= (o == r)
    if not bool(ok.all()):
        raise AssertionError(describe_mismatch(out, ref, name) + f"\n  (atol={atol}, rtol={rtol})")


def assert_flash_rule(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor, *,
                      factor: float = 2.0, atol: Optional[float] = None, name: str = "out") -> None:
    """flash_attn's rule: max|out - ref64| <= factor * max|torch_out - ref64| + atol, where
    torch_out is PyTorch's answer in the kernel's dtype (the error a user already accepts)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    atol = ATOL.get(out.dtype, 1e-5) if atol is None else atol
    o, r, t = out.detach().double(), ref64.detach().double(), torch_out.detach().double()
    both_inf = (o == r) & torch.isinf(r)
    err = torch.where(both_inf, torch.zeros_like(o), (o - r).abs())
    base = torch.where(both_inf, torch.zeros_like(o), (t - r).abs())
    err_max = err.max().item() if err.numel() else 0.0
    bound = factor * (base.max().item() if base.numel() else 0.0) + atol
    if not (err_max <= bound):  # also catches NaN
        raise AssertionError(describe_mismatch(out, ref64, name)
                             + f"\n  flash rule: err {err_max:.3g} > {factor} x torch err "
                               f"{base.max().item():.3g} + atol {atol:.3g}")


# CUDA errors after which the process's CUDA context is unusable: every later CUDA call in it
# fails with the same error (an H100 run of 2026-11-27 lost a pytest worker's 39 later tests so)
STICKY_CUDA_ERRORS = ("illegal memory access", "unspecified launch failure", "misaligned address",
                      "illegal instruction", "device-side assert", "hardware stack error")
CUDA_FAULT_EXIT = 70


def sla_float64_reference(qb, kb, vb, w, b, *, causal: bool, critical: float, negligible: float,
                          block_size, feature_map: str):
    """The float64 ground truth of an SLA test on bhsd q, k, v and the projection (w, b; b may be
    None): (classes, leaves, proj64, ref). The float64 reference classifies in float64 and must see
    the block map the inputs' own precision gives (fixed seeds; else the test picks another).
    leaves / proj64: the float64 copies that ref's gradients flow to."""
    from .reference import sla_reference
    from .reference.sla import sla_block_classes

    classes = sla_block_classes(qb, kb, causal=causal, critical=critical, negligible=negligible,
                                block_size=block_size)
    classes64 = sla_block_classes(qb.double(), kb.double(), causal=causal, critical=critical,
                                  negligible=negligible, block_size=block_size)
    assert torch.equal(classes, classes64), "float64 and low-precision classification differ: pick another seed"
    leaves = [t.detach().double().requires_grad_() for t in (qb, kb, vb)]
    proj64 = [t.detach().double().requires_grad_() if t is not None else None for t in (w, b)]
    ref = sla_reference(*leaves, *proj64, causal=causal, critical=critical, negligible=negligible,
                        block_size=block_size, feature_map=feature_map)
    return classes, leaves, proj64, ref


SLA_PROJ_ATOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 2e-4}  # dW, db: sums over rows


def assert_sla_rule(out, q, k, v, w, b, *, layout: str, ref, leaves, proj64, baseline, dout=None,
                    factor: float = 2.0, check_dtypes: bool = False) -> None:
    """An SLA kernel's out (and, given dout in out's layout, its gradients to q, k, v, w, b) by
    flash_attn's rule against the float64 reference (ref, leaves, proj64: sla_float64_reference),
    with baseline(q, k, v, w, b) the answer in the inputs' own dtype computed on detached copies
    (the error a user already accepts); gradients of dW, db get SLA_PROJ_ATOL on top."""
    from .inputs import to_bhsd

    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    same = [t.detach().clone().requires_grad_() for t in (qb, kb, vb)]
    proj_same = [t.detach().clone().requires_grad_() if t is not None else None for t in (w, b)]
    base = baseline(*same, *proj_same)
    assert_flash_rule(to_bhsd(out, layout), ref, base, name="out")
    if dout is None:
        return
    proj = [t for t in (w, b) if t is not None]
    got = input_grads(out, (q, k, v, *proj), dout)
    want = input_grads(ref, leaves + [t for t in proj64 if t is not None], to_bhsd(dout, layout).double())
    have = input_grads(base, same + [t for t in proj_same if t is not None], to_bhsd(dout, layout))
    names = ["dq", "dk", "dv"] + [n for n, t in (("dW", w), ("db", b)) if t is not None]
    for name, g, wt, h in zip(names, got, want, have):
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        if check_dtypes:
            assert g.dtype == (q.dtype if name in ("dq", "dk", "dv") else w.dtype if name == "dW" else b.dtype)
        g = to_bhsd(g, layout) if name in ("dq", "dk", "dv") else g
        atol = SLA_PROJ_ATOL[g.dtype] if name in ("dW", "db") else None
        assert_flash_rule(g, wt, h, factor=factor, atol=atol, name=name)


def is_sticky_cuda_error(message: str) -> bool:
    m = message.lower()
    return any(s in m for s in STICKY_CUDA_ERRORS)


def end_worker_after_cuda_fault(nodeid: str, excinfo, failure_log: Optional[str] = None) -> None:
    """For a pytest-xdist worker (PYTEST_XDIST_WORKER set) whose test just raised a sticky CUDA
    error: record it (stderr, and failure_log when given), then end the worker process, so that
    xdist reports that test as crashed and starts a fresh worker for the rest instead of every later
    test in this one failing on the poisoned context. Does nothing otherwise, or outside xdist
    (ending a plain pytest run would stop it)."""
    if excinfo is None or not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    message = f"{excinfo.typename}: {excinfo.value}"
    if not is_sticky_cuda_error(message):
        return
    line = f"[cuda fault] {nodeid}: {message.splitlines()[0]}; ending this worker\n"
    if failure_log:
        with open(failure_log, "a") as f:
            f.write(f"==== {nodeid} (call)\n{line}{excinfo.getrepr(style='short')}\n\n")
    sys.stderr.write(line)
    sys.stderr.flush()
    os._exit(CUDA_FAULT_EXIT)


def spy_attnlib_calls(monkeypatch) -> list[str]:
    """The methods of the calls the SDPA drop-in (and diffusers' processors) hand to attnlib, in
    order: through api.attention, or the drop-in's direct path for eager calls needing no
    gradient (integrations.sdpa._serve_direct). monkeypatch: pytest's fixture."""
    from . import api
    from .integrations import sdpa

    seen: list[str] = []
    real_attention, real_direct = api.attention, sdpa._serve_direct
    monkeypatch.setattr(api, "attention", lambda *a, **kw: seen.append(kw["method"]) or real_attention(*a, **kw))
    monkeypatch.setattr(sdpa, "_serve_direct",
                        lambda inp, kernel, query: seen.append(inp.method) or real_direct(inp, kernel, query))
    return seen
