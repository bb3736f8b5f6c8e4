#!/usr/bin/env bash
# Two (or more) runtime builds side by side on one model: ROUNDS rounds alternating the binaries,
# each `runtime bench --runs RUNS` on the 28-px frame tests/speed_table.sh uses; prints each
# binary's median of its round medians (inference ms) and the rounds.
#
#   tests/ab_bench.sh MODEL.onnx THREADS ROUNDS BINARY…
#
# A binary may be a wrapper script, e.g. one that sets RUNTIME_ISA=avx2 before exec'ing the
# runtime, to compare kernels of one build.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 threads=$2 rounds=$3
shift 3
frame=${FRAME:-models/fashion-vit/test-images/bag/00018.png}
for _ in $(seq "$rounds"); do
  for binary in "$@"; do
    median=$("$binary" bench --model "$model" --image "$frame" --threads "$threads" \
      --runs "${RUNS:-150}" --json |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["inference"]["median_ms"])')
    echo "$binary $median"
  done
done | python3 -c '
import collections, statistics, sys
rounds = collections.defaultdict(list)
for line in sys.stdin:
    binary, ms = line.rsplit(maxsplit=1)
    rounds[binary].append(float(ms))
for binary, ms in rounds.items():
    print(f"{binary}: median {statistics.median(ms):.3f} ms, rounds {[round(x, 2) for x in ms]}")'
