#!/usr/bin/env bash
# The Swin (swin-seed) against the tutorial's seed ViT at 144 px, in one sitting: training
# images/s on the same 120 synthetic images (1 epoch, batch 32, no augmentation, the dev build
# the project trains with), then inference per frame at 1 thread (release runtime) next to
# onnxruntime and OpenVINO (tests/peers_bench.py, when .venv-peers exists).
#
#   cargo build -p exporter && cargo build --release -p runtime
#   tests/swin_vs_vit.sh [WORK_DIR]
#
# Nothing else may run meanwhile (a training run included).
set -euo pipefail
cd "$(dirname "$0")/.."
exporter=${EXPORTER:-target/debug/exporter}
runtime=${RUNTIME:-target/release/runtime}
work=${1:-$(mktemp -d)}
mkdir -p "$work"
$exporter data squares --out "$work/data" --classes 3 --per-class 40 --size 144 >/dev/null
for preset in seed swin-seed; do
  for round in 1 2; do
    rm -rf "$work/run-$preset"
    $exporter train --data "$work/data" --out "$work/run-$preset" --preset $preset --channels 3 \
      --epochs 1 --batch-size 32 --no-augment --val-fraction 0.2 --json >/dev/null 2>&1
    speed=$(python3 -c "import json; print(round(json.loads(open('$work/run-$preset/metrics.jsonl').readline())['images_per_second'], 2))")
    echo "train $preset (round $round): $speed images/s"
  done
  $exporter export --checkpoint "$work/run-$preset" --out "$work/$preset.onnx" >/dev/null
done
for round in 1 2; do
  for preset in seed swin-seed; do
    ms=$($runtime bench --model "$work/$preset.onnx" --threads 1 --runs 200 --json |
      python3 -c "import json, sys; print(round(json.load(sys.stdin)['inference']['median_ms'], 3))")
    echo "infer $preset (round $round): $ms ms median, 1 thread"
  done
done
if [ -x .venv-peers/bin/python ] || [ -x ../.venv-peers/bin/python ]; then
  python=$( [ -x .venv-peers/bin/python ] && echo .venv-peers/bin/python || echo ../.venv-peers/bin/python )
  for preset in seed swin-seed; do
    echo "peers $preset: $($python tests/peers_bench.py "$work/$preset.onnx" 1 200 2>/dev/null)"
  done
fi
