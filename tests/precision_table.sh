#!/usr/bin/env bash
# The README's precision table, measured in one sitting: for each model, file size, accuracy on
# a labelled folder (optional) and median inference ms at 1 and 2 threads, for tract at f32,
# f16, int8 (`runtime quantize`) and int8 weights only (`--weights-only`), and for onnxruntime
# at f32 and with its own `quantize_static` (tests/ort_quantize.py).
#
#   tests/precision_table.sh CALIB_DIR MODEL.onnx[=TEST_DIR] …
#
# TEST_DIR (folder-per-class) adds the accuracy column for that model.
# Needs a release build (cargo build --release -p runtime) and, for the onnxruntime columns,
# the .venv-peers of tests/ort_quantize.py (PEERS_PYTHON overrides its path).
set -euo pipefail
cd "$(dirname "$0")/.."
calibrate=$1; shift
runtime=target/release/runtime
python=${PEERS_PYTHON:-../.venv-peers/bin/python}
runs=${RUNS:-200}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

median() { # model precision threads
  "$runtime" bench --model "$1" ${2:+--precision "$2"} --threads "$3" --runs "$runs" --json |
    python3 -c 'import json, sys; print("%.3f" % json.load(sys.stdin)["inference"]["median_ms"])'
}
accuracy() { # model precision
  [[ -n $test_dir ]] || { echo "–"; return; }
  "$runtime" eval "$1" ${2:+--precision "$2"} --data "$test_dir" --json |
    python3 -c 'import json, sys; print("%.2f %%" % (100 * json.load(sys.stdin)["report"]["accuracy"]))'
}

echo "| model | precision | file bytes | accuracy | ms 1 thread | ms 2 threads |"
echo "|---|---|---:|---:|---:|---:|"
for spec in "$@"; do
  model=${spec%%=*}
  test_dir=""
  [[ $spec == *=* ]] && test_dir=${spec#*=}
  name=$(basename "$(dirname "$model")")/$(basename "$model")
  "$runtime" quantize "$model" --calibrate "$calibrate" -o "$work/int8.onnx" >/dev/null
  "$runtime" quantize "$model" --weights-only -o "$work/weights.onnx" >/dev/null
  for variant in "f32:$model:" "f16:$model:f16" "int8:$work/int8.onnx:" "int8 weights, f32 compute:$work/weights.onnx:"; do
    IFS=: read -r label file precision <<<"$variant"
    echo "| $name | tract $label | $(stat -c %s "$file") | $(accuracy "$file" "$precision") |" \
      "$(median "$file" "$precision" 1) | $(median "$file" "$precision" 2) |"
  done
  if [[ -x $python ]]; then
    report=$("$python" tests/ort_quantize.py "$model" "$work/ort.onnx" "$calibrate" \
      ${test_dir:+--test "$test_dir"} --runs "$runs" 2>/dev/null)
    python3 - "$name" "$report" <<'EOF'
import json, sys
name, r = sys.argv[1], json.loads(sys.argv[2])
m, b = r["median_ms"], r["bytes"]
accuracy = f'{100 * r["int8_accuracy"]:.2f} %' if "int8_accuracy" in r else "–"
print(f'| {name} | onnxruntime {r["onnxruntime"]} f32 | {b["f32"]} | – | {m["f32 1t"]:.3f} | {m["f32 2t"]:.3f} |')
print(f'| {name} | onnxruntime quantize_static int8 | {b["int8"]} | {accuracy} | {m["int8 1t"]:.3f} | {m["int8 2t"]:.3f} |')
EOF
  fi
done
