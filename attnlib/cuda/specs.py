"""Compiled-kernel specialisations: source, entry point, -D defines, name, and the source hash.

Standard library only: scripts/build_cubins.py loads this file by path, without importing
attnlib (and so torch), inside pip's isolated build environment.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Iterable

DTYPES = ("fp16", "bf16")


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation: compiled once per arch, cached and shipped under ``name``."""

    name: str                       # encodes every template parameter, e.g. flash_fwd_hd64_fp16_causal0_bm64_bn64
    source: str                     # entry source, relative to csrc/
    entry: str                      # extern "C" kernel name
    defines: tuple[tuple[str, str], ...] = ()
    smem_bytes: int = 0             # dynamic shared memory per block
    threads: int = 128
    min_arch: int = 80              # lowest compute capability (major * 10 + minor)
    needs_cuda_headers: bool = False  # does the source include toolkit headers (cuda_fp16.h, ...)?
    extra_options: tuple[str, ...] = field(default=())

    def define_options(self) -> list[str]:
        return [f"-D{k}={v}" for k, v in self.defines]


def flash_fwd_smem_bytes(head_dim: int, block_m: int, block_n: int, m_atoms: int = 1) -> int:
    """Dynamic shared memory of csrc/flash (Traits::SMEM_BYTES): a Q tile and double-buffered K
    and V tiles, 2 bytes per element; rows of head_dim elements (XOR-swizzled) at one atom per
    warp, of head_dim + 8 (padded) at two."""
    row_elems = head_dim + (8 if m_atoms > 1 else 0)
    return 2 * row_elems * (block_m + 4 * block_n)


# The 128-row tile (two 16-row mma atoms per warp, FlashAttention-2's sm_80 warp tiling):
# keys per main-loop step by head dim. The largest step that compiles without register spills
# for sm_80 and sm_90 (nvcc 13.0): hd128 x 64 keys spilled 8-88 bytes in every variant tried.
TILE128_BLOCK_N = {64: 64, 128: 32}
# The steps ATTNLIB_CUDA_FLASH_BLOCK_N may ask for (the first is the default). At hd128 (nvcc 13.0,
# 255 registers): 48 keys spill 16 bytes (causal 40) on sm_90 and none on sm_80; 64 keys (what
# FlashAttention-2 runs on sm_80 / sm_90 at hd128: half the barriers and softmax steps per key)
# spill 128-176 bytes on sm_90, 92-112 on sm_80. Which is fastest is for a GPU to say
# (bench/bench_flash.py's attnlib-cuda-bn48 / -bn64); only the default is shipped as a cubin.
TILE128_BLOCK_N_CHOICES = {64: (64,), 128: (32, 48, 64)}


def flash_fwd_spec(head_dim: int, dtype: str, causal: bool, block_m: int = 64, block_n: int = 64,
                   m_atoms: int = 1) -> KernelSpec:
    """The FlashAttention-2 forward kernel of csrc/flash/flash_fwd.cu for one parameter set.

    m_atoms: 16-row mma atoms per warp. 1 is the GPU-verified kernel (block_m / 16 warps); 2 is
    the 128-row tile of 4 warps x 32 rows (block_m must be 128), not yet run on a GPU."""
    if head_dim not in (64, 128):
        raise ValueError(f"flash_fwd is built for head dims 64 and 128, not {head_dim}")
    if dtype not in DTYPES:
        raise ValueError(f"flash_fwd dtype must be one of {DTYPES}, got {dtype!r}")
    if m_atoms not in (1, 2):
        raise ValueError(f"flash_fwd m_atoms must be 1 or 2, got {m_atoms!r}")
    if m_atoms == 2 and block_m != 128:
        raise ValueError(f"flash_fwd with two atoms per warp is a 128-row tile (4 warps), not block_m={block_m}")
    if block_m % (16 * m_atoms) or block_n % 16 or block_m <= 0 or block_n <= 0:
        raise ValueError(f"flash_fwd tile {block_m}x{block_n} does not split into 16-row atoms and 16-key steps")
    name = f"flash_fwd_hd{head_dim}_{dtype}_causal{int(causal)}_bm{block_m}_bn{block_n}"
    defines = (("ATTNLIB_HEAD_DIM", str(head_dim)), ("ATTNLIB_BF16", str(int(dtype == "bf16"))),
               ("ATTNLIB_CAUSAL", str(int(causal))), ("ATTNLIB_BLOCK_M", str(block_m)),
               ("ATTNLIB_BLOCK_N", str(block_n)))
    if m_atoms != 1:  # the one-atom specs keep their names and defines (cache keys, shipped cubins)
        name += f"_ma{m_atoms}"
        defines += (("ATTNLIB_M_ATOMS", str(m_atoms)),)
    return KernelSpec(
        name=name,
        source="flash/flash_fwd.cu",
        entry="attnlib_flash_fwd",
        defines=defines,
        smem_bytes=flash_fwd_smem_bytes(head_dim, block_m, block_n, m_atoms),
        threads=32 * (block_m // (16 * m_atoms)),
        min_arch=80,
    )


def flash_fwd_tile128_spec(head_dim: int, dtype: str, causal: bool, block_n: int | None = None) -> KernelSpec:
    """The 128-row tile (the default; ATTNLIB_CUDA_FLASH_TILE_M=64 picks the other): two atoms per
    warp, block_n keys per step (default TILE128_BLOCK_N; one of TILE128_BLOCK_N_CHOICES)."""
    if head_dim not in TILE128_BLOCK_N:
        raise ValueError(f"flash_fwd is built for head dims 64 and 128, not {head_dim}")
    block_n = TILE128_BLOCK_N[head_dim] if block_n is None else block_n
    if block_n not in TILE128_BLOCK_N_CHOICES[head_dim]:
        raise ValueError(f"flash_fwd's 128-row tile at head dim {head_dim} takes "
                         f"{TILE128_BLOCK_N_CHOICES[head_dim]} keys per step, not {block_n!r}")
    return flash_fwd_spec(head_dim, dtype, causal, block_m=128, block_n=block_n, m_atoms=2)


FLASH_FWD_SPECS = tuple(flash_fwd_spec(hd, dt, c) for hd in (64, 128) for dt in DTYPES for c in (False, True))
FLASH_FWD_TILE128_SPECS = tuple(flash_fwd_tile128_spec(hd, dt, c) for hd in (64, 128) for dt in DTYPES
                                for c in (False, True))


def sage_fwd_spec(head_dim: int, causal: bool, pv: str, block_m: int = 64, block_n: int = 64) -> KernelSpec:
    """The SageAttention forward of csrc/sage/sage_fwd.cu (INT8 QK^T, fp16 PV) for one parameter set;
    block_n is also the K quantization block (64 tokens)."""
    if head_dim not in (64, 128):
        raise ValueError(f"sage_fwd is built for head dims 64 and 128, not {head_dim}")
    if pv not in ("fp16", "fp16_accum"):
        raise ValueError(f"sage_fwd pv must be 'fp16' or 'fp16_accum', got {pv!r}")
    accum = int(pv == "fp16_accum")
    return KernelSpec(
        name=f"sage_fwd_hd{head_dim}_causal{int(causal)}_pvacc{accum}_bm{block_m}_bn{block_n}",
        source="sage/sage_fwd.cu",
        entry="attnlib_sage_fwd",
        defines=(("ATTNLIB_HEAD_DIM", str(head_dim)), ("ATTNLIB_CAUSAL", str(int(causal))),
                 ("ATTNLIB_PV_F16_ACCUM", str(accum)), ("ATTNLIB_BLOCK_M", str(block_m)),
                 ("ATTNLIB_BLOCK_N", str(block_n))),
        # int8 Q tile + two int8 K tiles + two fp16 V tiles (sage_fwd_traits.cuh)
        smem_bytes=head_dim * (block_m + 2 * block_n + 4 * block_n),
        threads=32 * (block_m // 16),
        min_arch=80,
    )


SAGE_QUANT_TENSORS = ("q", "k", "k_stats", "k_reduce")


def sage_quant_spec(tensor: str) -> KernelSpec:
    """The fused INT8 quantization of csrc/sage/sage_quant.cu for Q ("q") or K ("k"), and the two
    launches computing K's token mean before it: per-block channel sums ("k_stats") and their
    fold in block order ("k_reduce", one warp per 32 channels)."""
    if tensor not in SAGE_QUANT_TENSORS:
        raise ValueError(f"sage_quant tensor must be one of {SAGE_QUANT_TENSORS}, got {tensor!r}")
    return KernelSpec(name=f"sage_quant_{tensor}", source="sage/sage_quant.cu", entry=f"attnlib_sage_quant_{tensor}",
                      threads=32 if tensor == "k_reduce" else 256, min_arch=80)


SAGE_SPECS = tuple(sage_fwd_spec(hd, c, pv) for hd in (64, 128) for c in (False, True)
                   for pv in ("fp16", "fp16_accum")) + tuple(sage_quant_spec(t) for t in SAGE_QUANT_TENSORS)


BLOCK_SPARSE_BLOCK_SIZES = ((64, 64), (128, 64))


def block_sparse_fwd_spec(head_dim: int, dtype: str, causal: bool, block_m: int = 64, block_n: int = 64
                          ) -> KernelSpec:
    """csrc/block_sparse/block_sparse_fwd.cu for one parameter set (the flash traits' tile)."""
    if head_dim not in (64, 128):
        raise ValueError(f"block_sparse_fwd is built for head dims 64 and 128, not {head_dim}")
    if dtype not in DTYPES:
        raise ValueError(f"block_sparse_fwd dtype must be one of {DTYPES}, got {dtype!r}")
    if (block_m, block_n) not in BLOCK_SPARSE_BLOCK_SIZES:
        raise ValueError(f"block_sparse_fwd block size must be one of {BLOCK_SPARSE_BLOCK_SIZES}, "
                         f"got {(block_m, block_n)}")
    return KernelSpec(
        name=f"block_sparse_fwd_hd{head_dim}_{dtype}_causal{int(causal)}_bm{block_m}_bn{block_n}",
        source="block_sparse/block_sparse_fwd.cu",
        entry="attnlib_block_sparse_fwd",
        defines=(("ATTNLIB_HEAD_DIM", str(head_dim)), ("ATTNLIB_BF16", str(int(dtype == "bf16"))),
                 ("ATTNLIB_CAUSAL", str(int(causal))), ("ATTNLIB_BLOCK_M", str(block_m)),
                 ("ATTNLIB_BLOCK_N", str(block_n))),
        smem_bytes=flash_fwd_smem_bytes(head_dim, block_m, block_n),  # as the flash traits
        threads=32 * (block_m // 16),
        min_arch=80,
    )


BLOCK_SPARSE_FWD_SPECS = tuple(block_sparse_fwd_spec(hd, dt, c, bm, bn) for hd in (64, 128) for dt in DTYPES
                               for c in (False, True) for bm, bn in BLOCK_SPARSE_BLOCK_SIZES)
ALL_SPECS: tuple[KernelSpec, ...] = (FLASH_FWD_SPECS + FLASH_FWD_TILE128_SPECS + SAGE_SPECS
                                     + BLOCK_SPARSE_FWD_SPECS)


# -- sources ------------------------------------------------------------------------------
_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def source_files(csrc: str, source: str) -> list[str]:
    """The entry source and every header it pulls in with #include "..." (relative to the
    including file, then to csrc/), as csrc-relative paths, sorted."""
    seen: set[str] = set()
    todo = [os.path.normpath(source)]
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        path = os.path.join(csrc, rel)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"attnlib CUDA source {rel!r} not found under {csrc}")
        seen.add(rel)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for inc in _INCLUDE.findall(text):
            beside = os.path.normpath(os.path.join(os.path.dirname(rel), inc))
            if os.path.isfile(os.path.join(csrc, beside)):
                todo.append(beside)
            elif os.path.isfile(os.path.join(csrc, inc)):
                todo.append(os.path.normpath(inc))
            # anything else is a system/toolkit header, found by the compiler's include path
    return sorted(seen)


def source_hash(csrc: str, spec: KernelSpec) -> str:
    """sha256 over the spec's entry source, its included headers and its defines."""
    h = hashlib.sha256()
    for rel in source_files(csrc, spec.source):
        with open(os.path.join(csrc, rel), "rb") as f:
            data = f.read()
        h.update(rel.replace(os.sep, "/").encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    h.update(repr((spec.entry, spec.defines, spec.extra_options)).encode())
    return h.hexdigest()


# -- ahead-of-time cubins -----------------------------------------------------------------
def parse_archs(archs: str | Iterable[str]) -> list[str]:
    """"80;90", "8.0 9.0", "sm_80,sm_90a" -> ["80", "90", "90a"]."""
    items = re.split(r"[;,\s]+", archs.strip()) if isinstance(archs, str) else list(archs)
    out = []
    for item in items:
        a = item.strip().lower()
        if not a:
            continue
        a = a.removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", a):
            raise ValueError(f"cannot read CUDA arch {item!r} (expected e.g. 80, 9.0, sm_90a)")
        if a not in out:
            out.append(a)
    return out


def arch_number(arch: str) -> int:
    return int(re.match(r"\d+", arch).group(0))


def cubin_filename(spec: KernelSpec, arch: str, src_hash: str) -> str:
    """Name of a shipped cubin: specialisation, arch and a short source hash, so a cubin built
    from other sources than the installed csrc/ is never picked up."""
    return f"{spec.name}.sm_{arch}.{src_hash[:12]}.cubin"
