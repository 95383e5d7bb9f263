#!/usr/bin/env bash
# The whole product on the built-in synthetic set, on whatever this machine has (CPU is fine):
# build demo shards, report on them, train a short run, evaluate it, classify one picture, and export
# the run as a model folder to share (`alextrain push` would upload it; the demo does not).
# A short CPU-friendly run: BatchNorm AlexNet on 64 px crops; drop those options on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin

$bin/alexprep demo --out shards/demo
$bin/alextrain --shards shards/demo --out runs/demo --arch alexnet-bn --crop-size 64 \
    --batch-size 32 --lr 0.005 --epochs 2 --workers 2
$bin/alextrain eval --checkpoint runs/demo --workers 2
$bin/alextrain report runs/demo

# one validation picture of the demo set, as a user's own JPEG would be
shard=shards/demo/validation-000000.tar
$bin/python - "$shard" runs/demo/example.jpg <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    member = next(m for m in tar if m.name.endswith(".jpg"))
    open(sys.argv[2], "wb").write(tar.extractfile(member).read())
PY
$bin/alextrain predict --checkpoint runs/demo runs/demo/example.jpg --sheet runs/demo/predictions.png
$bin/alextrain export runs/demo --workers 2
echo "demo: done; pictures in runs/demo (report.png, predictions.png), the model folder in runs/demo/model-last"
