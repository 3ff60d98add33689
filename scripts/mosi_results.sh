#!/usr/bin/env bash
# EMT-DLFR and EMT (without DLFR) on real CMU-MOSI (text + utterance-level audio), frozen
# text encoder with cached states (CPU budget), both protocols, then the aggregated tables.
#
#   scripts/mosi_results.sh DATA.pkl OUT_DIR [PARALLEL_JOBS]
#
# Resumable: an interrupted run continues from its checkpoint, a finished one is left as it is,
# unless EPOCHS / PER_RATE_EPOCHS / PATIENCE were raised: then it continues exactly as the
# longer run would have gone. Each call's wall time is appended to OUT_DIR/logs/<run>.log
# ("wall_seconds ..."; a run's time is their sum).
set -euo pipefail
DATA=${1:?MMSA pickle}
OUT=${2:?output folder}
JOBS=${3:-3}
# env: EPOCHS (12), PER_RATE_EPOCHS (EPOCHS), PATIENCE (4), GRAD_ACCUM (4), PER_RATE_RATES ("0.0 0.2 ... 1.0"),
#      PER_RATE_SEEDS ("0"; empty: none), SINGLE_MODEL_SEEDS ("0 1 2"; empty: none), MODELS ("emt-dlfr emt"),
#      LNLN_SEEDS (""; e.g. "0 1 2": the lnln protocol, per-sample and per-modality rates, tested at 0.0-0.9),
#      PAPER (1: per-rate runs with --paper, folders named <model>-per-rate-paper-...: released masks,
#      normalisation and selection), CONFIG (a --config YAML for every run, e.g. optim: {select_on: l1}),
#      CACHE, MSAFLOW, PYTHON, NICE (niceness of the runs, default 0)
MSAFLOW=${MSAFLOW:-msaflow}
CACHE=${CACHE:-$OUT/text-cache}
mkdir -p "$OUT/logs" "$OUT/runs"

# the shared text-state cache once, before the parallel runs: train/valid at the single-model
# grid and at every per-rate rate
TRAIN_RATES="0.0,0.2,0.4,0.6,0.8,1.0$(printf ',%s' ${PER_RATE_RATES:-})"
${PYTHON:-python} -m msaflow.pipeline.training.text_cache --data "$DATA" --cache "$CACHE" --train-rates "$TRAIN_RATES" --threads 2

MODELS=${MODELS:-emt-dlfr emt}
jobs_list() {
  for model in $MODELS; do
    for seed in ${SINGLE_MODEL_SEEDS-0 1 2}; do
      echo "$model single-model 0.0 $seed"
    done
  done
  for model in $MODELS; do
    for seed in ${LNLN_SEEDS:-}; do
      echo "$model lnln 0.0 $seed"
    done
  done
  for rate in ${PER_RATE_RATES:-0.0 0.2 0.4 0.6 0.8 1.0}; do
    for model in $MODELS; do
      for seed in ${PER_RATE_SEEDS-0}; do
        echo "$model per-rate $rate $seed"
      done
    done
  done
}

run_one() {
  local model=$1 protocol=$2 rate=$3 seed=$4
  local paper=""; [ "$protocol" = per-rate ] && [ -n "${PAPER:-}" ] && paper="-paper"
  local name="$model-$protocol$paper$([ "$protocol" = per-rate ] && echo "-r$rate")-s$seed"
  local t0 epochs=${EPOCHS:-12}; t0=$(date +%s)
  [ "$protocol" = per-rate ] && epochs=${PER_RATE_EPOCHS:-$epochs}
  nice -n "${NICE:-0}" $MSAFLOW train --data "$DATA" --text-cache "$CACHE" --threads 1 ${paper:+--paper} --epochs "$epochs" --grad-accum "${GRAD_ACCUM:-4}" \
    --patience "${PATIENCE:-4}" --model "$model" --protocol "$protocol" --missing-rate "$rate" --seed "$seed" \
    ${CONFIG:+--config "$CONFIG"} -o "$OUT/runs/$name" >> "$OUT/logs/$name.log" 2>&1
  echo "wall_seconds $(( $(date +%s) - t0 ))" >> "$OUT/logs/$name.log"
}
export -f run_one
export OUT MSAFLOW DATA CACHE CONFIG PAPER NICE
jobs_list | xargs -P "$JOBS" -L 1 bash -c 'run_one "$@"' _

# aggregate whichever groups have runs (seeds x rates per protocol)
have() { compgen -G "$1" > /dev/null; }
for model in $MODELS; do
  if have "$OUT/runs/$model-single-model-s*"; then
    $MSAFLOW evaluate "$OUT"/runs/$model-single-model-s* --data "$DATA" -o "$OUT/$model-single-model.json"
    $MSAFLOW evaluate "$OUT"/runs/$model-single-model-s* --data "$DATA" --corruption noise \
      -o "$OUT/$model-single-model-noise.json"
  fi
  if have "$OUT/runs/$model-per-rate-r*-s*"; then
    $MSAFLOW evaluate "$OUT"/runs/$model-per-rate-r*-s* --data "$DATA" -o "$OUT/$model-per-rate.json"
  fi
  if have "$OUT/runs/$model-per-rate-paper-r*-s*"; then
    $MSAFLOW evaluate "$OUT"/runs/$model-per-rate-paper-r*-s* --data "$DATA" -o "$OUT/$model-per-rate-paper.json"
  fi
  if have "$OUT/runs/$model-lnln-s*"; then
    $MSAFLOW evaluate "$OUT"/runs/$model-lnln-s* --data "$DATA" -o "$OUT/$model-lnln.json"
  fi
done
