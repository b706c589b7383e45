"""Ahead-of-time cubins: compile csrc/ with nvcc for each arch into attnlib/_cubins.

Called by setup.py when ``ATTNLIB_CUDA_ARCHS`` is set (``ATTNLIB_CUDA_ARCHS="80;90" pip install .``);
also runnable: ``python scripts/build_cubins.py "80;90" attnlib/_cubins``. Needs nvcc, no GPU,
no torch: the spec list and compiler options are loaded from attnlib/cuda by file path.
"""
from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _load(name: str, path: str):
    """Import one stdlib-only file of attnlib/cuda without importing the attnlib package."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def _modules():
    cuda = os.path.join(REPO, "attnlib", "cuda")
    specs = _load("_attnlib_build_specs", os.path.join(cuda, "specs.py"))
    toolchain = _load("_attnlib_build_toolchain", os.path.join(cuda, "toolchain.py"))
    return specs, toolchain


def build_cubins(archs: str, out_dir: str, *, specs=None, jobs: int | None = None, verbose: bool = True) -> list[str]:
    """Compile every specialisation (or ``specs``) for every arch in ``archs`` ("80;90", "90a",
    ...) into out_dir; returns the written paths. nvcc warnings are errors."""
    specs_mod, toolchain = _modules()
    arch_list = specs_mod.parse_archs(archs)
    csrc = os.path.join(REPO, "csrc")
    nvcc = toolchain.find_nvcc()
    if nvcc is None:
        raise RuntimeError("ATTNLIB_CUDA_ARCHS is set but nvcc was not found (looked at $NVCC, PATH, "
                           "$CUDA_PATH/bin, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    os.makedirs(out_dir, exist_ok=True)
    todo = []
    for spec in specs or specs_mod.ALL_SPECS:
        h = specs_mod.source_hash(csrc, spec)
        for arch in arch_list:
            if specs_mod.arch_number(arch) < spec.min_arch:
                continue
            out = os.path.join(out_dir, specs_mod.cubin_filename(spec, arch, h))
            todo.append((spec, arch, toolchain.nvcc_command(spec, arch, csrc, out + ".tmp", nvcc=nvcc), out))

    def one(item):
        spec, arch, cmd, out = item
        if verbose:
            print("attnlib build_cubins:", " ".join(cmd), flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed for {spec.name} sm_{arch}:\n{res.stdout}{res.stderr}")
        os.replace(out + ".tmp", out)
        return out

    jobs = jobs or max(1, min(len(todo), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, todo))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/build_cubins.py ARCHS OUT_DIR   (e.g. '80;90' attnlib/_cubins)")
    for p in build_cubins(sys.argv[1], sys.argv[2]):
        print(p)
