"""Launch-config sweep of the block-sparse forward kernel, measured on a GPU.

Compiled for sm_90 (2026-11-27), every config of block_sparse_fwd_kernel with 3 or more stages
draws ptxas's warning C7515 (wgmma serialized), at 64- and 128-row tiles alike, while the flash
forward with the same tile and stages does not; with 2 stages the warning goes, and so does the
overlap of the next tile's loads (TTGIR async_wait 0). Which costs more is for a GPU to say: this
sweep times each (warps, stages) of the kernel's tile for the mask blocks (128, 64) and (64, 64)
at densities 1.0 / 0.1, B1 H16 S16384 hd128 bf16, against the launcher's default on the same
inputs (outputs compared).

    python bench/sweep_block_sparse.py --out DIR     # GPU: DIR/sweep_block_sparse.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from attnlib.block_mask import block_mask_to_index  # noqa: E402
from attnlib.triton_kernels.block_sparse import configs, forward  # noqa: E402

BLOCKS = ((128, 64), (64, 64))
DENSITIES = (1.0, 0.1)
CONFIGS = [(w, s) for w in (4, 8) for s in (2, 3, 4)]  # (warps, stages) of the mask block's tile
SHAPE = dict(batch=1, heads=16, seq=16384, head_dim=128)


def inputs(block, density, device, dtype=torch.bfloat16, shape=None):
    shape = shape or SHAPE
    b, h, s, d = shape["batch"], shape["heads"], shape["seq"], shape["head_dim"]
    gen = torch.Generator().manual_seed(int(density * 100) + block[0])
    q, k, v = (torch.randn(b, h, s, d, generator=gen).to(device, dtype) for _ in range(3))
    mask = torch.rand(b, h, -(-s // block[0]), -(-s // block[1]), generator=gen) < density
    num, idx = block_mask_to_index(mask.to(device))
    return q, k, v, num, idx


def run(q, k, v, num, idx, block, config=None):
    """The forward (out, lse), with the tile's (warps, stages) replaced when config is given."""
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if config is None:
        forward.block_sparse_fwd(q, k, v, out, lse, num, idx, block_size=block, causal=False,
                                 scale=q.shape[-1] ** -0.5)
        return out, lse
    default = configs.launch_config(*block, q.shape[-1], "fwd", q.element_size())
    with mock.patch.object(forward, "launch_config",
                           lambda *a, **kw: default._replace(num_warps=config[0], num_stages=config[1])):
        forward.block_sparse_fwd(q, k, v, out, lse, num, idx, block_size=block, causal=False,
                                 scale=q.shape[-1] ** -0.5)
    return out, lse


def sweep(out_dir: Path, budget_s: float, *, device: str = "cuda", shape=None, dtype=torch.bfloat16,
          candidates=CONFIGS, blocks=BLOCKS, densities=DENSITIES) -> list[dict]:
    """Each (warps, stages) against the default per (block, density); records also written to
    out_dir/sweep_block_sparse.json after each. device, shape, dtype, candidates, blocks and
    densities are for the CPU smoke test (Triton's interpreter)."""
    from bench.sweep_linear import timer

    bench = timer(torch.device(device), 5, 25)
    t0 = time.perf_counter()
    records: list[dict] = []
    points = [(block, density) for block in blocks for density in densities]
    for i, (block, density) in enumerate(points):
        if time.perf_counter() - t0 > budget_s:
            records.append(dict(block=list(block), density=density, config="default", skipped="budget spent"))
            continue
        # an even share of what is left for each (block, density), so every one is reached
        deadline = time.perf_counter() + (budget_s - (time.perf_counter() - t0)) / (len(points) - i)
        q, k, v, num, idx = inputs(block, density, device, dtype, shape)
        ref, _ = run(q, k, v, num, idx, block)
        base = bench(lambda: run(q, k, v, num, idx, block))
        default = configs.launch_config(*block, q.shape[-1], "fwd", q.element_size())
        records.append(dict(block=list(block), density=density, config="default",
                            default=[default.num_warps, default.num_stages], ms=base))
        print(f"block {block} density {density} default {default} {base:.3f} ms", flush=True)
        for cfg in candidates:
            rec = dict(block=list(block), density=density, config=list(cfg))
            if time.perf_counter() > deadline:
                rec["skipped"] = "budget spent"
                records.append(rec)
                continue
            try:
                got, _ = run(q, k, v, num, idx, block, cfg)
                diff = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                ms = bench(lambda: run(q, k, v, num, idx, block, cfg))
                rec.update(ms=ms, vs_default=base / ms, rel_diff=diff)
                print(f"block {block} density {density} warps {cfg[0]} stages {cfg[1]}: {ms:.3f} ms "
                      f"{base / ms:.2f}x default, rel diff {diff:.1e}", flush=True)
            except Exception as e:  # noqa: BLE001 - a config that does not launch is a result
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            records.append(rec)
        (out_dir / "sweep_block_sparse.json").write_text(json.dumps(records, indent=1))
    return records


def run_sweep_suite(budget_s: float, log=print, *, out, **kw) -> list[dict]:
    """gpu_check's suite sweep_block_sparse: the sweep's records (also written under out); []
    without CUDA unless ``device`` is given (kw: the CPU smoke test's sizes)."""
    if not torch.cuda.is_available() and "device" not in kw:
        return []
    return sweep(Path(out), budget_s, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget", type=float, default=60.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sweep(out, args.budget)


if __name__ == "__main__":
    main()
