#!/usr/bin/env bash
# Baselines on real CMU-MOSI (text + utterance-level audio), `single-model` protocol:
# train each model per seed, then score it at missing rates 0.0 ... 1.0 and aggregate the seeds.
#
# Frozen text encoder (all-MiniLM-L6-v2, mean pooled) with the pooled-vector memo shared by
# every run, fixed per-sample train masks (nested across rates, the released code's draw),
# batch 32 without gradient accumulation (only the fusion layers and heads train).
# Resumable: a finished run is skipped, an interrupted one resumes from its checkpoint.
#
# Usage: scripts/mosi_baselines.sh [DATA.pkl]
#   env: OUT (default /tmp/msaflow-baselines), SEEDS ("0 1 2"), MODELS, THREADS (1), EVAL_ONLY=1
set -euo pipefail

DATA=${1:-../shared/data/mosi_utt/mosi_utt_ta.pkl}
OUT=${OUT:-/tmp/msaflow-baselines}
SEEDS=${SEEDS:-"0 1 2"}
MODELS=${MODELS:-"text-only late-fusion tfn lmf gated dynmm"}
THREADS=${THREADS:-1}
MSAFLOW=${MSAFLOW:-msaflow}

mkdir -p "$OUT/runs" "$OUT/logs" "$OUT/results"
cat > "$OUT/frozen.yaml" <<EOF
model:
  extra:
    text_memo: $OUT/memo
EOF

if [[ -z "${EVAL_ONLY:-}" ]]; then
  for seed in $SEEDS; do          # seed-major: every model gets seed 0 before any gets seed 1
    for model in $MODELS; do
      run="$OUT/runs/$model/seed$seed"
      [[ -f "$run/metrics.json" ]] && continue
      cmd=("$MSAFLOW" train --data "$DATA" --model "$model" --protocol single-model --fixed-train-masks
           --freeze-text --config "$OUT/frozen.yaml" --grad-accum 1 --seed "$seed" --threads "$THREADS" -o "$run")
      echo "$(date -u +%FT%TZ) start ${cmd[*]}" | tee -a "$OUT/commands.log"
      start=$(date +%s)
      "${cmd[@]}" > "$OUT/logs/$model-seed$seed.log" 2>&1
      printf '%s\t%s\t%s\n' "$model" "$seed" "$(( $(date +%s) - start ))" >> "$OUT/wall_seconds.tsv"
    done
  done
fi

for model in $MODELS; do
  runs=()
  for seed in $SEEDS; do
    [[ -f "$OUT/runs/$model/seed$seed/metrics.json" ]] && runs+=("$OUT/runs/$model/seed$seed")
  done
  (( ${#runs[@]} )) || continue
  "$MSAFLOW" evaluate "${runs[@]}" --data "$DATA" --threads "$THREADS" -o "$OUT/results/$model.json" \
    > "$OUT/logs/$model-evaluate.log" 2>&1
done
echo "results in $OUT/results"
