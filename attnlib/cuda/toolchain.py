"""Where the CUDA sources, headers and nvcc are, and the compiler options both compilers use.

Standard library only (scripts/build_cubins.py loads it by path, without attnlib or torch).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
from typing import Iterable

_HERE = os.path.dirname(os.path.abspath(__file__))

# Options shared by NVRTC and nvcc; each compiler adds its own arch and output options.
COMMON_OPTIONS = ("-std=c++17",)
NVCC_OPTIONS = ("-O3", "-Werror", "all-warnings")


def csrc_dir() -> str:
    """The CUDA sources: ATTNLIB_CSRC_DIR, the installed package data attnlib/_csrc, or the
    repository's csrc/ next to the attnlib package (a source checkout)."""
    env = os.environ.get("ATTNLIB_CSRC_DIR")
    if env:
        return os.path.expanduser(env)  # as ATTNLIB_CACHE_DIR: a "~" no shell expanded
    tried = []
    try:
        spec = importlib.util.find_spec("attnlib._csrc")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if os.path.isdir(os.path.join(loc, "flash")):
                return loc
            tried.append(loc)
    repo = os.path.normpath(os.path.join(_HERE, "..", "..", "csrc"))
    if os.path.isdir(repo):
        return repo
    tried.append(repo)
    raise FileNotFoundError("attnlib's CUDA sources (csrc/) were not found; tried " + ", ".join(tried)
                            + " (set ATTNLIB_CSRC_DIR)")


def _site_dirs() -> list[str]:
    dirs = []
    try:
        dirs.extend(site.getsitepackages())
    except AttributeError:  # some virtualenvs
        pass
    try:
        dirs.append(site.getusersitepackages())
    except AttributeError:
        pass
    dirs.extend(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))
    out = []
    for d in dirs:
        if d and d not in out:
            out.append(d)
    return out


def cuda_include_candidates() -> list[str]:
    """Folders that may hold the toolkit headers, in the order CuPy-like tools look."""
    cands = []
    env = os.environ.get("ATTNLIB_CUDA_INCLUDE")
    if env:
        cands.append(env)
    for var in ("CUDA_PATH", "CUDA_HOME", "CUDA_ROOT"):
        root = os.environ.get(var)
        if root:
            cands.append(os.path.join(root, "include"))
    cands.append("/usr/local/cuda/include")
    for sp in _site_dirs():
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include", "nvidia/cuda_runtime/include",
                    "nvidia/cuda_nvcc/include"):
            cands.append(os.path.join(sp, *sub.split("/")))
    out = []
    for c in cands:
        c = os.path.normpath(c)
        if c not in out:
            out.append(c)
    return out


def find_cuda_include() -> tuple[str | None, list[str]]:
    """(folder holding cuda_fp16.h or None, every folder tried)."""
    tried = cuda_include_candidates()
    for c in tried:
        if os.path.isfile(os.path.join(c, "cuda_fp16.h")):
            return c, tried
    return None, tried


def cuda_headers_reason() -> str | None:
    inc, tried = find_cuda_include()
    if inc is not None:
        return None
    return ("CUDA toolkit headers (cuda_fp16.h) not found; tried " + ", ".join(tried)
            + ". Set CUDA_PATH or ATTNLIB_CUDA_INCLUDE, or pip install nvidia-cuda-runtime")


def find_nvcc() -> str | None:
    env = os.environ.get("NVCC")
    if env:
        return env
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_PATH", "CUDA_HOME"):
        root = os.environ.get(var)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return None


def include_options(csrc: str, spec) -> list[str]:
    opts = [f"-I{csrc}", f"-I{os.path.join(csrc, os.path.dirname(spec.source))}"]
    if spec.needs_cuda_headers:
        inc, _ = find_cuda_include()
        if inc is not None:
            opts.append(f"-I{inc}")
    return opts


def nvcc_command(spec, arch: str, csrc: str, out_path: str, *, nvcc: str | None = None,
                 extra: Iterable[str] = ()) -> list[str]:
    """nvcc command compiling one specialisation to a cubin for sm_<arch>."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (looked at $NVCC, PATH, $CUDA_PATH/bin, $CUDA_HOME/bin, "
                                "/usr/local/cuda/bin)")
    return ([nvcc, "-cubin", f"-arch=sm_{arch}", *COMMON_OPTIONS, *NVCC_OPTIONS, *include_options(csrc, spec),
             *spec.define_options(), *spec.extra_options, *extra, "-o", out_path,
             os.path.join(csrc, spec.source)])


_USAGE = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def entry_report(text: str, entry: str) -> str:
    """The part of ptxas -v output about one entry function (a source may define several)."""
    blocks = re.split(r"(?=ptxas info\s*: Compiling entry function )", text)
    for b in blocks:
        if re.match(rf"ptxas info\s*: Compiling entry function '{re.escape(entry)}'", b):
            return b
    return text


def compile_report(specs=None, arch: str = "90", *, csrc: str | None = None) -> list[dict]:
    """Registers, spills and static shared memory per specialisation, from nvcc --resource-usage
    (plus the dynamic shared memory the launcher asks for). Needs nvcc; no GPU."""
    import tempfile

    from . import specs as specs_mod

    csrc = csrc or csrc_dir()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs or specs_mod.ALL_SPECS:
            out = os.path.join(tmp, spec.name + ".cubin")
            cmd = nvcc_command(spec, arch, csrc, out, extra=["--resource-usage"])
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed for {spec.name}:\n{res.stderr}")
            text = entry_report(res.stdout + res.stderr, spec.entry)
            regs, spill, smem = _USAGE.search(text), _SPILL.search(text), _SMEM.search(text)
            rows.append({
                "name": spec.name, "arch": f"sm_{arch}",
                "registers": int(regs.group(1)) if regs else None,
                "spill_bytes": (int(spill.group(1)) + int(spill.group(2))) if spill else None,
                "static_smem_bytes": int(smem.group(1)) if smem else 0,
                "dynamic_smem_bytes": spec.smem_bytes,
            })
    return rows
