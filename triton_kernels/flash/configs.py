"""Launch configurations for the Triton flash kernels: H100 candidates per head dim, one small
config under TRITON_INTERPRET=1, and the autotuner's pruning by shared-memory budget.

Environment switches:
  ATTNLIB_FLASH_AUTOTUNE=0   skip autotuning and use the first (default) candidate per head dim.
"""
from __future__ import annotations

import os

import triton

# Each candidate is (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed by the padded head dim
# (HEAD_DIM rounded up to a power of two, at least 16). The first entry of each list is the
# default when autotuning is off. For the backward dK/dV kernel BLOCK_M is the streamed query
# block and BLOCK_N the resident key block; for dQ, BLOCK_M is resident and BLOCK_N streamed.
#
# Why these (H100, 228 KB shared memory, 255 registers/thread):
# - forward: a 128-row Q tile with 64-wide K/V tiles keeps two wgmma-sized MMAs per step and
#   leaves room for 3-4 pipeline stages up to hd128; hd128 needs 8 warps to hold the 128x128
#   fp32 accumulator without spilling. hd256 drops to BLOCK_M=64 and 2 stages (Q 32 KB + two
#   64x256 K/V stages 128 KB).
# - dK/dV: the resident K/V tile is the wide one (BLOCK_N=128) and Q/dO stream in thin 32-row
#   slices with deep pipelining (FA2 paper §3.2 / Triton tutorial choice); hd128 keeps two
#   128x128 fp32 accumulators, so 8 warps.
# - dQ: the mirror image, a 128-row resident Q/dO tile and thin 32-wide K/V slices.
FWD_H100 = {
    32: [(128, 64, 4, 4), (128, 128, 4, 3), (64, 64, 4, 4)],
    64: [(128, 64, 4, 4), (128, 128, 8, 3), (64, 64, 4, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    256: [(64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
}
BWD_DKDV_H100 = {
    32: [(32, 128, 4, 5), (64, 128, 8, 3), (32, 64, 4, 4)],
    64: [(32, 128, 4, 5), (64, 128, 8, 3), (32, 64, 4, 4)],
    128: [(32, 128, 8, 4), (64, 128, 8, 3), (32, 64, 4, 4)],
    256: [(32, 64, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2)],
}
BWD_DQ_H100 = {
    32: [(128, 32, 4, 5), (128, 64, 8, 3), (64, 64, 4, 4)],
    64: [(128, 32, 4, 5), (128, 64, 8, 3), (64, 64, 4, 4)],
    128: [(128, 32, 8, 4), (128, 64, 8, 3), (64, 64, 4, 3)],
    256: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 4, 2)],
}
# Always fits (also fp32 at hd256); appended so pruning never leaves nothing.
FALLBACK = (32, 32, 4, 1)

# Under the CPU interpreter: one small config, BLOCK_M != BLOCK_N so tests exercise the
# block-alignment arithmetic of the causal loop bounds.
INTERPRET_FWD = (32, 16, 1, 1)
INTERPRET_DKDV = (16, 32, 1, 1)
INTERPRET_DQ = (32, 16, 1, 1)

SMEM_BUDGET = 170 * 1024  # bytes of the estimate, leaving room below H100's 227 KB for layout conversions
AUTOTUNE_KEY = ["D_PAD", "CAUSAL", "VARLEN"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_enabled() -> bool:
    return os.environ.get("ATTNLIB_FLASH_AUTOTUNE", "1") != "0"


def padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _table_key(d_pad: int) -> int:
    return max(32, d_pad)


def _config(c: tuple[int, int, int, int]) -> triton.Config:
    bm, bn, warps, stages = c
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _all_configs(table: dict, interpret_cfg: tuple) -> list[triton.Config]:
    if interpreting():
        return [_config(interpret_cfg)]
    seen = []
    for cands in table.values():
        for c in cands:
            if c not in seen:
                seen.append(c)
    seen.append(FALLBACK)
    return [_config(c) for c in seen]


def _key(cfg: triton.Config) -> tuple[int, int, int, int]:
    return (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)


def _smem_bytes(c: tuple[int, int, int, int], d_pad: int, elem: int, resident_rows: str) -> int:
    """Rough shared memory: the resident tile once, the two streamed tiles per stage."""
    bm, bn, _, stages = c
    resident, streamed = (bm, bn) if resident_rows == "M" else (bn, bm)
    return (resident + 2 * streamed * max(stages, 1)) * d_pad * elem


def candidates(table: dict, d_pad: int, elem: int, resident_rows: str) -> list[tuple[int, int, int, int]]:
    """The configs autotuning may try for this head dim and element size, best guess first."""
    if elem == 4:
        # fp32 inputs are served for accuracy, not speed, and the shared-memory estimate above
        # undershoots for them: compiled for sm_90 here (tests/triton_sm90.py), the dK/dV
        # kernel at hd72 with (32, 64, 4, 4) takes 257 KB (estimate 160 KB; H100 has 227 KB).
        # FALLBACK fits every kernel and head dim (at most 192 KB) and needs one compile.
        return [FALLBACK]
    cands = table[_table_key(d_pad)]
    wanted = [c for c in cands if _smem_bytes(c, d_pad, elem, resident_rows) <= SMEM_BUDGET] or [FALLBACK]
    return wanted if autotune_enabled() else wanted[:1]


def _pruner(table: dict, resident_rows: str):
    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:
            return configs
        d_pad = kwargs.get("D_PAD", named_args.get("D_PAD"))
        wanted = candidates(table, d_pad, named_args["Q"].element_size(), resident_rows)
        return [cfg for cfg in configs if _key(cfg) in wanted]
    return prune


def fwd_autotune():
    return triton.autotune(configs=_all_configs(FWD_H100, INTERPRET_FWD), key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _pruner(FWD_H100, "M")})


def dkdv_autotune():
    return triton.autotune(configs=_all_configs(BWD_DKDV_H100, INTERPRET_DKDV), key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _pruner(BWD_DKDV_H100, "N")})


def dq_autotune():
    return triton.autotune(configs=_all_configs(BWD_DQ_H100, INTERPRET_DQ), key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _pruner(BWD_DQ_H100, "M")})
