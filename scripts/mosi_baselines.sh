#!/usr/bin/env bash
# The model tables of RESULTS.md from run folders: every model of MODELS, every seed of SEEDS,
# under each protocol of PROTOCOLS (single-model: one rate per batch, tested at 0.0 ... 1.0, AUILC;
# lnln: per-sample, per-modality rates, tested at 0.0 ... 0.9, averaged; per-rate: the EMT-DLFR
# paper's, one model per rate of PER_RATE_RATES, with --paper), on real CMU-MOSI. One table per
# protocol holds every model, so its rows come from one data path and one set of run settings.
#
# Frozen text encoder (all-MiniLM-L6-v2): the baselines read its mean-pooled vector from the memo
# shared by every run, EMT-DLFR and EMT its token states from the text-state cache (--text-cache).
# Fixed per-sample drop uniforms (--fixed-train-masks), batch 32 without gradient accumulation
# (only the fusion layers and heads train), at most EPOCHS epochs, early stop after PATIENCE
# epochs without improvement of the validation loss (per-rate: PER_RATE_EPOCHS and
# PER_RATE_PATIENCE; 11 rates x the seeds make it the costly protocol).
# DynMM is trained in two stages, as released: its experts are the text-only and late-fusion runs
# of the same protocol, seed (and rate), frozen, trained first; then its gate (`dynmm` rows:
# lambda 0.01, soft gate; `dynmm-hard`: the straight-through hard gate).
# Protocols run one after the other, in the order given, so an interrupted sweep has whole tables.
# Resumable: a finished run is skipped, an interrupted one resumes from its checkpoint.
# At the end: `msaflow evaluate` per (protocol, model) whose runs are all there (a row is every
# seed and rate or none), and `scripts/baselines_table.py`, which rewrites the generated block of
# each protocol swept in RESULTS.md (WRITE=RESULTS.md) or prints the tables.
#
# Usage: scripts/mosi_baselines.sh [DATA.pkl]
#   env: OUT (/tmp/msaflow-baselines), SEEDS ("0 1 2"), PROTOCOLS ("single-model lnln per-rate"),
#        MODELS ("text-only late-fusion dynmm dynmm-hard tfn-style lmf-style gated emt-dlfr emt"),
#        PER_RATE_RATES ("0.0 0.1 ... 1.0"), JOBS (2), THREADS (1), EPOCHS (30), PATIENCE (8),
#        PER_RATE_EPOCHS (12), PER_RATE_PATIENCE (3), NICE (15), EVAL_ONLY=1,
#        WRITE (a RESULTS.md to update)
set -euo pipefail

DATA=${1:-../shared/data/mosi_utt/mosi_utt_ta.pkl}
OUT=${OUT:-/tmp/msaflow-baselines}
SEEDS=${SEEDS:-"0 1 2"}
PROTOCOLS=${PROTOCOLS:-"single-model lnln per-rate"}
MODELS=${MODELS:-"text-only late-fusion dynmm dynmm-hard tfn-style lmf-style gated emt-dlfr emt"}
PER_RATE_RATES=${PER_RATE_RATES:-"0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1.0"}
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
EPOCHS=${EPOCHS:-30}
PATIENCE=${PATIENCE:-8}
PER_RATE_EPOCHS=${PER_RATE_EPOCHS:-12}
PER_RATE_PATIENCE=${PER_RATE_PATIENCE:-3}
NICE=${NICE:-15}
MSAFLOW=${MSAFLOW:-msaflow}
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT/runs" "$OUT/logs" "$OUT/results" "$OUT/configs"
cat > "$OUT/configs/frozen.yaml" <<EOF
model:
  extra:
    text_memo: $OUT/memo
EOF

is_dynmm() { [[ "$1" == dynmm* ]]; }
is_emt() { [[ "$1" == emt* ]]; }  # token-level attention: text states from the cache, not the memo
# a run's folder: OUT/runs/PROTOCOL/NAME/seedS; per-rate: OUT/runs/per-rate/NAME/rRATE/seedS
run_dir() {
  local protocol=$1 name=$2 seed=$3 rate=${4:-}
  if [[ "$protocol" == per-rate ]]; then echo "$OUT/runs/$protocol/$name/r$rate/seed$seed"
  else echo "$OUT/runs/$protocol/$name/seed$seed"; fi
}
# the rates a protocol trains at ("-": one model for all rates)
rates_of() { if [[ "$1" == per-rate ]]; then echo "$PER_RATE_RATES"; else echo "-"; fi; }
# the --config of a row: DynMM rows name their experts (same protocol, seed and rate)
config_of() {
  local protocol=$1 name=$2 seed=$3 rate=${4:-}
  if ! is_dynmm "$name"; then echo "$OUT/configs/frozen.yaml"; return; fi
  local file="$OUT/configs/$protocol-$name-seed$seed${rate:+-r$rate}.yaml"
  cat > "$file" <<EOF
model:
  extra:
    text_memo: $OUT/memo
    dynmm_experts:
      cheap: $(run_dir "$protocol" text-only "$seed" "$rate")
      expensive: $(run_dir "$protocol" late-fusion "$seed" "$rate")
    dynmm_lambda: 0.01
    dynmm_hard: $([[ "$name" == dynmm-hard ]] && echo true || echo false)
EOF
  echo "$file"
}

run_one() {
  local protocol=$1 name=$2 seed=$3 rate=${4:-}
  local run; run=$(run_dir "$protocol" "$name" "$seed" "$rate")
  [[ -f "$run/metrics.json" ]] && return 0
  local model=$name; is_dynmm "$name" && model=dynmm
  local text=(--config "$(config_of "$protocol" "$name" "$seed" "$rate")")
  is_emt "$name" && text=(--text-cache "$OUT/text-cache")
  local epochs=$EPOCHS patience=$PATIENCE per_rate=()
  if [[ "$protocol" == per-rate ]]; then
    epochs=$PER_RATE_EPOCHS patience=$PER_RATE_PATIENCE per_rate=(--missing-rate "$rate" --paper)
  fi
  local cmd=(nice -n "$NICE" "$MSAFLOW" train --data "$DATA" --model "$model" --protocol "$protocol" "${per_rate[@]}"
             --fixed-train-masks --freeze-text "${text[@]}" --grad-accum 1
             --epochs "$epochs" --patience "$patience" --seed "$seed" --threads "$THREADS" -o "$run")
  echo "$(date -u +%FT%TZ) start ${cmd[*]}" >> "$OUT/commands.log"
  local start; start=$(date +%s)
  "${cmd[@]}" > "$OUT/logs/$protocol-$name-seed$seed${rate:+-r$rate}.log" 2>&1
  printf '%s\t%s\t%s\t%s\n' "$protocol" "$name" "$seed${rate:+ r$rate}" "$(( $(date +%s) - start ))" \
    >> "$OUT/wall_seconds.tsv"
}
export -f run_one run_dir config_of is_dynmm is_emt
export OUT DATA MSAFLOW THREADS EPOCHS PATIENCE PER_RATE_EPOCHS PER_RATE_PATIENCE NICE

if [[ -z "${EVAL_ONLY:-}" ]]; then
  # every corrupted train sequence a fixed-mask run can draw, encoded once in large batches
  [[ -d "$OUT/memo" ]] || nice -n "$NICE" "$PYTHON" "$HERE/warm_text_memo.py" --data "$DATA" --memo "$OUT/memo" \
    --threads "$THREADS" > "$OUT/logs/warm-memo.log" 2>&1
  # EMT's token states: test at every rate, train/valid at the single-model grid and the per-rate rates
  if [[ " $MODELS " == *" emt"* ]]; then
    nice -n "$NICE" "$PYTHON" -m msaflow.pipeline.training.text_cache --data "$DATA" --cache "$OUT/text-cache" \
      --train-rates "0.0,0.2,0.4,0.6,0.8,1.0$(printf ',%s' $PER_RATE_RATES)" --threads "$THREADS" \
      > "$OUT/logs/text-cache.log" 2>&1
  fi
  # per protocol, stage 1: DynMM's experts (text-only, late-fusion); stage 2: DynMM's gates;
  # stage 3: the other models; seed-major within a stage
  stage_of() { if [[ "$1" == text-only || "$1" == late-fusion ]]; then echo 1; elif is_dynmm "$1"; then echo 2; else echo 3; fi; }
  for protocol in $PROTOCOLS; do
    for stage in 1 2 3; do
      for seed in $SEEDS; do
        for rate in $(rates_of "$protocol"); do
          rate=${rate#-}
          for name in $MODELS; do  # no trailing blank: xargs -L would join the next line to it
            if [[ $(stage_of "$name") == "$stage" ]]; then echo "$protocol $name $seed${rate:+ $rate}"; fi
          done
        done
      done | xargs -r -P "$JOBS" -L 1 bash -c 'run_one "$@"' _
    done
  done
fi

for protocol in $PROTOCOLS; do
  for name in $MODELS; do
    runs=() missing=0
    for seed in $SEEDS; do
      for rate in $(rates_of "$protocol"); do
        run=$(run_dir "$protocol" "$name" "$seed" "${rate#-}")
        if [[ -f "$run/metrics.json" ]]; then runs+=("$run"); else missing=$((missing + 1)); fi
      done
    done
    if (( missing )); then echo "$protocol $name: $missing run(s) not finished, no row" >&2; continue; fi
    nice -n "$NICE" "$MSAFLOW" evaluate "${runs[@]}" --data "$DATA" --threads "$THREADS" \
      -o "$OUT/results/$protocol/$name.json" > "$OUT/logs/$protocol-$name-evaluate.log" 2>&1
    if [[ "$protocol" == single-model && "$name" != text-only ]]; then  # does the model use the audio at all?
      nice -n "$NICE" "$MSAFLOW" evaluate "${runs[@]}" --data "$DATA" --corruption noise --threads "$THREADS" \
        -o "$OUT/results/$protocol/$name-noise.json" > "$OUT/logs/$protocol-$name-noise.log" 2>&1
    fi
  done
done
"$PYTHON" "$HERE/baselines_table.py" "$OUT/results" --wall "$OUT/wall_seconds.tsv" \
  --models "$(echo $MODELS | tr ' ' ',')" ${WRITE:+--write "$WRITE"} > "$OUT/tables.md"
echo "tables in $OUT/tables.md${WRITE:+ and $WRITE}"
