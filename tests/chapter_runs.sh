#!/usr/bin/env bash
# The training runs of the tutorial's last chapter (docs/chapter.md), by name, so that every run
# replays with the same flags and survives sessions of at most 3 hours and changes of machine.
#
#   tests/chapter_runs.sh train NAME...   train each run in turn: start it, or resume it where its
#                                         last committed epoch left off (from RUNS/NAME, or else
#                                         from the copy saved in models/chapter/NAME)
#   tests/chapter_runs.sh save NAME...    copy each run's committed epoch (the files its state.json
#                                         names) into models/chapter/NAME, to be committed
#   tests/chapter_runs.sh flags NAME      print the run's `exporter train` flags
#   tests/chapter_runs.sh names           list the runs
#
# Environment: EXPORTER (default target/release/exporter), DATA (default data/fashion-mnist, as
# `exporter data fashion-mnist --out data/fashion-mnist` writes it), RUNS (default runs).
# A lane is one invocation; two lanes share this 2-core machine, e.g. at `nice -n 19`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
exporter=${EXPORTER:-$root/target/release/exporter}
data=${DATA:-$root/data/fashion-mnist}
runs=${RUNS:-$root/runs}
saved=$root/models/chapter

# One recipe per family (docs/chapter.md): the ViTs and the Swin, and the CNNs.
# The weight average's decay is set per run below: it spans the same share of an epoch whatever
# the share of the data (1 - decay grows as the epoch shrinks).
vit_recipe="--epochs 50 --batch-size 128 --lr 1e-3 --warmup-epochs 2 --label-smoothing 0.1
  --crop-min-area 0.8 --erase 0.25 --val-fraction 0.1"
cnn_recipe="--epochs 40 --batch-size 128 --lr 2e-3 --warmup-epochs 1 --label-smoothing 0.1
  --crop-min-area 0.8 --erase 0.25 --val-fraction 0.1"
vit96="--preset fashion --patch-size 4 --dim 96 --mlp-dim 192 --dropout 0 $vit_recipe"

flags() {
  case $1 in
    fashion-cnn) echo "--preset cnn $cnn_recipe --ema 0.999" ;;
    fashion-cnn48) echo "--preset cnn --widths 48,96,192 $cnn_recipe --ema 0.999" ;;
    fashion-vit96) echo "$vit96 --ema 0.9995" ;;
    fashion-deit96) echo "$vit96 --ema 0.9995 --distill-from $runs/fashion-cnn" ;;
    fashion-swin) echo "--preset swin-fashion $vit_recipe --ema 0.9995" ;;
    # Less data, same recipe: each epoch is that much shorter. The teacher of a distilled run
    # saw the same share of the data, and no more.
    fashion-cnn-10) echo "--preset cnn $cnn_recipe --ema 0.99 --train-fraction 0.1" ;;
    fashion-cnn-30) echo "--preset cnn $cnn_recipe --ema 0.9967 --train-fraction 0.3" ;;
    fashion-vit96-10) echo "$vit96 --ema 0.995 --train-fraction 0.1" ;;
    fashion-vit96-30) echo "$vit96 --ema 0.9983 --train-fraction 0.3" ;;
    fashion-deit96-10) echo "$vit96 --ema 0.995 --train-fraction 0.1 --distill-from $runs/fashion-cnn-10" ;;
    fashion-deit96-30) echo "$vit96 --ema 0.9983 --train-fraction 0.3 --distill-from $runs/fashion-cnn-30" ;;
    *) echo "unknown run $1 (tests/chapter_runs.sh names lists them)" >&2; return 2 ;;
  esac
}
names="fashion-cnn fashion-cnn48 fashion-vit96 fashion-deit96 fashion-swin fashion-cnn-10
fashion-cnn-30 fashion-vit96-10 fashion-vit96-30 fashion-deit96-10 fashion-deit96-30"

# The files of a run's committed epoch: state.json and everything it names, the run's config
# and metrics, and the teacher's copy of a distilled run. A finished run keeps only its best
# weights, which is all that export and eval read.
committed_files() {
  python3 - "$1" <<'EOF'
import json, os, sys
run = sys.argv[1]
state = json.load(open(os.path.join(run, "state.json")))
config = json.load(open(os.path.join(run, "config.json")))
names = {"state.json", "config.json", "metrics.jsonl", "teacher.onnx"}
weights = ("best_weights",) if state["epoch"] >= config["epochs"] else ("model", "optimizer", "ema", "best_weights")
names |= {state[key] for key in weights if state.get(key)}
print("\n".join(sorted(n for n in names if os.path.exists(os.path.join(run, n)))))
EOF
}

finished() {
  python3 -c "import json, sys; run = sys.argv[1]
sys.exit(0 if json.load(open(run + '/state.json'))['epoch'] >= json.load(open(run + '/config.json'))['epochs'] else 1)" "$1"
}

train() {
  local name=$1 run=$runs/$1
  flags "$name" >/dev/null
  if [ ! -f "$run/state.json" ] && [ -f "$saved/$name/state.json" ]; then
    echo "$name: restoring the saved epoch from models/chapter/$name"
    mkdir -p "$run"
    cp "$saved/$name"/* "$run/"
  fi
  if [ -f "$run/state.json" ]; then
    if finished "$run"; then
      echo "$name: finished"
    else
      echo "$name: resuming"
      "$exporter" train --resume "$run"
    fi
  else
    echo "$name: starting"
    # shellcheck disable=SC2046 # the flags are words
    "$exporter" train --data "$data/train" --out "$run" $(flags "$name")
  fi
}

save() {
  local name=$1 run=$runs/$1
  [ -f "$run/state.json" ] || { echo "$name: no committed epoch in $run yet, nothing saved"; return 0; }
  rm -rf "$saved/$name.tmp"
  mkdir -p "$saved/$name.tmp"
  committed_files "$run" | while read -r file; do cp "$run/$file" "$saved/$name.tmp/"; done
  rm -rf "$saved/$name"
  mv "$saved/$name.tmp" "$saved/$name"
  echo "$name: saved epoch $(python3 -c "import json; print(json.load(open('$run/state.json'))['epoch'])") ($(du -sh "$saved/$name" | cut -f1))"
}

command=${1:-}
shift || true
case $command in
  train) for name in "$@"; do train "$name"; done ;;
  save) for name in "$@"; do save "$name"; done ;;
  flags) flags "$1" ;;
  names) echo $names ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
