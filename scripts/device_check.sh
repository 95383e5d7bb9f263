#!/usr/bin/env bash
# The GPU checks in one script, for a lent CUDA machine whose Python has torch, torchvision, numpy,
# Pillow and tqdm but no network (see docs/benchmarks.md, "GPU"):
#
#   bash scripts/device_check.sh wheels   # here: the wheels it needs -> benchmarks/out/wheels (31 MB)
#   bash scripts/device_check.sh run      # there, from the repository root: device `run` with
#                                         # carry ["benchmarks/out/wheels"] and timeout_s 480
#
# "run" installs the wheels into /tmp/site, runs the CUDA-only tests (LRN kernels, models, augmentation,
# page-locked loader slots, the GPU JPEG decoders), then every GPU benchmark (training speed, LRN cost)
# with a time limit, and prints the benchmark table last. Logs and JSON go to $OUT (default benchmarks/out).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=benchmarks/out/wheels

case "${1:-}" in
  wheels)
    mkdir -p "$wheels"
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d "$wheels" \
      webdataset==1.0.2 braceexpand==0.1.7 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0 \
      nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
    # TorchCodec (the loader workers' JPEG decoder) for the image's Python 3.12; it links against torch,
    # so a torch too old for it fails at `import train.loader` there (see docs/benchmarks.md, "GPU")
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$wheels" torchcodec==0.17.0
    ls "$wheels"
    ;;
  run)
    out=${OUT:-benchmarks/out}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheels"/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    nvidia-smi -L || true
    python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available())'
    # The CUDA-only tests: a failure is reported, and the benchmarks still run.
    python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_lrn.py tests/test_model.py tests/test_augment.py tests/test_loader.py \
      tests/test_device_decode.py \
      2>&1 | tee "$out/cuda_tests.log" || true
    python3 -m benchmarks.run --gpu --time-limit 200 --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
    ;;
  *)
    echo "usage: bash scripts/device_check.sh wheels|run" >&2
    exit 2
    ;;
esac
