#!/usr/bin/env bash
# The CUDA check, in one run on one GPU machine (at most ~8 minutes):
#
#     bash bench/gpu_check.sh WHEEL_DIR OUT_DIR
#
# The GPU machine has Python 3.12, torch (CUDA), Triton, pytest and torchmetrics, but no DeepSpeed,
# webdataset, s3fs or Ray, and no network. WHEEL_DIR holds the missing wheels, built on a CPU
# machine with network by `bash bench/build_gpu_wheels.sh WHEEL_DIR` (README, "The GPU check").
# Steps: install those of the wheels this Python lacks (--no-index --no-deps: nothing present is
# touched, torch stays), run
# the tests marked `gpu` (CUDA renderer and GOEmbed against the CPU, training steps at fp32 and
# bf16 under ZeRO 0/2/3 over NCCL, world size 1), then bench/gpu.py (bf16 step time, objects/s,
# rays/s, peak memory per object at 64 and 128 px for tiny, small, base; data wait; denoiser MFU).
# Writes OUT_DIR/gpu_check.json (one JSON line) and OUT_DIR/gpu_check.log.
set -uo pipefail
if (($# != 2)); then
    echo "usage: bash bench/gpu_check.sh WHEEL_DIR OUT_DIR" >&2
    exit 2
fi
WHEEL_DIR="$(cd "$1" && pwd)" || { echo "error: WHEEL_DIR $1 does not exist" >&2; exit 2; }
OUT_DIR="$2"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$OUT_DIR/torch_extensions}"
started=$(date +%s)

ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1 || { echo "error: no wheels in $WHEEL_DIR" >&2; exit 2; }
echo "== install from $WHEEL_DIR (only what this Python lacks)" | tee -a "$LOG"
# A wheel whose distribution is already installed is skipped: nothing present (torch, its
# typing-extensions, ...) is upgraded or downgraded.
mapfile -t MISSING < <(python - "$WHEEL_DIR"/*.whl <<'PY'
import os, re, sys
from importlib.metadata import PackageNotFoundError, version
for path in sys.argv[1:]:
    name = re.sub(r"[-_.]+", "-", os.path.basename(path).split("-")[0]).lower()
    try:
        version(name)
    except PackageNotFoundError:
        print(path)
PY
)
echo "installing ${#MISSING[@]} wheel(s): ${MISSING[*]##*/}" >>"$LOG"
install_rc=0
if ((${#MISSING[@]})); then
    python -m pip install --no-index --no-deps --disable-pip-version-check -q "${MISSING[@]}" >>"$LOG" 2>&1
    install_rc=$?
fi
python -c "import torch, deepspeed, webdataset; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None, 'deepspeed', deepspeed.__version__)" \
    >>"$LOG" 2>&1
import_rc=$?

echo "== pytest -m gpu" | tee -a "$LOG"
timeout 240 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py --junitxml="$OUT_DIR/gpu_tests.xml" \
    >>"$LOG" 2>&1
tests_rc=$?

echo "== bench/gpu.py" | tee -a "$LOG"
timeout 210 python bench/gpu.py >"$OUT_DIR/bench_gpu.json" 2>>"$LOG"
bench_rc=$?

python - "$OUT_DIR" "$install_rc" "$import_rc" "$tests_rc" "$bench_rc" "$started" <<'PY' | tee "$OUT_DIR/gpu_check.json"
import json, os, sys, time, xml.etree.ElementTree as ET
out, install_rc, import_rc, tests_rc, bench_rc, started = sys.argv[1], *map(int, sys.argv[2:])
tests = None
try:
    suite = ET.parse(os.path.join(out, "gpu_tests.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    tests = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, IndexError):
    pass
bench = None
try:
    with open(os.path.join(out, "bench_gpu.json")) as f:
        bench = json.loads(f.read().strip().splitlines()[-1])
except (OSError, ValueError, IndexError):
    pass
print(json.dumps({"check": "gpu", "install_rc": install_rc, "import_rc": import_rc, "tests_rc": tests_rc,
                  "tests": tests, "bench_rc": bench_rc, "bench": bench, "wall_s": round(time.time() - started)}))
PY
((install_rc == 0 && import_rc == 0 && tests_rc == 0 && bench_rc == 0))
