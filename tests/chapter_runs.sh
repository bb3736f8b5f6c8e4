#!/usr/bin/env bash
# The training runs of the tutorial's last chapter (docs/chapter.md), by name, so that every run
# replays with the same flags and survives sessions of at most 3 hours and changes of machine.
#
#   tests/chapter_runs.sh train NAME...   train each run in turn: start it, or resume it where its
#                                         last committed epoch left off (from RUNS/NAME, or else
#                                         from the copy saved in models/chapter/NAME)
#   tests/chapter_runs.sh save NAME...    copy each run's committed epoch (state.json and the files
#                                         it names) into models/chapter/NAME, to be committed
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

# The last committed epoch of the run in folder $1, and the epochs it is planned for.
progress() {
  python3 -c "import json, sys
print(json.load(open(sys.argv[1] + '/state.json'))['epoch'], json.load(open(sys.argv[1] + '/config.json'))['epochs'])" "$1"
}

finished() {
  local epoch epochs
  read -r epoch epochs < <(progress "$1")
  [ "$epoch" -ge "$epochs" ]
}

# The weight files that the state.json in folder $1 names under the keys $2...
named_files() {
  python3 -c "import json, sys
state = json.load(open(sys.argv[1] + '/state.json'))
print('\n'.join(state[key] for key in sys.argv[2:] if state.get(key)))" "$@"
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

# The run's config, metrics and state.json, then the files that this copy of state.json names
# (the best weights alone once the run has finished: all that export and eval read), and the
# teacher's copy of a distilled run. A file that the run deletes meanwhile, having committed
# another epoch, fails the copy and leaves the saved folder as it was.
save() {
  local name=$1 run=$runs/$1 copy=$saved/$1.tmp keys
  [ -f "$run/state.json" ] || { echo "$name: no committed epoch in $run yet, nothing saved"; return 0; }
  rm -rf "$copy"
  mkdir -p "$copy"
  cp "$run/state.json" "$run/config.json" "$run/metrics.jsonl" "$copy/"
  if [ -f "$run/teacher.onnx" ]; then cp "$run/teacher.onnx" "$copy/"; fi
  if finished "$copy"; then keys=best_weights; else keys="model optimizer ema best_weights"; fi
  # shellcheck disable=SC2086 # the keys are words
  for file in $(named_files "$copy" $keys); do cp "$run/$file" "$copy/"; done
  rm -rf "${saved:?}/$name"
  mv "$copy" "$saved/$name"
  echo "$name: saved epoch $(progress "$saved/$name" | cut -d' ' -f1) ($(du -sh "$saved/$name" | cut -f1))"
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
