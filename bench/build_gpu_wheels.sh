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
DEEPSPEED="deepspeed==$(python -c 'from importlib.metadata import version; print(version("deepspeed"))' 2>/dev/null || echo 0.19.8)"
python -m pip wheel --no-deps --no-build-isolation -q -w "$OUT" "$DEEPSPEED"  # its setup.py needs torch: the local one
# Each pinned to the version installed here, where it is (a set known to work with this DeepSpeed,
# e.g. pydantic with its matching pydantic-core).
PACKAGES=(hjson ninja py-cpuinfo pydantic pydantic-core annotated-types typing-inspection msgpack psutil einops
          webdataset braceexpand fsspec safetensors pyyaml packaging typing-extensions)
PINNED=$(python - "${PACKAGES[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
PY
)
# shellcheck disable=SC2086
python -m pip download --only-binary=:all: --no-deps -q --python-version "$PY" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d "$OUT" $PINNED
ls -1 "$OUT"
