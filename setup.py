"""attnlib: attention kernels for PyTorch. `pip install .` is pure Python; kernels compile at first use.

The folder triton_kernels/ installs as attnlib.triton_kernels (the top-level import name
`triton_kernels` belongs to another project) and csrc/ ships as package data, attnlib/_csrc.
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def find_packages_under(root: str, prefix: str) -> list[str]:
    pkgs = []
    for dirpath, _dirs, files in os.walk(os.path.join(HERE, root)):
        if "__init__.py" in files:
            rel = os.path.relpath(dirpath, os.path.join(HERE, root))
            pkgs.append(prefix if rel == "." else prefix + "." + rel.replace(os.sep, "."))
    return sorted(pkgs)


def _load_build_cubins():
    """scripts/build_cubins.py by file path: no top-level ``scripts`` import (another
    distribution's ``scripts`` package may shadow it), and it must be in the sdist (MANIFEST.in)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_attnlib_build_cubins", os.path.join(HERE, "scripts", "build_cubins.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_cubins


class BuildPyWithCubins(build_py):
    """With ATTNLIB_CUDA_ARCHS="80;90" set, also compile csrc/ to cubins shipped in the package.

    The cubins go to <build_lib>/attnlib/_cubins, which is emptied first: pip builds in the source
    tree's build/ folder, so a plain build after an ATTNLIB_CUDA_ARCHS one must not ship the old
    cubins (nor a "90" build the "80" ones). An editable install (pip install -e .) has no
    installed package folder: there the cubins go to the source tree's attnlib/_cubins, where the
    loader looks (attnlib.cuda.loader.cubin_dir)."""

    def run(self):
        super().run()
        archs = os.environ.get("ATTNLIB_CUDA_ARCHS", "").strip()
        if getattr(self, "editable_mode", False):
            if archs:
                out = os.path.join(HERE, "attnlib", "_cubins")
                shutil.rmtree(out, ignore_errors=True)
                _load_build_cubins()(archs, out)
            return
        out = os.path.join(self.build_lib, "attnlib", "_cubins")
        shutil.rmtree(out, ignore_errors=True)
        if archs:
            _load_build_cubins()(archs, out)


PACKAGES = find_packages_under("attnlib", "attnlib") + find_packages_under(
    "triton_kernels", "attnlib.triton_kernels") + ["attnlib._csrc"]

setup(
    name="attnlib",
    version="0.1.0",
    description="Attention kernels for PyTorch: flash, SageAttention INT8, block-sparse, linear, SLA, AsymRnR",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=PACKAGES,
    package_dir={"attnlib": "attnlib", "attnlib.triton_kernels": "triton_kernels", "attnlib._csrc": "csrc"},
    # attnlib/_cubins is written by BuildPyWithCubins, never copied from the source tree
    package_data={"attnlib._csrc": ["*.cu", "*.cuh", "*.h", "**/*.cu", "**/*.cuh", "**/*.h"]},
    include_package_data=False,
    install_requires=[
        "torch>=2.8",
        "numpy",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        # pick the CuPy wheel that matches your CUDA major version: cupy-cuda12x or cupy-cuda13x
        "cuda": ["cupy-cuda13x"],
        "cuda12": ["cupy-cuda12x"],
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis"],
        "diffusers": ["diffusers>=0.42,<0.43"],
    },
    entry_points={"console_scripts": ["attnlib=attnlib.__main__:run_main"]},
    cmdclass={"build_py": BuildPyWithCubins},
)
