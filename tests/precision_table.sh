#!/usr/bin/env bash
# The precision table of docs/precision.md, measured in one sitting: for each model, file size,
# accuracy on a labelled folder (optional) and median inference ms at 1 and 2 threads, for the
# runtime at f32, f16, int8 (`runtime quantize`; also with the AVX2 kernel forced where the CPU
# has a VNNI one) and int8 weights only (`--weights-only`), for the runtime on onnxruntime's own
# int8 files (`quantize_dynamic` and `quantize_static`, tests/ort_quantize.py), and for
# onnxruntime on the f32 file and on both of those.
#
#   tests/precision_table.sh CALIB_DIR MODEL.onnx[=TEST_DIR] …
#
# TEST_DIR (folder-per-class) adds the accuracy column for that model. CALIB_DIR is for
# onnxruntime's quantize_static; `runtime quantize` needs no calibration.
# F16=0 leaves f16 out (on x86 it is a storage format, and scoring 10 000 images takes half an
# hour). Needs a release build (cargo build --release -p runtime) and, for the onnxruntime columns,
# the .venv-peers of tests/ort_quantize.py (PEERS_PYTHON overrides its path).
set -euo pipefail
cd "$(dirname "$0")/.."
calibrate=$1; shift
runtime=target/release/runtime
python=${PEERS_PYTHON:-../.venv-peers/bin/python}
runs=${RUNS:-200}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

median() { # model precision threads [isa]
  "$runtime" bench --model "$1" ${2:+--precision "$2"} --threads "$3" ${4:+--isa "$4"} \
    --runs "$runs" --json |
    python3 -c 'import json, sys; print("%.3f" % json.load(sys.stdin)["inference"]["median_ms"])'
}
accuracy() { # model precision [isa]
  [[ -n $test_dir ]] || { echo "–"; return; }
  "$runtime" eval "$1" ${2:+--precision "$2"} ${3:+--isa "$3"} --data "$test_dir" --json |
    python3 -c 'import json, sys; print("%.2f %%" % (100 * json.load(sys.stdin)["report"]["accuracy"]))'
}

echo "| model | precision | file bytes | accuracy | ms 1 thread | ms 2 threads |"
echo "|---|---|---:|---:|---:|---:|"
for spec in "$@"; do
  model=${spec%%=*}
  test_dir=""
  [[ $spec == *=* ]] && test_dir=${spec#*=}
  name=$(basename "$(dirname "$model")")/$(basename "$model")
  "$runtime" quantize "$model" -o "$work/int8.onnx" >/dev/null
  "$runtime" quantize "$model" --weights-only -o "$work/weights.onnx" >/dev/null
  variants=("f32:$model::")
  [[ ${F16:-1} == 0 ]] || variants+=("f16:$model:f16:")
  variants+=("int8:$work/int8.onnx::")
  if "$runtime" info --isa avx512-vnni >/dev/null 2>&1 || "$runtime" info --isa avx-vnni >/dev/null 2>&1; then
    variants+=("int8, AVX2 kernel forced:$work/int8.onnx::avx2")
  fi
  variants+=("int8 weights, f32 compute:$work/weights.onnx::")
  if [[ -x $python ]]; then
    report=$("$python" tests/ort_quantize.py "$model" "$work/ort" "$calibrate" \
      ${test_dir:+--test "$test_dir"} --runs "$runs" 2>/dev/null)
    variants+=("int8 on onnxruntime's quantize_dynamic file:$work/ort.dynamic.onnx::")
    variants+=("int8 on onnxruntime's quantize_static (QDQ) file:$work/ort.qdq.onnx::")
  fi
  for variant in "${variants[@]}"; do
    IFS=: read -r label file precision isa <<<"$variant"
    echo "| $name | runtime $label | $(stat -c %s "$file") | $(accuracy "$file" "$precision" "$isa") |" \
      "$(median "$file" "$precision" 1 "$isa") | $(median "$file" "$precision" 2 "$isa") |"
  done
  if [[ -n ${report:-} ]]; then
    python3 - "$name" "$report" <<'EOF'
import json, sys
name, r = sys.argv[1], json.loads(sys.argv[2])
m, b, a = r["median_ms"], r["bytes"], r.get("accuracy", {})
label = {"f32": "f32", "dynamic": "quantize_dynamic int8", "qdq": "quantize_static (QDQ) int8"}
for variant in ("f32", "dynamic", "qdq"):
    accuracy = f'{100 * a[variant]:.2f} %' if variant in a else "–"
    print(f'| {name} | onnxruntime {r["onnxruntime"]} {label[variant]} | {b[variant]} | {accuracy} | '
          f'{m[variant + " 1t"]:.3f} | {m[variant + " 2t"]:.3f} |')
EOF
  fi
done
