#!/usr/bin/env bash
# The baseline tables of RESULTS.md from run folders: every model of MODELS, every seed of SEEDS,
# under each protocol of PROTOCOLS (single-model: one rate per batch, tested at 0.0 ... 1.0, AUILC;
# lnln: per-sample, per-modality rates, tested at 0.0 ... 0.9, averaged), on real CMU-MOSI.
#
# Frozen text encoder (all-MiniLM-L6-v2, mean pooled) with the pooled-vector memo shared by every
# run, fixed per-sample drop uniforms (--fixed-train-masks; the rates are drawn per batch), batch 32
# without gradient accumulation (only the fusion layers and heads train), at most EPOCHS epochs,
# early stop after PATIENCE epochs without improvement of the validation loss.
# DynMM is trained in two stages, as released: its experts are the text-only and late-fusion runs
# of the same protocol and seed (frozen, trained first), then its gate (`dynmm` rows: lambda 0.01, soft gate;
# `dynmm-hard`: the straight-through hard gate).
# Resumable: a finished run is skipped, an interrupted one resumes from its checkpoint.
# At the end: `msaflow evaluate` per (protocol, model) and `scripts/baselines_table.py`, which
# rewrites the generated block of RESULTS.md (WRITE=RESULTS.md) or prints the tables.
#
# Usage: scripts/mosi_baselines.sh [DATA.pkl]
#   env: OUT (/tmp/msaflow-baselines), SEEDS ("0 1 2"), PROTOCOLS ("single-model lnln"),
#        MODELS ("text-only late-fusion dynmm dynmm-hard tfn-style lmf-style gated"), JOBS (2),
#        THREADS (1), EPOCHS (30), PATIENCE (8), NICE (15), EVAL_ONLY=1, WRITE (a RESULTS.md to update)
set -euo pipefail

DATA=${1:-../shared/data/mosi_utt/mosi_utt_ta.pkl}
OUT=${OUT:-/tmp/msaflow-baselines}
SEEDS=${SEEDS:-"0 1 2"}
PROTOCOLS=${PROTOCOLS:-"single-model lnln"}
MODELS=${MODELS:-"text-only late-fusion dynmm dynmm-hard tfn-style lmf-style gated"}
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
EPOCHS=${EPOCHS:-30}
PATIENCE=${PATIENCE:-8}
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
# the --config of a row: DynMM rows name their experts (same protocol and seed)
config_of() {
  local protocol=$1 name=$2 seed=$3
  if ! is_dynmm "$name"; then echo "$OUT/configs/frozen.yaml"; return; fi
  local file="$OUT/configs/$protocol-$name-seed$seed.yaml"
  cat > "$file" <<EOF
model:
  extra:
    text_memo: $OUT/memo
    dynmm_experts:
      cheap: $OUT/runs/$protocol/text-only/seed$seed
      expensive: $OUT/runs/$protocol/late-fusion/seed$seed
    dynmm_lambda: 0.01
    dynmm_hard: $([[ "$name" == dynmm-hard ]] && echo true || echo false)
EOF
  echo "$file"
}

run_one() {
  local protocol=$1 name=$2 seed=$3
  local run="$OUT/runs/$protocol/$name/seed$seed"
  [[ -f "$run/metrics.json" ]] && return 0
  local model=$name; is_dynmm "$name" && model=dynmm
  local cmd=(nice -n "$NICE" "$MSAFLOW" train --data "$DATA" --model "$model" --protocol "$protocol"
             --fixed-train-masks --freeze-text --config "$(config_of "$protocol" "$name" "$seed")" --grad-accum 1
             --epochs "$EPOCHS" --patience "$PATIENCE" --seed "$seed" --threads "$THREADS" -o "$run")
  echo "$(date -u +%FT%TZ) start ${cmd[*]}" >> "$OUT/commands.log"
  local start; start=$(date +%s)
  "${cmd[@]}" > "$OUT/logs/$protocol-$name-seed$seed.log" 2>&1
  printf '%s\t%s\t%s\t%s\n' "$protocol" "$name" "$seed" "$(( $(date +%s) - start ))" >> "$OUT/wall_seconds.tsv"
}
export -f run_one config_of is_dynmm
export OUT DATA MSAFLOW THREADS EPOCHS PATIENCE NICE

if [[ -z "${EVAL_ONLY:-}" ]]; then
  # every corrupted train sequence a fixed-mask run can draw, encoded once in large batches
  [[ -d "$OUT/memo" ]] || nice -n "$NICE" "$PYTHON" "$HERE/warm_text_memo.py" --data "$DATA" --memo "$OUT/memo" \
    --threads "$THREADS" > "$OUT/logs/warm-memo.log" 2>&1
  # stage 1: DynMM's experts (text-only, late-fusion); stage 2: DynMM's gates; stage 3: the other
  # baselines; seed-major within a stage
  stage_of() { if [[ "$1" == text-only || "$1" == late-fusion ]]; then echo 1; elif is_dynmm "$1"; then echo 2; else echo 3; fi; }
  for stage in 1 2 3; do
    for seed in $SEEDS; do
      for protocol in $PROTOCOLS; do
        for name in $MODELS; do
          if [[ $(stage_of "$name") == "$stage" ]]; then echo "$protocol $name $seed"; fi
        done
      done
    done | xargs -r -P "$JOBS" -L 1 bash -c 'run_one "$@"' _
  done
fi

for protocol in $PROTOCOLS; do
  for name in $MODELS; do
    runs=()
    for seed in $SEEDS; do
      [[ -f "$OUT/runs/$protocol/$name/seed$seed/metrics.json" ]] && runs+=("$OUT/runs/$protocol/$name/seed$seed")
    done
    (( ${#runs[@]} )) || continue
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
