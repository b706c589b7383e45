"""The shared benchmark runner: named providers, one flops() rule, timing, peak memory, JSON records.

Every benchmark file (bench_<method>.py) and the GPU script (gpu_check.py) go through here, so
all numbers are taken the same way:

* a **provider** is a name (``attnlib-triton``, ``sdpa-flash``, ``flex``, ...) mapped to a factory
  that, given a :class:`Case` and its input tensors, returns a zero-argument callable running the
  attention forward, or raises :class:`Skip` with the reason it cannot run them (for attnlib's
  backends the dispatcher's own ``explain`` reasons, so a skip says what a user would see);
* TFLOP/s always come from :func:`flops`;
* on CUDA the time is the median of CUDA-event timings after warm-up, with the L2 cache flushed
  before every timed call (as ``triton.testing.do_bench`` does: inputs that fit in L2 would
  otherwise be timed out of the cache); on CPU it is the median of ``time.perf_counter`` timings;
* peak memory is ``torch.cuda.max_memory_allocated()`` over one call, less what was allocated
  before it;
* each measurement becomes one JSON-ready dict (see :func:`measure`) with a ``status`` of
  ``ok``, ``skipped`` (with the reason) or ``error`` (with the exception text).

Entry point for ``python -m attnlib bench``: :func:`main_cli`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from attnlib.inputs import to_bhsd

MODES = ("fwd", "bwd", "full")
# backward = 2 x forward for dQ, dK/dV matmuls plus recomputing P: the convention of
# flash-attention's benchmarks (benchmark_flash_attention.py: bwd = 2.5 x fwd).
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "full": 3.5}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
ATTNLIB_PREFIX = "attnlib-"
SDPA_PREFIX = "sdpa-"

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_WORKLOADS = Path(__file__).resolve().parent / "workloads.json"
SHARED_WORKLOADS = REPO_ROOT.parent / "shared" / "workloads.json"


# ----------------------------------------------------------------------------------------------
# FLOPs
def flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool = False,
          mode: str = "fwd") -> float:
    """Floating-point operations of one attention call (heads = query heads).

    Forward: two matmuls (QK^T and PV) of 2*Sq*Sk*D each = 4*B*H*Sq*Sk*D, halved when causal.
    Backward: 2.5 x forward. "full" (forward + backward): 3.5 x forward.
    """
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    f = 4.0 * batch * heads * seq_q * seq_k * head_dim
    if causal:
        f /= 2.0
    return f * MODE_FACTOR[mode]


# ----------------------------------------------------------------------------------------------
# Cases
@dataclass(frozen=True)
class Case:
    """One benchmark point: a shape, dtype, causal flag and mode."""

    workload: str
    batch: int
    heads: int
    seq_q: int
    head_dim: int
    kv_heads: Optional[int] = None
    seq_k: Optional[int] = None
    causal: bool = False
    mode: str = "fwd"
    dtype: str = "bf16"
    layout: str = "bhsd"
    device: str = "cuda"

    def __post_init__(self) -> None:
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.seq_k is None:
            object.__setattr__(self, "seq_k", self.seq_q)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_gqa(self) -> bool:
        return self.heads != self.kv_heads

    @property
    def flops(self) -> float:
        return flops(self.batch, self.heads, self.seq_q, self.seq_k, self.head_dim, self.causal, self.mode)

    @property
    def shape(self) -> str:
        kv = f"/{self.kv_heads}" if self.is_gqa else ""
        s = f"S{self.seq_q}" if self.seq_q == self.seq_k else f"Sq{self.seq_q}xSk{self.seq_k}"
        return f"B{self.batch}xH{self.heads}{kv}x{s}xD{self.head_dim}"

    def label(self) -> str:
        return f"{self.workload}|{self.shape}|{self.dtype}|{'causal' if self.causal else 'full'}|{self.mode}"

    def shape_fields(self) -> dict:
        return {"workload": self.workload, "shape": self.shape, "batch": self.batch, "heads": self.heads,
                "kv_heads": self.kv_heads, "seq_q": self.seq_q, "seq_k": self.seq_k,
                "head_dim": self.head_dim, "dtype": self.dtype, "causal": self.causal, "mode": self.mode,
                "layout": self.layout, "device": self.device}


def load_workloads(path: Optional[os.PathLike] = None) -> list[dict]:
    """Real model shapes: ``$ATTNLIB_WORKLOADS``, else ../shared/workloads.json beside the repo,
    else the copy bundled in bench/ (the device machine gets the repo only, not ../shared)."""
    cands = [path, os.environ.get("ATTNLIB_WORKLOADS"), SHARED_WORKLOADS, BUNDLED_WORKLOADS]
    for p in cands:
        if p and Path(p).is_file():
            return json.loads(Path(p).read_text())["workloads"]
    return []


def workload_case(w: dict, *, mode: str = "fwd", dtype: str = "bf16", device: str = "cuda",
                  layout: str = "bhsd") -> Case:
    return Case(workload=w["name"], batch=w["batch"], heads=w["heads"], kv_heads=w.get("kv_heads"),
                seq_q=w["seq"], head_dim=w["head_dim"], causal=bool(w.get("causal", False)), mode=mode,
                dtype=dtype, device=device, layout=layout)


# ----------------------------------------------------------------------------------------------
# Providers
class Skip(Exception):
    """A provider cannot run a case; the message is the reason recorded."""


Step = Callable[[], Any]
Factory = Callable[["Case", torch.Tensor, torch.Tensor, torch.Tensor], Step]


@dataclass
class Provider:
    """A named way to run attention. ``make(case, q, k, v)`` returns a callable running the
    forward once (inputs in ``case.layout``), or raises :class:`Skip`. ``budget_s`` caps the
    seconds this provider may spend in one suite (compilers that rebuild per shape)."""

    name: str
    make: Factory
    description: str = ""
    budget_s: Optional[float] = None
    info: Callable[[Case, torch.Tensor, torch.Tensor, torch.Tensor], dict] = field(
        default=lambda case, q, k, v: {})
    check: bool = False  # forward output compared with torch SDPA on the same inputs (see check_output)


PROVIDERS: dict[str, Provider] = {}


def register_provider(name: str, make: Factory, description: str = "", *, budget_s: Optional[float] = None,
                      info=None, replace_existing: bool = False, check: bool = False) -> Provider:
    """Add a provider; later methods register theirs (e.g. ``attnlib-sage-triton``) the same way.
    ``check=True``: an exact-attention provider whose forward output is compared with torch SDPA
    on the benchmark's own inputs (:func:`check_output`)."""
    if name in PROVIDERS and not replace_existing:
        raise ValueError(f"provider {name!r} registered twice")
    p = Provider(name, make, description, budget_s, check=check)
    if info is not None:
        p.info = info
    PROVIDERS[name] = p
    return p


def provider_names() -> list[str]:
    return list(PROVIDERS)


def _attnlib_explain(case: Case, q, k, v, backend: str):
    import attnlib

    return attnlib.explain(q, k, v, method="flash", backend=backend, causal=case.causal, layout=case.layout)


def _attnlib_factory(backend: str) -> Factory:
    def make(case: Case, q, k, v) -> Step:
        import attnlib

        ex = _attnlib_explain(case, q, k, v, backend)
        if ex.chosen is None:
            parts = [f"{kern.name}: {'; '.join(reasons)}" for kern, reasons in ex.rejected]
            raise Skip(f"attnlib backend={backend!r} has no kernel for these inputs: "
                       + (" | ".join(parts) if parts else "no kernel registered"))

        def step():
            return attnlib.flash_attention(q, k, v, causal=case.causal, layout=case.layout, backend=backend)
        return step
    return make


def _attnlib_info(backend: str):
    def info(case: Case, q, k, v) -> dict:
        try:
            ex = _attnlib_explain(case, q, k, v, backend)
            return {"kernel": ex.chosen.name if ex.chosen else None}
        except Exception:  # noqa: BLE001 - info only
            return {}
    return info


def _sdpa_factory(backend_name: str) -> Factory:
    def make(case: Case, q, k, v) -> Step:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F

        be = getattr(SDPBackend, backend_name)
        if case.causal and case.seq_q != case.seq_k:
            raise Skip("torch SDPA's is_causal is top-left aligned; attnlib's causal is bottom-right, "
                       "so seq_q != seq_k would compare different functions")
        if backend_name == "MATH" and q.is_cuda:
            elem = 4 if case.dtype in ("fp32", "fp16", "bf16") else 8
            gib = case.batch * case.heads * case.seq_q * case.seq_k * elem * (3 if case.mode != "fwd" else 2)
            gib /= 2 ** 30
            if gib > 8:
                raise Skip(f"sdpa-math materialises the (B, H, Sq, Sk) scores: ~{gib:.0f} GiB here; "
                           "skipped above 8 GiB")
        qb, kb, vb = (to_bhsd(t, case.layout) for t in (q, k, v))
        gqa = case.is_gqa

        def step():
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(qb, kb, vb, is_causal=case.causal, enable_gqa=gqa)
        return step
    return make


_flex_compiled = None
_flex_masks: dict = {}


def _flex_make(case: Case, q, k, v) -> Step:
    global _flex_compiled
    if not q.is_cuda:
        raise Skip("flex runs on CUDA only in this runner (its CPU path compiles C++ per shape)")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    import torch._dynamo.config as dcfg

    if _flex_compiled is None:
        # one compiled function; each new shape recompiles, so allow more than the default 8
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), 256))
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if case.causal:
        key = (case.seq_q, case.seq_k, str(q.device))
        if key not in _flex_masks:
            off = case.seq_k - case.seq_q  # bottom-right aligned, as attnlib

            def causal_mod(b, h, q_idx, kv_idx):
                return q_idx + off >= kv_idx
            _flex_masks[key] = create_block_mask(causal_mod, B=None, H=None, Q_LEN=case.seq_q,
                                                 KV_LEN=case.seq_k, device=q.device)
        block_mask = _flex_masks[key]
    qb, kb, vb = (to_bhsd(t, case.layout) for t in (q, k, v))
    fn, gqa = _flex_compiled, case.is_gqa

    def step():
        return fn(qb, kb, vb, block_mask=block_mask, enable_gqa=gqa)
    return step


for _be in ("triton", "cuda", "torch", "auto"):
    register_provider(f"attnlib-{_be}", _attnlib_factory(_be), f"attnlib.flash_attention(backend={_be!r})",
                      info=_attnlib_info(_be), check=True)
for _name, _enum in (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
                     ("efficient", "EFFICIENT_ATTENTION"), ("math", "MATH")):
    register_provider(f"sdpa-{_name}", _sdpa_factory(_enum),
                      f"torch scaled_dot_product_attention under sdpa_kernel(SDPBackend.{_enum})")
register_provider("flex", _flex_make, "torch.compile(flex_attention), no mask (causal: a causal block mask)",
                  budget_s=45.0)


# ----------------------------------------------------------------------------------------------
# Inputs and timing
def make_inputs(case: Case, seed: int = 0):
    """Fresh standard-normal q, k, v on the case's device (never zeros), in the case's layout."""
    dev = torch.device(case.device)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    dt = case.torch_dtype

    def rnd(h, s, d):
        shape = (case.batch, h, s, d) if case.layout == "bhsd" else (case.batch, s, h, d)
        t = torch.randn(shape, generator=gen, device=dev, dtype=dt)
        return t.requires_grad_(case.mode != "fwd")
    return rnd(case.heads, case.seq_q, case.head_dim), rnd(case.kv_heads, case.seq_k, case.head_dim), \
        rnd(case.kv_heads, case.seq_k, case.head_dim)


def timed_step(case: Case, fwd: Step, q, k, v):
    """(step, reset): the callable to time for the mode, and what to run before each timing."""
    leaves = (q, k, v)

    def reset():
        for t in leaves:
            t.grad = None

    if case.mode == "fwd":
        return fwd, (lambda: None)
    if case.mode == "full":
        state = {}

        def full():
            out = fwd()
            if "dout" not in state:
                state["dout"] = torch.randn_like(out)
            out.backward(state["dout"])
            return out
        return full, reset
    out = fwd()  # mode bwd: forward once, outside the timings
    dout = torch.randn_like(out)

    def bwd():
        out.backward(dout, retain_graph=True)
    return bwd, reset


# Max |o - o_sdpa| allowed, per dtype, for standard-normal inputs (|o| is at most ~1 and usually
# ~0.1): two correct kernels differ by rounding of O (bf16: 2^-8 relative) plus accumulation order.
CHECK_ATOL = {"fp16": 2e-3, "bf16": 1.6e-2, "fp32": 1e-4}


def check_output(case: Case, step: Step, q, k, v) -> dict:
    """The forward output of an exact-attention provider next to torch SDPA's (default backend
    choice, same dtype) on the same inputs: catches a kernel config chosen by autotuning on the
    GPU that tests never ran. Returns record fields (check_max_abs, check_ok) or a skip reason."""
    import torch.nn.functional as F

    if case.causal and case.seq_q != case.seq_k:
        return {"check": "skipped: SDPA's is_causal is top-left aligned"}
    with torch.no_grad():
        out = step()
        if isinstance(out, tuple):
            out = out[0]
        qb, kb, vb = (to_bhsd(t.detach(), case.layout) for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qb, kb, vb, is_causal=case.causal, enable_gqa=case.is_gqa)
        err = (to_bhsd(out, case.layout).float() - ref.float()).abs().max().item()
    tol = CHECK_ATOL.get(case.dtype, 1e-2)
    return {"check_max_abs": err, "check_ok": bool(err <= tol), "check_atol": tol}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_flush_buf: dict = {}


def _flush_l2(device: torch.device) -> None:
    buf = _flush_buf.get(device)
    if buf is None:
        buf = _flush_buf[device] = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device)
    buf.zero_()


@dataclass
class TimingConfig:
    target_s: float = 0.25      # time spent in the timed repetitions of one measurement, about
    min_reps: int = 3
    max_reps: int = 100
    warmup: int = 1             # untimed calls after the first (compile/autotune) one; at least 1: it sizes reps


@contextlib.contextmanager
def env_var(name: str, value: str):
    """Set one environment variable around a block (attnlib's kernels read their switches per
    call), restoring what was there before."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def time_step(step: Step, reset: Callable[[], None], device: torch.device, cfg: TimingConfig
              ) -> tuple[float, int, list[float]]:
    """Median milliseconds of ``step`` (already called once, untimed). The warm-up calls also size
    the repetitions. CUDA events with an L2 flush before each call on CUDA; perf_counter on CPU.
    Returns (median_ms, reps, all_ms)."""
    cuda = device.type == "cuda"
    est = None
    for _ in range(max(1, cfg.warmup)):
        reset()
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        est = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(cfg.max_reps, max(cfg.min_reps, cfg.target_s / est)))
    times: list[float] = []
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            reset()
            _flush_l2(device)
            starts[i].record()
            step()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            reset()
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), reps, times


def peak_memory_mib(step: Step, reset: Callable[[], None], device: torch.device) -> Optional[float]:
    """Extra memory one call allocates at its peak (MiB), CUDA only."""
    if device.type != "cuda":
        return None
    reset()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def _short_exc(e: BaseException, limit: int = 1500) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


# SDPA backends that refuse a shape/dtype/device say so with these words; attnlib with NoKernelError
_SKIP_PATTERNS = ("No available kernel", "No viable backend", "NoKernelError")


def _record(case: Case, provider: str, **kw) -> dict:
    rec = {"provider": provider, **case.shape_fields(), "flops": case.flops, "ms": None, "tflops": None,
           "peak_mib": None, "reps": None, "status": "ok", "reason": None}
    rec.update(kw)
    return rec


def prepare(provider: str, case: Case, inputs) -> tuple[Step, Callable[[], None]]:
    """Build the provider's callable for the case's mode and make the first (untimed) call:
    compile, autotune, probe. Raises :class:`Skip` when the provider cannot run the case."""
    prov = PROVIDERS[provider]
    q, k, v = inputs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fwd = prov.make(case, q, k, v)
            step, reset = timed_step(case, fwd, q, k, v)
            reset()
            step()
            _sync(torch.device(case.device))
        except Skip:
            raise
        except Exception as e:  # noqa: BLE001
            if any(p in f"{type(e).__name__}: {e}" for p in _SKIP_PATTERNS):
                why = "; ".join(sorted({str(w.message).strip() for w in caught}))[:1500]
                raise Skip(_short_exc(e) + (f" [warnings: {why}]" if why else "")) from None
            raise
    return step, reset


def measure(provider: str, case: Case, inputs=None, timing: Optional[TimingConfig] = None) -> dict:
    """Time one provider on one case; always returns a record, never raises (except KeyboardInterrupt).

    Record keys: provider, workload, shape, batch, heads, kv_heads, seq_q, seq_k, head_dim, dtype,
    causal, mode, layout, device, flops, ms (median), tflops, peak_mib, reps, timer, status
    ("ok" | "skipped" | "error"), reason, and provider extras (e.g. kernel: what attnlib-auto ran).
    """
    timing = timing or TimingConfig()
    device = torch.device(case.device)
    if provider not in PROVIDERS:
        return _record(case, provider, status="error", reason=f"unknown provider {provider!r}; "
                       f"known: {', '.join(PROVIDERS)}")
    prov = PROVIDERS[provider]
    if device.type == "cuda" and not torch.cuda.is_available():
        return _record(case, provider, status="skipped", reason="CUDA is not available")
    q = k = v = None
    try:
        q, k, v = inputs if inputs is not None else make_inputs(case)
        extra = prov.info(case, q, k, v)
        step, reset = prepare(provider, case, (q, k, v))
        if prov.check and case.mode == "fwd" and device.type == "cuda":
            extra.update(check_output(case, step, q, k, v))
        ms, reps, _ = time_step(step, reset, device, timing)
        peak = peak_memory_mib(step, reset, device)
        tflops = case.flops / (ms * 1e-3) / 1e12 if ms > 0 else None
        return _record(case, provider, ms=ms, tflops=tflops, peak_mib=peak, reps=reps,
                       timer="cuda-events" if device.type == "cuda" else "cpu-perf_counter", **extra)
    except Skip as s:
        return _record(case, provider, status="skipped", reason=str(s))
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a failing provider is a result, not a crash
        rec = _record(case, provider, status="error", reason=_short_exc(e),
                      traceback="".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:])
        if device.type == "cuda":
            try:
                torch.cuda.synchronize(device)
            except BaseException as e2:  # noqa: BLE001
                rec["cuda_broken"] = _short_exc(e2, 300)
        return rec
    finally:
        if q is not None:
            for t in (q, k, v):
                t.grad = None


# ----------------------------------------------------------------------------------------------
# Suites
class Budget:
    """Wall-clock budget for a suite, with optional per-provider shares."""

    def __init__(self, total_s: Optional[float]) -> None:
        self.total_s = total_s
        self.t0 = time.perf_counter()
        self.spent: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self) -> bool:
        return self.total_s is not None and self.elapsed() > self.total_s

    def provider_over(self, prov: Provider) -> bool:
        return prov.budget_s is not None and self.spent.get(prov.name, 0.0) > prov.budget_s

    def charge(self, name: str, seconds: float) -> None:
        self.spent[name] = self.spent.get(name, 0.0) + seconds


def emit_record(records: list[dict], rec: dict, on_record: Optional[Callable[[dict], None]],
                log: Optional[Callable[[str], None]]) -> None:
    """Append rec, hand it to on_record (results written as they come) and log its line."""
    records.append(rec)
    if on_record is not None:
        on_record(rec)
    if log is not None:
        log(format_record(rec))


def run_suite(cases: Sequence[Case], providers: Sequence[str], *, budget_s: Optional[float] = None,
              timing: Optional[TimingConfig] = None, log: Optional[Callable[[str], None]] = print,
              on_record: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Every provider on every case, in order; cases past the budget are recorded as skipped."""
    budget = Budget(budget_s)
    records: list[dict] = []
    broken: Optional[str] = None

    def emit(rec: dict) -> None:
        emit_record(records, rec, on_record, log)

    for case in cases:
        if budget.over() or broken:
            why = (f"CUDA context broken by an earlier error: {broken}" if broken else
                   f"suite time budget of {budget_s:g} s spent")
            for p in providers:
                emit(_record(case, p, status="skipped", reason=why))
            continue
        if torch.device(case.device).type == "cuda" and not torch.cuda.is_available():
            for p in providers:
                emit(_record(case, p, status="skipped", reason="CUDA is not available"))
            continue
        try:
            inputs = make_inputs(case)
        except Exception as e:  # noqa: BLE001 (e.g. out of memory)
            for p in providers:
                emit(_record(case, p, status="error", reason="making inputs: " + _short_exc(e)))
            continue
        for p in providers:
            prov = PROVIDERS.get(p)
            if prov is not None and budget.provider_over(prov):
                emit(_record(case, p, status="skipped",
                             reason=f"{p}'s share of the time budget ({prov.budget_s:.0f} s) spent"))
                continue
            if budget.over():
                emit(_record(case, p, status="skipped", reason=f"suite time budget of {budget_s:g} s spent"))
                continue
            t0 = time.perf_counter()
            rec = measure(p, case, inputs, timing)
            budget.charge(p, time.perf_counter() - t0)
            emit(rec)
            if rec.get("cuda_broken"):
                broken = rec["cuda_broken"]
                break
        del inputs
        if torch.device(case.device).type == "cuda" and torch.cuda.is_available() and not broken:
            torch.cuda.empty_cache()
    annotate_ratios(records)
    return records


# ----------------------------------------------------------------------------------------------
# Ratios
def _shape_key(r: dict) -> tuple:
    return tuple(r.get(k) for k in ("workload", "batch", "heads", "kv_heads", "seq_q", "seq_k", "head_dim",
                                    "dtype", "causal", "mode", "layout", "device"))


def _fastest_baselines(records: Iterable[dict], baseline_prefix: str) -> dict[tuple, dict]:
    best: dict[tuple, dict] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("ms") and r["provider"].startswith(baseline_prefix):
            key = _shape_key(r)
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    return best


def speed_ratios(records: Iterable[dict], attnlib_prefix: str = ATTNLIB_PREFIX,
                 baseline_prefix: str = SDPA_PREFIX) -> list[dict]:
    """For each attnlib provider and shape measured in one run: its speed relative to the fastest
    SDPA backend on the same shape, ``ratio = fastest_sdpa_ms / attnlib_ms`` (= attnlib TFLOP/s /
    SDPA TFLOP/s; above 1 means attnlib is faster). Shapes with no successful SDPA time are left out."""
    records = list(records)
    best = _fastest_baselines(records, baseline_prefix)
    out = []
    for r in records:
        if r.get("status") != "ok" or not r.get("ms") or not r["provider"].startswith(attnlib_prefix):
            continue
        b = best.get(_shape_key(r))
        if b is None:
            continue
        out.append({"provider": r["provider"], "workload": r["workload"], "shape": r.get("shape"),
                    "causal": r.get("causal"), "mode": r.get("mode"), "dtype": r.get("dtype"), "ms": r["ms"],
                    "baseline": b["provider"], "baseline_ms": b["ms"], "ratio": b["ms"] / r["ms"]})
    return out


def annotate_ratios(records: list[dict], attnlib_prefix: str = ATTNLIB_PREFIX,
                    baseline_prefix: str = SDPA_PREFIX) -> list[dict]:
    """Add ``speed_vs_sdpa`` (as in :func:`speed_ratios`) and ``sdpa_best`` to each successful
    attnlib record that has an SDPA time on the same shape; returns the same list."""
    best = _fastest_baselines(records, baseline_prefix)
    for r in records:
        if r.get("status") == "ok" and r.get("ms") and r["provider"].startswith(attnlib_prefix):
            b = best.get(_shape_key(r))
            if b is not None:
                r["speed_vs_sdpa"] = b["ms"] / r["ms"]
                r["sdpa_best"] = b["provider"]
    return records


# ----------------------------------------------------------------------------------------------
# Environment and output
def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def environment() -> dict:
    """What the numbers were measured on."""
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cudnn": None, "triton": _version("triton"),
        "cupy": _version("cupy-cuda13x") or _version("cupy-cuda12x") or _version("cupy"),
        "attnlib": _version("attnlib"), "cuda_available": torch.cuda.is_available(),
        "gpu": None, "sm_count": None, "compute_capability": None, "gpu_memory_gib": None,
        "l2_cache_mib": None, "driver": None, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import attnlib
        env["attnlib"] = env["attnlib"] or attnlib.__version__
    except Exception:  # noqa: BLE001
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sm_count=p.multi_processor_count,
                   compute_capability=f"sm_{p.major}{p.minor}", gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                   l2_cache_mib=round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1) or None)
        try:
            env["cudnn"] = torch.backends.cudnn.version()
        except Exception:  # noqa: BLE001
            pass
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            if out.returncode == 0:
                fields = [f.strip() for f in out.stdout.strip().splitlines()[0].split(",")]
                env.update(zip(("driver", "sm_clock_max", "power_limit"), fields))
        except Exception:  # noqa: BLE001
            pass
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["cpu_threads"] = torch.get_num_threads()
    return env


def device_slug(name: Optional[str]) -> str:
    """A folder name for a card: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    s = re.sub(r"[^a-z0-9]+", "-", (name or "cpu").lower()).strip("-")
    return s or "unknown"


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def format_record(r: dict) -> str:
    head = f"{r['provider']:<15} {r['workload']:<24} {r.get('shape', ''):<26} " \
           f"{'causal' if r.get('causal') else 'full':<6} {r.get('mode', ''):<4}"
    if r.get("status") == "ok":
        ratio = f"  x{r['speed_vs_sdpa']:.2f} vs {r['sdpa_best']}" if r.get("speed_vs_sdpa") else ""
        mem = f" {r['peak_mib']:9.1f} MiB" if r.get("peak_mib") is not None else ""
        return f"{head} {r['ms']:10.3f} ms {_fmt(r.get('tflops'), '8.2f')} TFLOP/s{mem}{ratio}"
    reason = (r.get("reason") or "").replace("\n", " ")
    return f"{head} {r.get('status', '?').upper()}: {reason[:200]}"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(records: Sequence[dict]) -> str:
    """A markdown table of records; skipped/failed ones point to a numbered note with the reason."""
    lines = ["| workload | shape | dtype | causal | mode | provider | ms | TFLOP/s | peak MiB | "
             "speed vs fastest SDPA |",
             "|---|---|---|---|---|---|---:|---:|---:|---|"]
    notes: dict[str, int] = {}
    for r in records:
        if r.get("status") == "ok":
            tfl = r.get("tflops")
            ms, mem = _fmt(r.get("ms"), ".3f"), _fmt(r.get("peak_mib"), ".0f")
            tf = "" if tfl is None else (f"{tfl:.1f}" if tfl >= 10 else f"{tfl:.3g}")
            ratio = (f"{r['speed_vs_sdpa']:.2f}x ({r['sdpa_best']})" if r.get("speed_vs_sdpa") is not None
                     else "")
        else:
            reason = (r.get("reason") or "").strip()
            n = notes.setdefault(reason, len(notes) + 1)
            ms, tf, mem, ratio = f"{r.get('status', '?')} [{n}]", "", "", ""
        prov = r["provider"] + (f" ({r['kernel']})" if r.get("kernel") else "")
        lines.append(f"| {_md(r['workload'])} | {_md(r.get('shape', ''))} | {r.get('dtype', '')} | "
                     f"{'yes' if r.get('causal') else 'no'} | {r.get('mode', '')} | {_md(prov)} | {ms} | {tf} | "
                     f"{mem} | {_md(ratio)} |")
    if notes:
        lines += ["", "Reasons for skipped / failed rows:", ""]
        for reason, n in notes.items():
            lines.append(f"{n}. {_md(reason[:600])}")
    return "\n".join(lines)


def write_json(path: os.PathLike, records: Sequence[dict], env: Optional[dict] = None, **extra) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"env": env or {}, **extra, "records": list(records)}, indent=1, default=str))
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# CLI
def main_cli(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m attnlib bench [--full] [--providers a,b] [--modes fwd,full] [--budget S] [--out DIR]``.

    Runs the flash suite (on CPU: a tiny shape), prints one line per measurement and a ratio
    summary; with --out, writes results.json and summary.md there."""
    ap = argparse.ArgumentParser(prog="python -m attnlib bench", description=main_cli.__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the long shape list (default: the quick one)")
    ap.add_argument("--providers", default=None, help=f"comma list; known: {','.join(PROVIDERS)}")
    ap.add_argument("--modes", default=None, help="comma list of fwd,bwd,full (default fwd,full)")
    ap.add_argument("--budget", type=float, default=None, help="seconds before remaining cases are skipped")
    ap.add_argument("--out", default=None, help="folder for results.json and summary.md")
    ap.add_argument("--list-providers", action="store_true")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.list_providers:
        for p in PROVIDERS.values():
            print(f"{p.name:<16} {p.description}")
        return 0
    from bench.bench_flash import run_flash_suite

    providers = args.providers.split(",") if args.providers else None
    modes = tuple(args.modes.split(",")) if args.modes else None
    env = environment()
    print(f"attnlib bench on {env['gpu'] or 'CPU'} (torch {env['torch']}, triton {env['triton']})", flush=True)
    records = run_flash_suite(quick=not args.full, providers=providers, modes=modes, budget_s=args.budget,
                              log=lambda s: print(s, flush=True))
    ratios = speed_ratios(records)
    if ratios:
        print("\nspeed vs fastest SDPA backend (>1: attnlib faster):")
        for x in ratios:
            print(f"  {x['provider']:<15} {x['workload']:<24} {x['shape']:<26} {x['mode']:<4} "
                  f"{'causal' if x['causal'] else 'full':<6} {x['ratio']:.2f}x ({x['baseline']})")
    if args.out:
        out = Path(args.out)
        write_json(out / "results.json", records, env)
        (out / "summary.md").write_text(markdown_table(records) + "\n")
        print(f"wrote {out / 'results.json'} and {out / 'summary.md'}")
    return 0 if not any(r["status"] == "error" for r in records) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    raise SystemExit(main_cli())
