#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with torch, this package
# (with the test, picture and nvImageCodec extras) and pillow-simd over Pillow. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# torch first and pinned to what pyproject's range accepts and this machine carries; a CUDA build
# that also runs on the CPU. TorchCodec pinned to the release built for this torch.
pip install -q "torch==2.14.1" "torchvision==0.29.1" "torchcodec==0.17.0"
pip install -q -e ".[test,viz,nvimgcodec]"

# pillow-simd installs the same PIL module as Pillow; pip cannot express the swap, so overlay it
# last. Needs libjpeg and zlib headers. Without it everything still works on plain Pillow (slower).
if ! .venv/bin/python -c 'import PIL, sys; sys.exit(0 if ".post" in PIL.__version__ else 1)' 2>/dev/null; then
    if ! dpkg -s libjpeg-dev zlib1g-dev >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ]; then
            (apt-get update -qq && apt-get install -y -qq libjpeg-dev zlib1g-dev >/dev/null) || true
        fi
    fi
    CC="cc -mavx2" pip install -q --no-cache-dir --no-deps --force-reinstall "pillow-simd==12.1.1.post0" \
        || echo "setup: pillow-simd did not build; staying on plain Pillow (slower; its JPEG bytes differ from a pillow-simd build, and _info.json records which one built a folder)" >&2
fi
.venv/bin/python -c 'import PIL; print(f"setup: done; PIL {PIL.__version__}")'
