"""attnlib's CUDA C++ kernels: NVRTC/CuPy compilation, disk cache, ahead-of-time cubins, launch.

Sources live in csrc/ (installed as attnlib/_csrc). Each specialisation (head dim, dtype,
causal, tile sizes: :mod:`attnlib.cuda.specs`) compiles at first use with NVRTC through
CuPy, unless ``ATTNLIB_CUDA_ARCHS="80;90" pip install .`` shipped a cubin for the device's
arch (it then wins). Compiled binaries are cached on disk, keyed by source and header hash,
options, arch and NVRTC version; see :mod:`attnlib.cuda.cache`.

Environment switches:

``ATTNLIB_CACHE_DIR``        cache folder (default ``$XDG_CACHE_HOME/attnlib`` or ``~/.cache/attnlib``)
``ATTNLIB_CUDA_VERBOSE=1``   print NVRTC options, cache hits/builds and module loads to stderr
``ATTNLIB_CUDA_NO_CACHE=1``  always compile; neither read nor write the disk cache
``ATTNLIB_CUDA_NO_CUBINS=1`` ignore shipped cubins (test NVRTC on a machine that has them)
``ATTNLIB_CUDA_LINEINFO=1``  compile with -lineinfo (for compute-sanitizer / ncu source views)
``ATTNLIB_CUBIN_DIR``        where shipped cubins are looked for (default ``attnlib/_cubins``)
``ATTNLIB_CSRC_DIR``         CUDA sources to compile (default: installed attnlib/_csrc, else repo csrc/)
``ATTNLIB_CUDA_INCLUDE``     CUDA toolkit include folder, for sources that need toolkit headers
                             (also searched: $CUDA_PATH, $CUDA_HOME, /usr/local/cuda, pip's
                             nvidia/cu13, nvidia/cu12, nvidia/cuda_runtime include folders)
``ATTNLIB_CUDA_FLASH_TILE_M`` 128 (default) or 64: query tile of the flash forward (128: two 16-row
                            MMA atoms per warp, FlashAttention-2's tiling; passed the H100 GPU tests and compute-sanitizer)
``NVCC``                     nvcc used by ahead-of-time builds and :func:`compile_report`
"""
from .specs import ALL_SPECS, FLASH_FWD_SPECS, KernelSpec, flash_fwd_spec  # noqa: F401
from .toolchain import compile_report, csrc_dir, find_cuda_include, find_nvcc  # noqa: F401
from .loader import (  # noqa: F401
    CompileError,
    arch_reasons,
    availability_reasons,
    device_reasons,
    compile_nvrtc,
    get_binary,
    get_function,
    launch,
)
