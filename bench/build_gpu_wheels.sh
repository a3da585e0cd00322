#!/usr/bin/env bash
# Build WHEEL_DIR for bench/gpu_check.sh on a CPU machine with network (run it here, carry the folder):
#
#     bash bench/build_gpu_wheels.sh WHEEL_DIR [PYTHON_VERSION=3.12]
#
# The GPU machine has torch, numpy, Pillow, pytest and tqdm; it lacks DeepSpeed and webdataset and
# their small dependencies, and safetensors/fsspec/PyYAML where missing. Binary wheels for its
# Python are downloaded (--only-binary, --no-deps: exactly this list, never torch); DeepSpeed is an
# sdist on PyPI, so its wheel is built here with `pip wheel --no-deps` (pure Python: its CUDA ops
# are JIT-built on first use, and the check needs none of them).
set -euo pipefail
OUT="${1:?usage: bash bench/build_gpu_wheels.sh WHEEL_DIR [PYTHON_VERSION]}"
PY="${2:-3.12}"
mkdir -p "$OUT"
DEEPSPEED="deepspeed==$(python -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null || echo 0.19.8)"
python -m pip wheel --no-deps -q -w "$OUT" "$DEEPSPEED"
python -m pip download --only-binary=:all: --no-deps -q --python-version "$PY" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d "$OUT" hjson ninja py-cpuinfo pydantic pydantic-core annotated-types typing-inspection msgpack psutil einops \
    webdataset braceexpand fsspec safetensors pyyaml packaging typing-extensions
ls -1 "$OUT"
