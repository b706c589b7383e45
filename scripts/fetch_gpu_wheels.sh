#!/bin/sh
# Wheels of the comparison packages the GPU benchmarks run next to attnlib (the device machine
# has no network): sageattention 1.0.6 (issue 5's baseline; pure Triton) and fla-core
# (flash-linear-attention, issue 6's linear baseline). Saved in .whl/ (git-ignored); carry it:
#   run(carry=[".whl"], command="python3 -m pip install -q --no-index --no-deps --no-compile
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; pip install -q --no-deps
#       --no-build-isolation -e . && python bench/gpu_check.py")
# Their other needs (torch, triton, einops) are in the device image.
set -e
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    sageattention==1.0.6 fla-core==0.6.0
ls .whl
