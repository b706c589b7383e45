"""Benchmarks for method asymrnr: accuracy against full attention next to random token dropping,
and time against full flash attention with the matching cost included.

* accuracy (:func:`run_accuracy`): synthetic video-like latents (:func:`video_latents`: seeded
  fields smooth in space and time plus noise, projected to q, k, v per head); relative L1 and
  cosine similarity of the attention output against full attention at q/kv ratios 0.3, 0.5, 0.7
  (and the paper's q 0.5 / kv 0.3), for AsymRnR and for random token dropping at the same ratios.
  "random" drops uniformly chosen sources (Q and K/V) and restores each dropped query from its own
  stride tile's destination: AsymRnR without the similarity matching. Runs on CPU (small grid,
  torch pieces) and on GPU (larger grid, Triton pieces).
* timing (:func:`run_timing`, GPU): the Wan2.1-1.3B self-attention shape (B1 H12 S32760 D128,
  grid 21x30x52, bf16) with q_ratio 0.5 / kv_ratio 0.3: full flash (attnlib auto), AsymRnR with
  matching every call, AsymRnR reusing cached matches (reduce + attention + restore), and the
  matching alone. The issue's target: AsymRnR <= 0.45x full flash.
* :func:`run_asymrnr_suite`: both, with a time budget; used by gpu_check.py. Also
  ``python bench/bench_asymrnr.py [--out DIR]``.
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import runner  # noqa: E402
from attnlib.inputs import to_bhsd  # noqa: E402

RATIOS = (0.3, 0.5, 0.7)
PAPER_RATIOS = (0.5, 0.3)  # (q, kv): the Wan2.1 target setting
WAN_GRID = (21, 30, 52)    # Wan2.1-1.3B 480p 81 frames: 32760 tokens
WAN_SHAPE = dict(batch=1, heads=12, head_dim=128)
CPU_EVAL = dict(grid=(4, 8, 8), heads=2, head_dim=32)   # the tests' grid
GPU_EVAL = dict(grid=(8, 16, 16), heads=4, head_dim=64)  # the suite's, on either device (~2 s on a CPU)
SUITE_BUDGET_S = 60.0


# ----------------------------------------------------------------------------------------------
# Inputs
def video_latents(grid, *, batch: int = 1, heads: int = 2, kv_heads: Optional[int] = None, head_dim: int = 32,
                  channels: int = 64, waves: int = 8, noise: float = 0.1, qk_align: float = 0.8,
                  sharpness: float = 2.0, text_tokens: int = 0, text_side: str = "end", seed: int = 0,
                  dtype: torch.dtype = torch.float32, device="cpu", layout: str = "bhsd"):
    """Seeded q, k, v of a video-like latent. Per channel a sum of low-frequency plane waves over
    (frame, row, column), so neighbours in space and time are alike, plus white noise of size
    ``noise``; random normal text tokens; per-head linear projections.

    As in trained attention, tokens attend to tokens like themselves: the key projection is
    ``qk_align`` times the query projection plus an independent part, and q is scaled by
    ``sharpness`` (2.0 gives a mean top attention probability near 0.45 on the CPU grid). With
    independent projections (qk_align 0) attention is nearly uniform, and dropping random keys
    (an unbiased subsample) does as well as AsymRnR's K/V reduction. Never zeros."""
    kv_heads = heads if kv_heads is None else kv_heads
    gen = torch.Generator().manual_seed(seed)
    F, H, W = grid
    pos = torch.stack(torch.meshgrid(torch.arange(F) / F, torch.arange(H) / H, torch.arange(W) / W,
                                     indexing="ij"), -1).reshape(-1, 3)          # (N, 3) in [0, 1)
    freq = torch.rand(waves, channels, 3, generator=gen) * 2.0                   # up to 2 cycles per axis
    phase = torch.rand(waves, channels, generator=gen) * 2 * math.pi
    amp = torch.randn(waves, channels, generator=gen) / math.sqrt(waves)
    field = (amp * torch.sin(2 * math.pi * torch.einsum("nk,wck->nwc", pos, freq) + phase)).sum(1)  # (N, C)
    z = field.expand(batch, -1, -1) + noise * torch.randn(batch, F * H * W, channels, generator=gen)
    if text_tokens:
        text = torch.randn(batch, text_tokens, channels, generator=gen)
        z = torch.cat([text, z] if text_side == "start" else [z, text], 1)

    def weight(h):
        return torch.randn(channels, h * head_dim, generator=gen) / math.sqrt(channels)

    def project(w, h, gain=1.0):
        x = (gain * (z @ w)).reshape(batch, z.shape[1], h, head_dim)   # bshd
        x = x.to(device=device, dtype=dtype)
        return x.contiguous() if layout == "bshd" else x.transpose(1, 2).contiguous()

    wq = weight(heads)
    # GQA: kv head j aligns with the first query head of its group
    wq_kv = wq.reshape(channels, kv_heads, heads // kv_heads, head_dim)[:, :, 0].reshape(channels, -1)
    wk = qk_align * wq_kv + math.sqrt(1 - qk_align ** 2) * weight(kv_heads)
    return project(wq, heads, sharpness), project(wk, kv_heads), project(weight(kv_heads), kv_heads)


# ----------------------------------------------------------------------------------------------
# Random token dropping (the baseline)
def tile_destinations(part) -> torch.Tensor:
    """For each source of the partition, the index (into part.dst) of its own stride tile's destination."""
    F, H, W = part.grid
    sf, sh, sw = part.stride
    nh, nw = -(-H // sh), -(-W // sw)
    offset = part.text_tokens if part.text_side == "start" else 0

    def tile(tok):
        t = tok - offset
        f, h, w = t // (H * W), (t // W) % H, t % W
        return ((f // sf) * nh + h // sh) * nw + w // sw
    dst_of_tile = torch.empty(int(tile(part.dst).max()) + 1, dtype=torch.int64, device=part.dst.device)
    dst_of_tile[tile(part.dst)] = torch.arange(part.n_dst, device=part.dst.device)
    return dst_of_tile[tile(part.src)]


def random_matches(part, batch: int, heads: int, seed: int = 0):
    """Matches whose order is a seeded random permutation and whose destination is the tile's own."""
    from attnlib.asymrnr import Matches

    gen = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(part.n_src, generator=gen) for _ in range(batch * heads)])
    order = order.reshape(batch, heads, -1).to(part.dst.device)
    node = tile_destinations(part).expand(batch, heads, -1).contiguous()
    return Matches(node, torch.zeros(order.shape, device=order.device), order, part.key)


def random_drop_attention(q, k, v, grid, *, q_ratio: float, kv_ratio: float, seed: int = 0,
                          backend: str = "auto", text_tokens: int = 0, text_side: str = "end"):
    """The baseline on bhsd q, k, v: random sources dropped, dropped queries copy their tile's destination."""
    from attnlib.asymrnr import partition, reduced_attention

    part = partition(grid, seed=seed, text_tokens=text_tokens, text_side=text_side, device=q.device)
    qm = random_matches(part, q.shape[0], q.shape[1], seed + 1)
    kvm = random_matches(part, k.shape[0], k.shape[1], seed + 2)
    return reduced_attention(q, k, v, (part, qm), (part, kvm), q_ratio=q_ratio, kv_ratio=kv_ratio,
                             backend=backend)


# ----------------------------------------------------------------------------------------------
# Accuracy
def evaluate(grid, *, heads: int, head_dim: int, ratios: Sequence[float] = RATIOS, seed: int = 0,
             device="cpu", dtype=torch.float32, backend: str = "auto", kv_heads: Optional[int] = None,
             log: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Relative L1 and cosine vs full attention for AsymRnR and random dropping at each ratio pair."""
    import attnlib
    from attnlib.asymrnr import asymrnr_attention
    from attnlib.testing import metrics

    q, k, v = video_latents(grid, heads=heads, kv_heads=kv_heads, head_dim=head_dim, seed=seed, dtype=dtype,
                            device=device)
    inner = "torch" if backend == "torch" else "auto"
    full = attnlib.attention(q, k, v, method="flash", backend=inner)
    pairs = [(r, r) for r in ratios] + [PAPER_RATIOS]
    rows = []
    for rq, rkv in pairs:
        for name, fn in (("asymrnr", lambda: asymrnr_attention(q, k, v, grid=grid, q_ratio=rq, kv_ratio=rkv,
                                                                 seed=seed, backend=backend)),
                         ("random", lambda: random_drop_attention(q, k, v, grid, q_ratio=rq, kv_ratio=rkv,
                                                                  seed=seed, backend=backend))):
            m = metrics(fn(), full)
            rows.append({"method": name, "q_ratio": rq, "kv_ratio": rkv, "grid": list(grid), "heads": heads,
                         "head_dim": head_dim, "dtype": str(dtype).replace("torch.", ""),
                         "rel_l1": m["rel_l1"], "cos_sim": m["cos_sim"], "max_abs": m["max_abs"]})
            if log:
                log(f"{name:<8} q {rq:.1f} kv {rkv:.1f}  rel_l1 {m['rel_l1']:.4f}  cos {m['cos_sim']:.5f}")
    return rows


def accuracy_table(rows: Sequence[dict]) -> str:
    by = {(r["q_ratio"], r["kv_ratio"], r["method"]): r for r in rows}
    lines = ["| q ratio | kv ratio | AsymRnR rel L1 | random rel L1 | AsymRnR cos | random cos |",
             "|---:|---:|---:|---:|---:|---:|"]
    for rq, rkv in dict.fromkeys((r["q_ratio"], r["kv_ratio"]) for r in rows):
        a, b = by.get((rq, rkv, "asymrnr")), by.get((rq, rkv, "random"))
        if a and b:
            lines.append(f"| {rq:.1f} | {rkv:.1f} | {a['rel_l1']:.4f} | {b['rel_l1']:.4f} | "
                         f"{a['cos_sim']:.5f} | {b['cos_sim']:.5f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Timing (GPU): providers in the shared runner, so numbers are taken as the flash ones are
GRIDS = {"wan2.1-1.3b-480p-81f": WAN_GRID, "asymrnr-cpu-tiny": (3, 4, 5)}
CPU_CASE = dict(workload="asymrnr-cpu-tiny", batch=1, heads=2, seq_q=60, head_dim=16, dtype="fp32", device="cpu")
CACHE_STEPS = (3, 5)  # the paper's configs refresh the matches every 3 (HunyuanVideo, Mochi) or 5 (CogVideoX) steps
TIMING_PROVIDERS = ("sdpa-flash", "attnlib-auto", "attnlib-asymrnr", "attnlib-asymrnr-cached", "asymrnr-match",
                    *(f"attnlib-asymrnr-cache{n}" for n in CACHE_STEPS))


def _grid(case) -> tuple:
    if case.workload not in GRIDS:
        raise runner.Skip(f"no token grid known for workload {case.workload!r}")
    return GRIDS[case.workload]


def _asymrnr_make(case, q, k, v):
    import attnlib

    grid = _grid(case)
    rq, rkv = PAPER_RATIOS

    def step():
        return attnlib.attention(q, k, v, method="asymrnr", grid=grid, q_ratio=rq, kv_ratio=rkv,
                                 layout=case.layout)
    return step


def _asymrnr_cached_make(case, q, k, v):
    from attnlib.asymrnr import AsymRnR

    rq, rkv = PAPER_RATIOS
    rnr = AsymRnR(_grid(case), q_ratio=rq, kv_ratio=rkv, cache_steps=1 << 30)

    def step():  # after the first call every call reuses the partition and matches
        return rnr.attention(q, k, v, step=0, block=0, layout=case.layout)
    return step


def _asymrnr_every_make(calls: int):
    """The paper's matching cache (arXiv 2412.11706: configs refresh every 3 or 5 steps): one
    provider step is `calls` consecutive denoising steps of one block, the first refreshing the
    partition and matches, the rest reusing them. time_ratios divides its time by `calls`."""
    def make(case, q, k, v):
        from attnlib.asymrnr import AsymRnR

        rq, rkv = PAPER_RATIOS
        rnr = AsymRnR(_grid(case), q_ratio=rq, kv_ratio=rkv, cache_steps=calls)
        state = {"step": 0}

        def step():
            first = state["step"]
            state["step"] += calls
            for s in range(first, first + calls):
                out = rnr.attention(q, k, v, step=s, block=0, layout=case.layout)
            return out
        return step
    return make


def calls_per_step(provider: str) -> int:
    """Attention calls in one step of a provider: n for attnlib-asymrnr-cache<n>, else 1."""
    m = re.search(r"-cache(\d+)$", provider)
    return int(m.group(1)) if m else 1


def _match_make(case, q, k, v):
    from attnlib.asymrnr import match, partition

    part = partition(_grid(case), device=q.device)
    qb, vb = to_bhsd(q, case.layout), to_bhsd(v, case.layout)

    def step():  # what one refresh costs: Q matched on Q, K/V on V
        return match(qb, part), match(vb, part)
    return step


runner.register_provider("attnlib-asymrnr", _asymrnr_make,
                         "attnlib.attention(method='asymrnr', q_ratio=0.5, kv_ratio=0.3): matching every call",
                         replace_existing=True)
runner.register_provider("attnlib-asymrnr-cached", _asymrnr_cached_make,
                         "AsymRnR module with cached matches: reduce + attention + restore", replace_existing=True)
runner.register_provider("asymrnr-match", _match_make, "AsymRnR matching of Q and V alone (Triton)",
                         replace_existing=True)
for _n in CACHE_STEPS:
    runner.register_provider(f"attnlib-asymrnr-cache{_n}", _asymrnr_every_make(_n),
                             f"AsymRnR module, matches refreshed every {_n} steps: ms for {_n} calls",
                             replace_existing=True)


def timing_cases(device: str = "cuda") -> list:
    w = next((w for w in runner.load_workloads() if w["name"] == "wan2.1-1.3b-480p-81f"), None)
    if w is None:
        w = {"name": "wan2.1-1.3b-480p-81f", "seq": 32760, **WAN_SHAPE}
    return [runner.workload_case(w, mode="fwd", dtype="bf16", device=device)]


def run_timing(budget_s: Optional[float] = None, log: Optional[Callable[[str], None]] = print) -> list[dict]:
    timing = runner.TimingConfig(target_s=0.2, max_reps=30)
    return runner.run_suite(timing_cases(), list(TIMING_PROVIDERS), budget_s=budget_s, timing=timing, log=log)


def time_ratios(records: Sequence[dict]) -> list[dict]:
    """Each asymrnr provider's time per attention call relative to full flash (attnlib-auto) on
    the same shape (a cache<n> provider's step is n calls)."""
    full = {r["shape"]: r for r in records if r["provider"] == "attnlib-auto" and r.get("status") == "ok"}
    out = []
    for r in records:
        if r.get("status") == "ok" and "asymrnr" in r["provider"] and r["shape"] in full:
            ms = r["ms"] / calls_per_step(r["provider"])
            out.append({"provider": r["provider"], "shape": r["shape"], "ms": ms,
                        "full_ms": full[r["shape"]]["ms"], "ratio": ms / full[r["shape"]]["ms"]})
    return out


# ----------------------------------------------------------------------------------------------
# The suite (gpu_check.py) and the command line
def run_asymrnr_suite(budget_s: float = SUITE_BUDGET_S, *, device: Optional[str] = None,
                      log: Optional[Callable[[str], None]] = print) -> dict:
    """On CUDA: the Wan2.1-1.3B timing first (the headline number), then the accuracy on the
    GPU_EVAL grid in bf16 with the Triton pieces if time is left; on CPU: the accuracy on the same
    grid in fp32 with the torch pieces. Returns a JSON-ready dict."""
    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    res: dict = {"device": device, "accuracy": [], "timing": [], "notes": []}
    if device == "cuda":
        res["timing"] = run_timing(max(10.0, budget_s - 15.0), log=log)
        res["time_ratios"] = time_ratios(res["timing"])
    else:
        res["notes"].append("timing needs CUDA: not run")
    cfg, dtype = GPU_EVAL, (torch.bfloat16 if device == "cuda" else torch.float32)
    if time.perf_counter() - t0 < budget_s - 5.0:
        try:
            res["accuracy"] = evaluate(cfg["grid"], heads=cfg["heads"], head_dim=cfg["head_dim"], device=device,
                                       dtype=dtype, backend="auto" if device == "cuda" else "torch", log=log)
        except Exception as e:  # noqa: BLE001 - a failure is a result
            res["notes"].append(f"accuracy evaluation failed: {type(e).__name__}: {e}")
    else:
        res["notes"].append("accuracy evaluation skipped: the suite's time budget was spent")
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def summary_markdown(res: dict) -> str:
    lines = ["# AsymRnR evaluation", "",
             f"Suite time {res.get('seconds')} s.", "",
             f"Device {res['device']}. Accuracy on synthetic video latents (bench/bench_asymrnr.py "
             "`video_latents`): AsymRnR vs random token dropping against full attention.", "",
             accuracy_table(res["accuracy"]), ""]
    if res["accuracy"]:
        r = res["accuracy"][0]
        tokens = math.prod(r["grid"])
        lines += [f"Latent grid {tuple(r['grid'])} = {tokens} tokens, {r['heads']} heads, head dim {r['head_dim']}, "
                  f"{r['dtype']}, seed 0; relative L1 = sum|o - o_full| / sum|o_full|.", ""]
    if res.get("timing"):
        lines += ["## Time at the Wan2.1-1.3B shape (bf16, q_ratio 0.5, kv_ratio 0.3); target <= 0.45x full flash",
                  ""]
        for x in res.get("time_ratios", []):
            lines.append(f"- {x['provider']}: {x['ms']:.3f} ms per call = {x['ratio']:.3f}x full flash "
                         f"({x['full_ms']:.3f} ms)")
        lines += ["", "attnlib-asymrnr matches every call; attnlib-asymrnr-cache<n> refreshes the matches every n "
                  "steps (the paper's matching cache), timed over n consecutive calls and divided by n (the table "
                  "below gives the n calls' time); attnlib-asymrnr-cached never refreshes."]
        lines += ["", runner.markdown_table(res["timing"]), ""]
    lines += [f"- {n}" for n in res.get("notes", [])]
    return "\n".join(lines) + "\n"


def write_results(out: Path, res: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "asymrnr.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "asymrnr.md").write_text(summary_markdown(res))


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="AsymRnR accuracy vs random dropping, and time vs full flash")
    ap.add_argument("--budget", type=float, default=SUITE_BUDGET_S)
    ap.add_argument("--out", default=None, help="folder for asymrnr.json and asymrnr.md")
    args = ap.parse_args(argv)
    res = run_asymrnr_suite(args.budget)
    print(summary_markdown(res))
    if args.out:
        write_results(Path(args.out), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
