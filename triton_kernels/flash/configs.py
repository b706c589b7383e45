"""Launch configurations for the Triton flash kernels: H100 candidates per head dim, one small
config under TRITON_INTERPRET=1, and the autotuner's pruning by shared-memory budget.

Environment switches:
  ATTNLIB_FLASH_AUTOTUNE=0   skip autotuning and use the first (default) candidate per head dim.
  ATTNLIB_FLASH_TMA=1        dense fp16/bf16 forwards run the tensor-descriptor (TMA) kernel of
                             forward_tma.py with its own candidates (FWD_TMA_H100); inputs it cannot
                             express (misaligned base or strides, varlen, fp32, pre-Hopper GPUs) keep
                             the default kernel. Off by default until a GPU run compares the two.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton

from ..switches import autotune_enabled, interpreting
from ..hostmath import next_power_of_2

# Each candidate is (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed by the padded head dim
# (HEAD_DIM rounded up to a power of two, at least 16). The first entry of each list is the
# default when autotuning is off. For the backward dK/dV kernel BLOCK_M is the streamed query
# block and BLOCK_N the resident key block; for dQ, BLOCK_M is resident and BLOCK_N streamed.
#
# Every fp16/bf16 candidate here was compiled for sm_90 with Triton 3.6 and ptxas
# (`tests/triton_sm90.py --suite flash --all-candidates`): it uses wgmma, does not spill
# registers and fits H100's 227 KB of shared memory, causal or not, dense or varlen, at the
# table's head dim and the smaller ones padded up to it (e.g. 72 and 96 under 128). Candidates
# that spilled were dropped; speed is the GPU autotuner's call, not a claim made here.
#
# Forward. A 128-row Q tile per CTA (two wgmma warpgroups at 8 warps, one at 4): the Triton
# tutorial keeps 8 warps only for tiles of at least 128 x 128 on Hopper, 4 below.
#   hd32/64: (128, 64, 4, 4) was the autotuner's pick on H100 (bench/results dev runs);
#            128 x 128 with 8 warps and 3-4 stages is the tutorial's Hopper shape; 64 x 64 x 4
#            warps for short or ragged sequences.
#   hd128:   (128, 64, 8, 3) was the H100 pick; (128, 128, 8, 3), the tutorial/FA3 tile, takes
#            224 KB of shared memory (the estimate below is exact for the forward), so it is
#            offered only on cards with that much (H100/H200), never as the default; a
#            4-stage 128 x 64 and a 64 x 64 x 4 warps for small grids.
#   hd256:   the 128 x 256 fp32 accumulator needs 8 warps; (64, 64, 8, 2) and (128, 32, 8, 2).
#            128 x 64 and 64 x 32 x 4 warps spilled and are gone. The 2-stage tiles wait for every
#            copy at each key block (TTGIR async_wait num = 0, at hd192 too); (128, 32, 8, 3)
#            (160 KB) and (64, 32, 8, 3) (128 KB, 198 registers) keep one in flight without
#            spilling, offered to the autotuner (64 x 64 at 3 stages spilled).
FWD_H100 = {
    32: [(128, 64, 4, 4), (128, 128, 8, 3), (64, 64, 4, 4)],
    64: [(128, 64, 4, 4), (128, 128, 8, 3), (128, 128, 8, 4), (64, 64, 4, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 64, 8, 2)],
    256: [(64, 64, 8, 2), (128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 8, 3), (64, 32, 8, 2)],
}
# The last entries of hd128 and hd256, 96 KB each, are for cards with 99 KB of shared memory per
# block (sm_86 / sm_89), where every entry before them needs more: the first that fits is their
# default (before stop 22 they fell to FALLBACK's 32 x 32 tile).
# dK/dV. K and V of the resident key block sit in shared memory as wgmma operands; the two
# fp32 accumulators dK, dV (2 x BLOCK_N x D) are what fills the registers, so 8 warps (two
# warpgroups, 64 key rows each) wherever BLOCK_N = 128 or D = 256. Q/dO stream in thin slices
# (FA2 §3.2; the Triton tutorial streams 32 rows past 128 keys).
#   hd32:    the tutorial's (32, 128, 4, 5) fits in one warpgroup here (at hd64 it spilled).
#   hd64:    (32, 128, 8, 4) 139-210 registers; a 64-row slice; (32, 64, 4, 4) for small grids.
#   hd128:   (32, 128, 8, 3) 232-249 registers; 16-row slices with a 4th stage; BLOCK_N 64.
#   hd256:   dK + dV alone take 128 registers a thread at BLOCK_N 64 with 8 warps. (16, 64, 8, 3)
#            is the one shape found without spills at every padded head dim (32 x 64 spilled
#            8-16 bytes at hd192 causal, 4 warps spilled kilobytes).
BWD_DKDV_H100 = {
    32: [(32, 128, 4, 5), (32, 128, 8, 4), (64, 128, 8, 3)],
    64: [(32, 128, 8, 4), (64, 128, 8, 3), (32, 64, 4, 4)],
    128: [(32, 128, 8, 3), (16, 128, 8, 4), (32, 64, 8, 3)],
    256: [(16, 64, 8, 3)],
}
# dK/dV plus dQ's share by atomics (deterministic=False): dS^T K adds a BLOCK_M x D fp32 result
# per step to dK and dV, added to the fp32 buffer with 16-byte atomics (PTX
# atom.global.relaxed.add.v4.f32 on sm_90). Compiled for sm_90 (dense and varlen, at the table's
# head dim and 3/4 of it): the deterministic table's hd32-128 tiles still fit without spills
# except 64 x 128 at hd64 (causal spilled 8 bytes); at hd256 (16, 64, 8, 3) spilled 32 bytes, so
# one more stage at 16 x 64 (180 KB, no spill) leads, and 32 x 32 (mma.sync, 224 registers).
BWD_DKDV_DQ_H100 = {
    32: [(32, 128, 4, 5), (32, 128, 8, 4), (64, 128, 8, 3)],
    64: [(32, 128, 8, 4), (32, 64, 4, 4)],
    128: [(32, 128, 8, 3), (16, 128, 8, 4), (32, 64, 8, 3)],
    256: [(16, 64, 8, 4), (32, 32, 8, 3)],
}
# dQ: the mirror image, a 128-row resident Q/dO tile and thin K/V slices. Dropped for spilling:
# (64, 64, 4, 3) at hd128 and (64, 16, 4, 2) at hd256; (32, 32, 4, 2) at hd256 is too small for
# wgmma (it compiled to mma.sync) and gave way to a 3-stage 64 x 32.
BWD_DQ_H100 = {
    32: [(128, 32, 4, 5), (128, 64, 8, 3), (64, 64, 4, 4)],
    64: [(128, 32, 4, 5), (128, 64, 8, 3), (64, 64, 4, 4)],
    128: [(128, 32, 8, 4), (128, 64, 8, 3)],
    256: [(64, 32, 8, 2), (64, 32, 8, 3)],
}
# Always fits (also fp32 at hd256); appended so pruning never leaves nothing.
FALLBACK = (32, 32, 4, 1)
# fp32 with a padded head dim of 256: FALLBACK fits but ptxas gives up on it (sm_90: dK/dV 22 KB,
# dQ 28 KB of spills per thread at 32 registers); 16 x 16 tiles spill 0.06-1 KB.
FP32_WIDE = (16, 16, 4, 1)

# Under the CPU interpreter: one small config, BLOCK_M != BLOCK_N so tests exercise the
# block-alignment arithmetic of the causal loop bounds.
INTERPRET_FWD = (32, 16, 1, 1)
INTERPRET_DKDV = (16, 32, 1, 1)
INTERPRET_DQ = (32, 16, 1, 1)

SMEM_BUDGET = 170 * 1024  # bytes of the estimate, leaving room below H100's 227 KB for layout conversions
H100_SMEM = 227 * 1024    # the opt-in shared memory per block (sm_90) the tables and SMEM_BUDGET were fitted to
# The autotuner re-tunes when one of these changes: the real head dim (72 and 96 both pad to 128
# but mask different columns, so their best tiles may differ), causal, varlen, a key bias (its
# scores are scaled before the row max: other registers), one per query head (the dK/dV kernel
# loads it in its loop: other registers again). The dtype needs no entry: Triton's
# Autotuner.run (3.6, runtime/autotuner.py) appends str(arg.dtype) of every tensor argument to the
# key (tests/test_flash_triton.py checks both; 3.8 and 3.9 too). Every kernel tuned on this key
# takes all its names as arguments: 3.6 skipped a name a kernel lacks, 3.9 refuses it.
AUTOTUNE_KEY = ["HEAD_DIM", "D_PAD", "CAUSAL", "VARLEN", "HAS_KEY_BIAS", "BIAS_PER_HEAD"]

# Forward on tensor descriptors (forward_tma.py, ATTNLIB_FLASH_TMA=1): (BLOCK_M, BLOCK_N,
# num_warps, num_stages, warp_specialize). The first entries are FWD_H100's tiles, so a run with
# autotuning off compares the load path alone. warp_specialize=True candidates use Triton 3.6's
# Hopper warp-specialization pass (a TMA producer warpgroup and two consumer warpgroups that split
# BLOCK_M, 12 warps in all from num_warps=4, as the 06-fused-attention tutorial runs on Hopper):
# compiled for sm_90 it only partitions with num_warps=4 (at 8 it compiles to the plain kernel)
# and only a single key loop (two loops crash the pass, triton-lang/triton#9728, #8260), so that
# variant masks every key block. Its shared memory is the estimate plus a BLOCK_M x D staging tile
# for O (tma_smem_bytes). Every entry compiled for sm_90 without spills (tests/triton_sm90.py
# --suite flash --tma --all-candidates); speed is the GPU autotuner's call.
#
# The warp-specialized candidates are withdrawn (WS_WITHDRAWN, and forward_tma refuses them on a
# GPU): on an H100 (2026-11-27, bench/results/nvidia-h100-80gb-hbm3/stop19-run3/) 9 of the 10 bf16
# cases of tests/test_flash_triton.py::test_tma_bf16_head_dims failed with the autotuner free to
# pick among them: outputs NaN from query row 64 (or 0, 128) on, or lse values of other rows, which
# fits the two consumer warpgroups' row halves. The same tests had passed on an H200 (run of
# 11:28 the same day), where the autotuner may have picked plain candidates. Which candidate ran
# was not recorded; test_gpu_tma_each_candidate now pins each entry so that a GPU run names it.
# Triton's own tutorial turns warp specialization off for Hopper and older (triton-lang/triton
# PR 7108), and wrong results from warp_specialize=True with descriptor loads are an open Triton
# bug (issue 8311): the fault is more likely the compiler's than this kernel's.
WS_WITHDRAWN = {
    32: [(128, 64, 4, 4, True), (128, 128, 4, 3, True)],
    64: [(128, 64, 4, 4, True), (128, 128, 4, 3, True)],
    128: [(128, 64, 4, 3, True), (128, 128, 4, 2, True)],
    256: [(128, 32, 4, 2, True)],
}
FWD_TMA_H100 = {
    32: [(128, 64, 4, 4, False), (128, 128, 8, 3, False), (64, 64, 4, 4, False)],
    64: [(128, 64, 4, 4, False), (128, 128, 8, 3, False), (128, 128, 8, 4, False), (64, 64, 4, 4, False)],
    128: [(128, 64, 8, 3, False), (128, 128, 8, 3, False), (128, 64, 8, 4, False), (64, 64, 4, 3, False)],
    256: [(64, 64, 8, 2, False), (128, 32, 8, 2, False)],
}
INTERPRET_FWD_TMA = (32, 16, 1, 1, False)
TMA_AUTOTUNE_KEY = ["HEAD_DIM", "D_PAD", "CAUSAL"]  # as AUTOTUNE_KEY (dense only: no VARLEN)


def tma_requested() -> bool:
    """ATTNLIB_FLASH_TMA=1: dense fp16/bf16 forwards use the descriptor kernel where they can."""
    return os.environ.get("ATTNLIB_FLASH_TMA", "0") == "1"


def padded_head_dim(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


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
    seen += [FALLBACK, FP32_WIDE]
    return [_config(c) for c in seen]


def _key(cfg: triton.Config) -> tuple[int, int, int, int]:
    return (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)


def _smem_bytes(c: tuple[int, int, int, int], d_pad: int, elem: int, resident_rows: str) -> int:
    """Rough shared memory: the resident tile once, the two streamed tiles per stage."""
    bm, bn, _, stages = c
    resident, streamed = (bm, bn) if resident_rows == "M" else (bn, bm)
    return (resident + 2 * streamed * max(stages, 1)) * d_pad * elem


def candidates(table: dict, d_pad: int, elem: int, resident_rows: str,
               exact_smem_limit: Optional[int] = None,
               device_smem: Optional[int] = None) -> list[tuple[int, int, int, int]]:
    """The configs autotuning may try for this head dim and element size, best guess first.

    exact_smem_limit: for a kernel whose estimate _smem_bytes is exact (the forward: compiled
    for sm_90, Q + stages x (K + V) is what Triton allocates), the device's opt-in shared
    memory per block; candidates up to it are kept. Otherwise the estimate must stay under
    SMEM_BUDGET, which leaves room for what it does not count.

    device_smem: the device's opt-in shared memory per block. Below H100's (A100 164 KB, sm_86 /
    sm_89 cards 99 KB) the budget shrinks with it: for the exact kernels to the limit itself,
    for the others in SMEM_BUDGET's proportion to H100's. Until stop 22 the budget was never
    below SMEM_BUDGET, so a first candidate (autotuning off) could need more shared memory than
    such a card has and fail at launch (tests/test_triton_sm90_compile.py compiles them for
    sm_80 and sm_89).
    """
    if elem == 4:
        # fp32 inputs are served for accuracy, not speed, and the shared-memory estimate above
        # undershoots for them: compiled for sm_90 here (tests/triton_sm90.py), the dK/dV
        # kernel at hd72 with (32, 64, 4, 4) takes 257 KB (estimate 160 KB; H100 has 227 KB).
        # FALLBACK fits every kernel and head dim (at most 192 KB) and needs one compile.
        return [FP32_WIDE if d_pad >= 256 else FALLBACK]
    budget = max(SMEM_BUDGET, exact_smem_limit or 0)
    if device_smem is not None and device_smem < H100_SMEM:
        budget = device_smem if exact_smem_limit is not None else SMEM_BUDGET * device_smem // H100_SMEM
    cands = table[_table_key(d_pad)]
    wanted = [c for c in cands if _smem_bytes(c, d_pad, elem, resident_rows) <= budget] or [FALLBACK]
    return wanted if autotune_enabled("flash") else wanted[:1]


@functools.lru_cache(maxsize=None)
def _device_smem_limit(index: int) -> int:
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def device_smem_limit(t: torch.Tensor) -> Optional[int]:
    """Opt-in shared memory per block of t's CUDA device (H100: 227 KB); None off CUDA."""
    if t.device.type != "cuda":
        return None
    return _device_smem_limit(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _pruner(table: dict, resident_rows: str, exact_smem: bool = False):
    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:
            return configs
        d_pad = kwargs.get("D_PAD", named_args.get("D_PAD"))
        q = named_args["Q"]
        limit = device_smem_limit(q)
        wanted = candidates(table, d_pad, q.element_size(), resident_rows, limit if exact_smem else None, limit)
        by_key = {_key(cfg): cfg for cfg in configs}
        return [by_key[w] for w in wanted if w in by_key]  # the table's order: the first is the default
    return prune


def fwd_autotune():
    return triton.autotune(configs=_all_configs(FWD_H100, INTERPRET_FWD), key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _pruner(FWD_H100, "M", exact_smem=True)})


def dkdv_autotune():
    return triton.autotune(configs=_all_configs(BWD_DKDV_H100, INTERPRET_DKDV), key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _pruner(BWD_DKDV_H100, "N")})


def dkdv_dq_autotune():
    # the timed trials would add dQ into the buffer again and again: zeroed before each
    return triton.autotune(configs=_all_configs(BWD_DKDV_DQ_H100, INTERPRET_DKDV), key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _pruner(BWD_DKDV_DQ_H100, "N")},
                           reset_to_zero=["DQ_ACC"])


def dq_autotune():
    return triton.autotune(configs=_all_configs(BWD_DQ_H100, INTERPRET_DQ), key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _pruner(BWD_DQ_H100, "M")})


def _tma_config(c: tuple) -> triton.Config:
    bm, bn, warps, stages, ws = c
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPEC": ws}, num_warps=warps, num_stages=stages)


def tma_smem_bytes(c: tuple, d_pad: int) -> int:
    """Shared memory of a descriptor-forward candidate (16-bit inputs) as compiled for sm_90:
    Q + stages x (K + V), a BLOCK_M x D staging tile for O in the warp-specialized kernel (the
    plain one reuses the loop's buffers), and 1 KB of barriers."""
    bm, _, _, _, ws = c
    return _smem_bytes(c[:4], d_pad, 2, "M") + (bm * d_pad * 2 if ws else 0) + 1024


def tma_fitting(d_pad: int, exact_smem_limit: Optional[int] = None) -> list[tuple]:
    """The descriptor forward's table entries for this padded head dim (16-bit inputs only) that
    fit the shared memory, best guess first; the same rule as candidates() for the pointer
    forward. Empty where none fits a card with less shared memory than an H100 (sm_120's 99 KB
    at hd128 and up: TMA is there, the tiles are not): forward_tma then refuses the call."""
    budget = max(SMEM_BUDGET, exact_smem_limit or 0)
    if exact_smem_limit is not None and exact_smem_limit < H100_SMEM:
        budget = exact_smem_limit  # as candidates() (before, a 99 KB card was offered 130 KB tiles)
    cands = FWD_TMA_H100[_table_key(d_pad)]
    return [c for c in cands if tma_smem_bytes(c, d_pad) <= budget]


def tma_candidates(d_pad: int, exact_smem_limit: Optional[int] = None) -> list[tuple]:
    """What the descriptor forward's autotuner may launch: the first fitting entry only,
    autotuning or not, until test_gpu_tma_each_candidate (which pins every tma_fitting entry) has
    passed on a GPU: the H100 failures of stop 19 came with the autotuner free to pick (see
    WS_WITHDRAWN), and with autotuning off (the first entries) the same tests passed on an H200."""
    return tma_fitting(d_pad, exact_smem_limit)[:1]


def _tma_pruner(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    d_pad = kwargs.get("D_PAD", named_args.get("D_PAD"))
    wanted = {_key(_tma_config(c)) + (c[4],) for c in tma_candidates(d_pad, device_smem_limit(named_args["Q"]))}
    return [cfg for cfg in configs if _key(cfg) + (cfg.kwargs["WARP_SPEC"],) in wanted]


def fwd_tma_autotune():
    if interpreting():
        cfgs = [_tma_config(INTERPRET_FWD_TMA)]
    else:
        seen = []
        for cands in FWD_TMA_H100.values():
            seen += [c for c in cands if c not in seen]
        cfgs = [_tma_config(c) for c in seen]
    return triton.autotune(configs=cfgs, key=TMA_AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _tma_pruner})
