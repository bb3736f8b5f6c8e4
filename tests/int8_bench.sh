#!/usr/bin/env bash
# int8 against f32, ours against onnxruntime's, on one model in one sitting: alternating rounds
# of `runtime bench` (inference median) on the f32 file and on its `runtime quantize` copy, and
# onnxruntime on the f32 file and on its own `quantize_dynamic` copy (per-tensor int8 weights,
# its defaults). Prints each round and the median of the rounds, in ms.
#
#   tests/int8_bench.sh MODEL.onnx [THREADS] [ROUNDS] [RUNS] [-- runtime flags, e.g. --isa avx2]
#
# Needs a release build (cargo build --release -p runtime) and the .venv-peers of
# tests/peers_bench.py (PEERS_PYTHON overrides its path). Time nothing else meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1; threads=${2:-1}; rounds=${3:-3}; runs=${4:-40}
shift $(( $# < 4 ? $# : 4 )); [[ ${1:-} == -- ]] && shift
flags=("$@")
runtime=target/release/runtime
python=${PEERS_PYTHON:-../.venv-peers/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$runtime" quantize "$model" -o "$work/int8.onnx" >/dev/null
"$python" -c 'import sys
from onnxruntime.quantization import quantize_dynamic, QuantType
quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8)' "$model" "$work/ort.onnx" \
  2>/dev/null

ours() { # model
  "$runtime" bench --model "$1" --threads "$threads" --runs "$runs" --warmup 5 --json \
    ${flags[@]+"${flags[@]}"} |
    python3 -c 'import json, sys; print("%.3f" % json.load(sys.stdin)["inference"]["median_ms"])'
}
theirs() { # model
  "$python" - "$1" "$threads" "$runs" <<'EOF'
import sys, time
import numpy as np, onnxruntime as ort
path, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
options = ort.SessionOptions()
options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
given = session.get_inputs()[0]
shape = [d if isinstance(d, int) else 1 for d in given.shape]
x = {given.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
for _ in range(5):
    session.run(None, x)
times = []
for _ in range(runs):
    started = time.perf_counter(); session.run(None, x)
    times.append(time.perf_counter() - started)
print("%.3f" % (1e3 * float(np.median(times))))
EOF
}

echo "round  ours f32  ours int8  onnxruntime f32  onnxruntime int8"
results=()
for round in $(seq "$rounds"); do
  line="$(ours "$model") $(ours "$work/int8.onnx") $(theirs "$model") $(theirs "$work/ort.onnx")"
  results+=("$line")
  echo "$round      $line"
done
printf '%s\n' "${results[@]}" | python3 -c '
import statistics, sys
rows = [list(map(float, line.split())) for line in sys.stdin]
f32, int8, ort_f32, ort_int8 = (statistics.median(c) for c in zip(*rows))
print(f"median ours f32 {f32:.3f}  int8 {int8:.3f}  onnxruntime f32 {ort_f32:.3f}  int8 {ort_int8:.3f}")
print(f"ours int8 is {f32 / int8:.2f}x faster than ours f32, {int8 / ort_int8:.2f}x onnxruntime int8 time")'
