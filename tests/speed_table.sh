#!/usr/bin/env bash
# docs/performance.md's speed table, measured in one sitting: for each model, median inference ms of this
# runtime (`runtime bench`), onnxruntime and OpenVINO (tests/peers_bench.py) on the same ONNX, at
# 1 and 2 threads; the ratio ours / onnxruntime; and the share of the core's f32 FMA peak each
# reaches (the model's multiply-adds over the time, against the f32 multiply-adds per cycle per
# core of the vector width our dense kernel runs, at the clock measured here by a chain of
# dependent adds). The width comes from `runtime info --json`: AVX2 kernels have two 256-bit
# FMA pipes (16 multiply-adds a cycle, Zen 3 and Intel since Haswell), AVX-512 ones on an Intel
# Xeon two 512-bit pipes (32); Zen 4 runs AVX-512 on its two 256-bit pipes (16). PEAK= (f32
# multiply-adds per cycle per core) overrides the guess. RUNTIME_ISA=avx2 (or portable)
# measures our lower kernels on the same host.
#
#   tests/speed_table.sh MODEL.onnx …
#
# Each measurement is taken ROUNDS times (default 3), alternating ours and the peers, and the
# median of the medians is reported: the machine is noisy, and alternating spreads its noise
# over all three runtimes. Needs a release build (cargo build --release -p runtime), the
# .venv-peers of tests/peers_bench.py (PEERS_PYTHON overrides its path) and gcc. RUNTIME names
# another runtime binary to measure (an older build, say).
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=${RUNTIME:-target/release/runtime}
python=${PEERS_PYTHON:-../.venv-peers/bin/python}
runs=${RUNS:-200}
rounds=${ROUNDS:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One add per cycle through a dependency chain gives the clock the benchmarks run at. The adds
# take a register, not an immediate: a recent Xeon ran a chain of immediate adds faster than one
# per cycle (this probe read 9.5 GHz there; with a register, 2.05).
cat > "$work/clock.c" <<'EOF'
#include <stdio.h>
#include <time.h>
int main(void) {
    struct timespec a, b;
    long n = 1000000000L, x = 0, one = 1;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i += 8)
        __asm__ volatile("add %1,%0\n\tadd %1,%0\n\tadd %1,%0\n\tadd %1,%0\n\t"
                         "add %1,%0\n\tadd %1,%0\n\tadd %1,%0\n\tadd %1,%0" : "+r"(x) : "r"(one));
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.3f\n", n / ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9) / 1e9);
    return x == n ? 0 : 1;
}
EOF
gcc -O2 -o "$work/clock" "$work/clock.c"

# A 28-px frame: its preprocessing is a few microseconds and leaves the caches to the model,
# as onnxruntime's back-to-back runs on one tensor do. (The default synthetic 640×480 frame
# takes about 1.2 ms to convert; the default model's inference median was 0.48 ms after it
# against 0.43 ms after this one.) FRAME= picks another image.
frame=${FRAME:-models/fashion-vit/test-images/bag/00018.png}

ours() { # model threads
  "$runtime" bench --model "$1" --image "$frame" --threads "$2" --runs "$runs" --json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["inference"]["median_ms"])'
}

for model in "$@"; do
  for threads in 1 2; do
    for round in $(seq "$rounds"); do
      echo "{\"model\": \"$model\", \"threads\": $threads, \"ours\": $(ours "$model" "$threads"), \"peers\": $("$python" tests/peers_bench.py "$model" "$threads" "$runs")}"
    done
  done
done > "$work/runs.jsonl"
clock=$(for _ in 1 2 3; do "$work/clock"; done | sort -n | sed -n 2p)
kernel=$("$runtime" info --model "$1" --json |
  python3 -c 'import json, sys; print(json.load(sys.stdin).get("operator_kernels", {}).get("DenseLinear", "tract"))')
if [ -z "${PEAK:-}" ]; then
  case "$kernel" in
    avx512) if grep -q GenuineIntel /proc/cpuinfo; then PEAK=32; else PEAK=16; fi ;;
    neon) PEAK=8 ;;
    *) PEAK=16 ;;
  esac
fi

python3 - "$work/runs.jsonl" "$clock" "$PEAK" "$kernel" <<'EOF'
import json, statistics, sys
from collections import defaultdict
rows, clock, per_cycle, kernel = defaultdict(list), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[(r["model"], r["threads"])].append(r)
print(f"Clock measured: {clock:.2f} GHz; our dense kernel: {kernel}; f32 FMA peak assumed: "
      f"{per_cycle} multiply-adds per cycle per core.\n")
print("| model | GMAC | threads | ours ms | onnxruntime ms | OpenVINO ms | ours / onnxruntime | ours % peak | onnxruntime % peak |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for (model, threads), runs in rows.items():
    median = lambda values: statistics.median(values)
    ours = median([r["ours"] for r in runs])
    ort = median([r["peers"]["onnxruntime"]["median_ms"] for r in runs])
    ov = [r["peers"]["openvino"].get("median_ms") for r in runs]
    ov = f"{median(ov):.2f}" if None not in ov else "–"
    macs = runs[0]["peers"]["macs"]
    peak = per_cycle * clock * 1e9 * threads
    share = lambda ms: f"{100 * macs / (ms / 1e3) / peak:.0f} %"
    print(f"| {model} | {macs / 1e9:.3f} | {threads} | {ours:.2f} | {ort:.2f} | {ov} | {ours / ort:.2f} | {share(ours)} | {share(ort)} |")
first = next(iter(rows.values()))[0]["peers"]
print(f"\nonnxruntime {first['onnxruntime']['version']}, OpenVINO {first['openvino'].get('version', '–')}; "
      "median inference of the medians of rounds alternating the three runtimes.")
EOF
