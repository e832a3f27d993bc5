#!/usr/bin/env bash
# ALBEF's Table 1 at tiny scale: ITC -> + ITM (random negatives) -> + ITM (hard negatives)
# -> + momentum distillation, 3 seeds each, evaluated with ITC-only and ITM re-ranked retrieval
# and the swap probe. Writes runs/albef_ablation/<variant>/seed<k>/eval.json; summarise with
#   python experiments/summarize.py runs/albef_ablation
# Usage: bash experiments/albef_ablation.sh [DATA] [STEPS]   (defaults: data/shapes 300)
set -euo pipefail
DATA=${1:-data/shapes}
STEPS=${2:-300}
VLP=${VLP:-.venv/bin/vlp}
OUT=runs/albef_ablation
declare -A VARIANTS=(
  [1_itc]="model.objectives=[itc] model.contrastive.momentum=0"
  [2_itm_random]="model.objectives=[itc,itm] model.contrastive.hard_negatives=false model.contrastive.momentum=0"
  [3_itm_hard]="model.objectives=[itc,itm] model.contrastive.momentum=0"
  [4_itm_hard_mod]="model.objectives=[itc,itm] model.contrastive.momentum=0.995"
)
for seed in 0 1 2; do
  for variant in $(printf '%s\n' "${!VARIANTS[@]}" | sort); do
    run=$OUT/$variant/seed$seed
    [ -f "$run/eval.json" ] && continue
    # shellcheck disable=SC2086
    resume=$([ -e "$run/checkpoints/latest" ] && echo --resume || true)
    $VLP train albef --data "$DATA" --out "$run" --steps "$STEPS" --no-progress $resume \
      train.seed=$seed train.ckpt_every=$STEPS ${VARIANTS[$variant]}
    k_test=$([ "$variant" = 1_itc ] && echo 0 || echo 16)  # no trained ITM head to re-rank with
    $VLP eval "$run" --data "$DATA" --tasks retrieval,probe --k-test "$k_test" --no-report
  done
done
