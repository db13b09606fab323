#!/usr/bin/env bash
# tiny-synth candidates trained side by side on one lent GPU (issue 17), each for the same wall
# time, then their logs and weights in OUT. Run from the repository root with PYTHONPATH=src (or
# the package installed). Each candidate is one argument, NAME:ARGS, with an optional second
# stage after "|" that resumes from the first stage's weights with a fresh schedule (the shipped
# recipe's CLS-then-average stages); each stage names the whole architecture, and the second
# stage's --steps counts from step 0 (the first stage's steps included):
#   bash scripts/gpu_candidates.sh "A:--patch-size 4 --steps 8100 | --patch-size 4 --pool avg --steps 13500 --lr 5e-4"
# Every run adds COMMON (below) to its arguments. With CALIBRATE=M (minutes), the candidates first
# run together for M minutes, and each stage's --steps is then replaced by 85% of the steps/s
# measured times its share of BUDGET seconds (60% / 40% for two stages), rounded down to tens
# (the schedules must end, so their length is fixed before they start; the 15% leaves room for
# start-up and evaluations). Environment: OUT, DEVICE (cuda), WORKERS (scene processes per run),
# BUDGET, CALIBRATE (0: the given --steps), GUARD (stop a stage of two after this many minutes, a
# single stage after twice that).
set -u
OUT=${OUT:-build/gpu}; DEVICE=${DEVICE:-cuda}; BUDGET=${BUDGET:-400}
CALIBRATE=${CALIBRATE:-0}; WORKERS=${WORKERS:-4}; GUARD=${GUARD:-30}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"; OUT=$(realpath "$OUT"); WORK=$(mktemp -d)
echo "runs in $WORK, results in $OUT"
COMMON="--batch-size 60 --group 5 --warmup 100 --lr 1e-3 --device $DEVICE --threads 1 --workers $WORKERS --stem conv --layers 3 --log-every 250 --eval-count 300 --pointing-count 100"
train() { local name=$1; shift; python3 scripts/train_tiny_synth.py --out "$WORK/$name" $COMMON "$@" >>"$WORK/$name.log" 2>&1; }
measured() {
  python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(m['reached_step']/m['stage_seconds'])" \
    "$WORK/cal$1/tiny-synth.metrics.json" || { echo "calibration of $1 failed: see $WORK/cal$1.log" >&2; exit 1; }
}
steps_for() { python3 -c "import sys; print(max(int(float(sys.argv[1])*float(sys.argv[2])*0.85)//10*10, 200))" "$1" "$2"; }
without_steps() { sed -E 's/--steps [0-9]+//' <<<"$1"; }
steps_of() { grep -oE -- '--steps [0-9]+' <<<"$1" | grep -oE '[0-9]+' || echo 0; }

names=(); firsts=(); seconds=()
for spec in "$@"; do
  names+=("${spec%%:*}"); rest=${spec#*:}
  firsts+=("${rest%%|*}"); if [[ $rest == *"|"* ]]; then seconds+=("${rest#*|}"); else seconds+=(""); fi
done
if [[ $CALIBRATE != 0 ]]; then
  for i in "${!names[@]}"; do train "cal${names[$i]}" $(without_steps "${firsts[$i]}") --steps 100000 --max-minutes "$CALIBRATE" & done
  wait
  for i in "${!names[@]}"; do
    rate=$(measured "${names[$i]}") || exit 1
    if [[ -n ${seconds[$i]} ]]; then
      one=$(steps_for "$rate" "$(python3 -c "print($BUDGET*0.6)")"); two=$(steps_for "$rate" "$(python3 -c "print($BUDGET*0.4)")")
      firsts[$i]="$(without_steps "${firsts[$i]}") --steps $one"; seconds[$i]="$(without_steps "${seconds[$i]}") --steps $((one + two))"
    else
      firsts[$i]="$(without_steps "${firsts[$i]}") --steps $(steps_for "$rate" "$BUDGET")"
    fi
    echo "calibration ${names[$i]}: $rate steps/s -> ${firsts[$i]} | ${seconds[$i]}"
  done
fi
candidate() {  # name first second
  local one=$(steps_of "$2")
  if [[ -z $3 ]]; then
    train "$1" $2 --eval-every $((one / 4)) --max-minutes "$(python3 -c "print(2 * $GUARD)")"
    return
  fi
  local two=$(( $(steps_of "$3") - one ))
  train "${1}1" $2 --eval-every $((one / 3)) --max-minutes "$GUARD" &&
  train "${1}2" $3 --resume "$WORK/${1}1/tiny-synth.safetensors" --new-schedule --eval-every $((two / 2)) --max-minutes "$GUARD"
}
for i in "${!names[@]}"; do candidate "${names[$i]}" "${firsts[$i]}" "${seconds[$i]}" & done
wait
for run in "$WORK"/*/; do
  run=$(basename "$run"); [[ $run == cal* ]] && continue
  cp "$WORK/$run/tiny-synth.safetensors" "$OUT/$run.safetensors" || echo "no weights from $run" >&2
done
tar czf "$OUT/runs.tar.gz" -C "$WORK" --exclude='*.pt' --exclude='*.safetensors' .
for log in "$WORK"/*.log; do
  echo "=== $(basename "$log")"
  grep -E '^\{"step"|"val_|reached_step|stage_seconds|final_loss|Traceback|Error' "$log"
  grep "^step " "$log" | tail -1
done
