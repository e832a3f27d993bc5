#!/usr/bin/env bash
# ALBEF's Table 1 at tiny scale: ITC -> + ITM (random negatives) -> + ITM (hard negatives)
# -> + momentum distillation, 3 seeds each, evaluated with ITC-only and ITM re-ranked retrieval
# and the swap probe. Runs go to runs/albef_ablation/<variant>/seed<k>/; each eval.json is also
# copied to experiments/results/albef_ablation/ (kept in the repository: a variant/seed with a
# result there is skipped). Summarise with
#   python experiments/summarize.py experiments/results/albef_ablation retrieval.i2t_R@1 ...
# Usage: bash experiments/albef_ablation.sh [DATA] [STEPS]   (defaults: data/shapes 300)
set -euo pipefail
DATA=${1:-data/shapes}
STEPS=${2:-300}
source "$(dirname "$0")/common.sh"  # VLP, PYTHON, resume_flag, write_once, keep
OUT=runs/albef_ablation
RESULTS=experiments/results/albef_ablation
declare -A VARIANTS=(
  [1_itc]="model.objectives=[itc] model.contrastive.momentum=0"
  [2_itm_random]="model.objectives=[itc,itm] model.contrastive.hard_negatives=false model.contrastive.momentum=0"
  [3_itm_hard]="model.objectives=[itc,itm] model.contrastive.momentum=0"
  [4_itm_hard_mod]="model.objectives=[itc,itm] model.contrastive.momentum=0.995"
)
for seed in 0 1 2; do
  for variant in $(printf '%s\n' "${!VARIANTS[@]}" | sort); do
    run=$OUT/$variant/seed$seed
    [ -f "$RESULTS/$variant/seed$seed/eval.json" ] && continue
    if [ ! -f "$run/eval.json" ]; then
      # shellcheck disable=SC2046,SC2086
      $VLP train albef --data "$DATA" --out "$run" --steps "$STEPS" --no-progress $(resume_flag "$run") \
        train.seed=$seed train.ckpt_every=$STEPS ${VARIANTS[$variant]}
      k_test=$([ "$variant" = 1_itc ] && echo 0 || echo 16)  # no trained ITM head to re-rank with
      $VLP eval "$run" --data "$DATA" --tasks retrieval,probe --k-test "$k_test" --no-report
    fi
    keep "$run/eval.json" "$variant" "$seed"
  done
done
