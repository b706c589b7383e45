"""Compile (NVRTC through CuPy), cache, load and launch attnlib's CUDA C++ kernels.

The path of one specialisation (a :class:`~attnlib.cuda.specs.KernelSpec`) to a launch:

1. a cubin shipped in ``attnlib/_cubins`` for the device's arch and these exact sources wins;
2. else the disk cache (:mod:`attnlib.cuda.cache`) under a key of source + headers hash,
   options, arch and NVRTC version;
3. else NVRTC compiles it (a cubin for sm_XY, or PTX for the newest arch NVRTC knows when the
   device is newer than NVRTC) and the cache stores it.

The module is loaded once per (specialisation, device) and launched on the stream handle the
caller passes (torch's current stream), with no host synchronisation, so CUDA graph capture
works. Nothing here imports CuPy until it is needed.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from . import cache as _cache
from . import toolchain
from .specs import KernelSpec, cubin_filename, source_hash

_SMEM_OPT_IN = 48 * 1024  # dynamic shared memory above this needs cuFuncSetAttribute


class CompileError(RuntimeError):
    """NVRTC rejected a kernel (the message holds its log and options)."""


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    if env_flag("ATTNLIB_CUDA_VERBOSE"):
        print(f"[attnlib.cuda] {msg}", file=sys.stderr, flush=True)


# -- NVRTC ----------------------------------------------------------------------------------
def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError:  # older CuPy
        from cupy.cuda import nvrtc
    return nvrtc


def _driver():
    try:
        from cupy_backends.cuda.api import driver
    except ImportError:
        from cupy.cuda import driver
    return driver


_state_lock = threading.Lock()
_availability: list[str] | None = None
_nvrtc_version: tuple[int, int] | None = None
_nvrtc_archs: tuple[int, ...] | None = None


def nvrtc_version() -> tuple[int, int]:
    global _nvrtc_version
    if _nvrtc_version is None:
        _nvrtc_version = tuple(int(x) for x in _nvrtc().getVersion())
    return _nvrtc_version


def nvrtc_archs() -> tuple[int, ...] | None:
    """Archs this NVRTC compiles for (e.g. 75, 80, ..., 120), or None when it cannot say."""
    global _nvrtc_archs
    if _nvrtc_archs is None:
        try:
            _nvrtc_archs = tuple(int(a) for a in _nvrtc().getSupportedArchs())
        except Exception:
            return None
    return _nvrtc_archs


def availability_reasons() -> list[str]:
    """Why attnlib cannot compile its CUDA kernels in this install ([] when CuPy and NVRTC load).
    Compiling needs no GPU (tests and ahead-of-time builds compile for sm_80/sm_90 on CPU hosts);
    running one also needs a visible device: see device_reasons."""
    global _availability
    if _availability is not None:
        return list(_availability)
    with _state_lock:
        reasons = []
        try:
            import cupy  # noqa: F401
        except Exception as e:  # ImportError, or a CuPy built for another CUDA
            reasons.append(f"CuPy could not be imported ({type(e).__name__}: {e})")
        else:
            try:
                nvrtc_version()
            except Exception as e:
                reasons.append(f"NVRTC (CUDA's runtime compiler) could not be loaded through CuPy "
                               f"({type(e).__name__}: {e}); pip install nvidia-cuda-nvrtc")
        _availability = reasons
    return list(reasons)


def device_reasons() -> list[str]:
    """Why no attnlib CUDA kernel can run on this host ([] when torch sees a CUDA device): the
    kernels take torch's CUDA tensors and launch on torch's device and stream."""
    import torch

    if not torch.cuda.is_available():
        return ["no CUDA device is visible (torch.cuda.is_available() is False); the CUDA kernels "
                "compile without one but run only on a GPU"]
    return []


def arch_reasons(spec: KernelSpec, cc: tuple[int, int]) -> list[str]:
    """Why this specialisation cannot run on a device of compute capability cc."""
    arch = cc[0] * 10 + cc[1]
    if arch < spec.min_arch:
        return [f"needs sm_{spec.min_arch} or newer, device is sm_{arch}"]
    r = []
    if shipped_cubin(spec, cc) is None:
        supported = nvrtc_archs()
        if supported is not None and not any(a <= arch and a >= spec.min_arch for a in supported):
            v = ".".join(map(str, nvrtc_version()))
            r.append(f"NVRTC {v} cannot compile for sm_{arch} (supports {', '.join(map(str, supported))})")
        if spec.needs_cuda_headers:
            why = toolchain.cuda_headers_reason()
            if why:
                r.append(why)
    return r


def nvrtc_options(spec: KernelSpec, arch: str, csrc: str, *, ptx: bool = False) -> list[str]:
    target = f"-arch=compute_{arch}" if ptx else f"-arch=sm_{arch}"
    opts = [*toolchain.COMMON_OPTIONS, target, *toolchain.include_options(csrc, spec), *spec.define_options(),
            *spec.extra_options]
    if env_flag("ATTNLIB_CUDA_LINEINFO"):
        opts.append("-lineinfo")
    return opts


@dataclass
class CompileResult:
    binary: bytes
    log: str
    options: list[str]
    ptx: bool


def compile_nvrtc(spec: KernelSpec, arch: str, *, csrc: str | None = None, ptx: bool = False) -> CompileResult:
    """Compile one specialisation with NVRTC to a cubin for sm_<arch> (or PTX). No GPU needed."""
    csrc = csrc or toolchain.csrc_dir()
    opts = nvrtc_options(spec, arch, csrc, ptx=ptx)
    path = os.path.join(csrc, spec.source)
    with open(path, encoding="utf-8") as f:
        src = f.read()
    _say(f"nvrtc {path} " + " ".join(opts))
    nv = _nvrtc()
    prog = nv.createProgram(src, path, (), ())
    try:
        try:
            nv.compileProgram(prog, opts)
        except nv.NVRTCError as e:
            log = nv.getProgramLog(prog)
            raise CompileError(f"NVRTC could not compile {spec.name} for sm_{arch}: {e}\n{log}\n"
                               f"options: {' '.join(opts)}") from None
        log = nv.getProgramLog(prog).rstrip("\0").strip()
        binary = nv.getPTX(prog) if ptx else nv.getCUBIN(prog)
    finally:
        nv.destroyProgram(prog)
    if isinstance(binary, str):
        binary = binary.encode()
    if ptx and not binary.endswith(b"\0"):
        binary += b"\0"  # cuModuleLoadData reads PTX as a C string
    if log:
        warnings.warn(f"attnlib: NVRTC warnings compiling {spec.name} for sm_{arch}:\n{log}", stacklevel=2)
    return CompileResult(binary=binary, log=log, options=opts, ptx=ptx)


# -- binaries: shipped cubin, disk cache, NVRTC --------------------------------------------------
def cubin_dir() -> str:
    # expanduser as for ATTNLIB_CACHE_DIR (cache.default_cache_dir): a "~" no shell expanded (a
    # Dockerfile ENV) made every shipped cubin silently missing, and NVRTC compile them instead
    env = os.environ.get("ATTNLIB_CUBIN_DIR")
    return os.path.expanduser(env) if env else os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "_cubins")


_source_hashes: dict[tuple[str, KernelSpec], str] = {}


def _source_hash_once(csrc: str, spec: KernelSpec) -> str:
    """source_hash, computed once per process for (sources folder, spec): shipped_cubin runs in
    every dispatch check of a CUDA kernel (arch_reasons), where reading and hashing the sources
    again cost about 1 ms per attention call. A running process keeps the kernels it loaded
    anyway (get_function), so sources edited under it are not picked up either way."""
    key = (csrc, spec)
    h = _source_hashes.get(key)
    if h is None:
        h = _source_hashes[key] = source_hash(csrc, spec)
    return h


def shipped_cubin(spec: KernelSpec, cc: tuple[int, int], csrc: str | None = None) -> str | None:
    """Path of an ahead-of-time cubin that runs on cc: sm_XY, sm_XYa, then sm_X(Y-1) ... sm_X0
    (cubins run on later minors of their major); only one built from these exact sources."""
    if env_flag("ATTNLIB_CUDA_NO_CUBINS"):
        return None
    d = cubin_dir()
    if not os.path.isdir(d):
        return None
    try:
        h = _source_hash_once(csrc or toolchain.csrc_dir(), spec)
    except FileNotFoundError:
        return None
    major, minor = cc
    for arch in [f"{major}{minor}", f"{major}{minor}a"] + [f"{major}{m}" for m in range(minor - 1, -1, -1)]:
        p = os.path.join(d, cubin_filename(spec, arch, h))
        if os.path.isfile(p):
            return p
    return None


def _target(arch: int) -> tuple[str, bool]:
    """(arch to compile for, as PTX?): a cubin for the device's own arch when NVRTC knows it,
    else PTX for the newest arch it knows, which the driver compiles for the device."""
    supported = nvrtc_archs()
    if supported is None or arch in supported:
        return str(arch), False
    older = [a for a in supported if a <= arch]
    if not older:
        raise CompileError(f"NVRTC {nvrtc_version()} cannot compile for sm_{arch} (supports {supported})")
    return str(max(older)), True


def cache_key_for(spec: KernelSpec, arch: str, ptx: bool, opts: Sequence[str], src_hash: str,
                  nvrtc: tuple[int, int]) -> str:
    # include paths are left out: what they hold is in the source hash, where they are is not
    keyed_opts = [o for o in opts if not o.startswith("-I")]
    return _cache.cache_key(name=spec.name, source=src_hash, options=keyed_opts, arch=arch, ptx=ptx,
                            nvrtc=list(nvrtc))


def get_binary(spec: KernelSpec, cc: tuple[int, int]) -> tuple[bytes, str]:
    """(cubin or PTX, where it came from) for a device of compute capability cc."""
    csrc = toolchain.csrc_dir()
    shipped = shipped_cubin(spec, cc, csrc)
    if shipped is not None:
        _say(f"{spec.name}: shipped cubin {shipped}")
        with open(shipped, "rb") as f:
            return f.read(), f"shipped {shipped}"
    arch, ptx = _target(cc[0] * 10 + cc[1])
    opts = nvrtc_options(spec, arch, csrc, ptx=ptx)
    key = cache_key_for(spec, arch, ptx, opts, source_hash(csrc, spec), nvrtc_version())

    def build() -> bytes:
        return compile_nvrtc(spec, arch, csrc=csrc, ptx=ptx).binary

    if env_flag("ATTNLIB_CUDA_NO_CACHE"):
        return build(), "nvrtc (cache off)"
    store = _cache.BinaryCache()
    binary, how = store.get_or_build(spec.name, key, build)
    _say(f"{spec.name}: {how} {store.path(spec.name, key)}")
    return binary, f"{how} {store.path(spec.name, key)}"


# -- loading and launching --------------------------------------------------------------------
_functions: dict[tuple[str, int], Any] = {}
_functions_lock = threading.Lock()


def get_function(spec: KernelSpec, device_index: int, cc: tuple[int, int]):
    """The loaded kernel of spec on one device (loaded once, then a dict lookup)."""
    key = (spec.name, device_index)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    with _functions_lock:
        fn = _functions.get(key)
        if fn is not None:
            return fn
        import cupy
        from cupy.cuda import function as cuda_function

        binary, origin = get_binary(spec, cc)
        with cupy.cuda.Device(device_index):
            module = cuda_function.Module()
            module.load(binary)
            fn = module.get_function(spec.entry)  # keeps the module alive
            if spec.smem_bytes > _SMEM_OPT_IN:
                drv = _driver()
                drv.funcSetAttribute(fn.ptr, drv.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, spec.smem_bytes)
        _say(f"{spec.name}: loaded on cuda:{device_index} from {origin}")
        _functions[key] = fn
        return fn


class _StreamHandle:
    """What CuPy's launcher reads from a stream: its raw handle (torch's stream here)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


def launch(fn, grid: Sequence[int], block: Sequence[int], args: Sequence[Any], *, shared_mem: int,
           device_index: int, stream_ptr: int) -> None:
    """Enqueue fn on stream_ptr of device_index. Launch-configuration errors raise here (CuPy
    checks cuLaunchKernel's status); nothing waits for the kernel."""
    import cupy

    with cupy.cuda.Device(device_index):
        fn(tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem, stream=_StreamHandle(stream_ptr))
