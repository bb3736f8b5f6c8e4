#!/usr/bin/env bash
# Run the fuzz targets: first every committed regression input (crashes found before, which
# must stay fixed), then each target for SECONDS from the committed seeds plus the corpus that
# earlier runs grew. Prints each target's executions and the total.
#
#   fuzz/run.sh [SECONDS] [TARGET ...]     # default: 60 s for every target
#   JOBS=2 fuzz/run.sh 600                 # two targets at a time
#
# Needs the nightly toolchain and cargo-fuzz (`rustup toolchain install nightly`,
# `cargo install cargo-fuzz`). A crash stops the script with the input in
# fuzz/artifacts/TARGET/; copy it to fuzz/regressions/TARGET/ once fixed.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
jobs=${JOBS:-1}
# One build configuration for every step (release, debug assertions and overflow checks,
# AddressSanitizer): otherwise each step rebuilds.
flags=(-O -a)
cargo +nightly fuzz build "${flags[@]}"

mkdir -p logs
run_one() {
    local target=$1
    mkdir -p "corpus/$target"
    # The shipped models seed the model target; they are too big to keep twice in git.
    [ "$target" = model_bytes ] && cp ../models/fashion-vit/model{,.int8}.onnx "corpus/$target/"
    if [ -d "regressions/$target" ]; then
        cargo +nightly fuzz run "${flags[@]}" "$target" "regressions/$target" -- -runs=0 \
            > "logs/$target.regressions.log" 2>&1 ||
            { echo "$target: a regression input fails again (logs/$target.regressions.log)"; return 1; }
    fi
    cargo +nightly fuzz run "${flags[@]}" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
        > "logs/$target.log" 2>&1 ||
        { tail -40 "logs/$target.log"; echo "$target: FAILED (logs/$target.log, fuzz/artifacts/$target/)"; return 1; }
    echo "$target $(grep -m1 -o 'stat::number_of_executed_units: [0-9]*' "logs/$target.log" | grep -o '[0-9]*$')"
}
status=0
for target in "${targets[@]}"; do
    run_one "$target" > "logs/$target.result" &
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || status=1; done
done
while [ -n "$(jobs -rp)" ]; do wait -n || status=1; done
wait || status=1
for target in "${targets[@]}"; do cat "logs/$target.result"; done |
    awk '{print} $2 ~ /^[0-9]+$/ {n += $2} END {printf "total %d executions\n", n}'
exit $status
