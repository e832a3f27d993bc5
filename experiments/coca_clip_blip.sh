#!/usr/bin/env bash
# CoCa vs CLIP vs BLIP at equal training compute (the CoCa issue's comparison), 3 seeds each:
# every recipe's tiny config trains for the steps that spend the FLOPs of BLIP_STEPS BLIP steps
# (experiments/equal_compute.py counts one real step of each), then is evaluated on zero-shot
# classification, retrieval (embeddings only: --k-test 0), the swap probe and, for the two with a
# decoder, captioning (beam 3). Runs go to runs/coca_clip_blip/<recipe>/seed<k>/; each eval.json
# is copied to experiments/results/coca_clip_blip/<recipe>/seed<k>/ (a result there is skipped).
# Usage: bash experiments/coca_clip_blip.sh [DATA] [BLIP_STEPS]   (defaults: data/shapes 300;
# OUT, RESULTS and SEEDS="0 1 2" can be set in the environment, e.g. for a smoke run)
set -euo pipefail
DATA=${1:-data/shapes}
BLIP_STEPS=${2:-300}
source "$(dirname "$0")/common.sh"  # VLP, PYTHON, resume_flag, write_once, keep
OUT=${OUT:-runs/coca_clip_blip}
RESULTS=${RESULTS:-experiments/results/coca_clip_blip}
mkdir -p "$RESULTS"
budget=$RESULTS/steps.txt  # "recipe steps gflop_per_step", kept with the results
write_once "$budget" $PYTHON experiments/equal_compute.py --data "$DATA" --budget "blip:$BLIP_STEPS" clip coca blip
declare -A TASKS=([clip]=zeroshot,retrieval,probe [coca]=zeroshot,retrieval,probe,caption
                  [blip]=zeroshot,retrieval,probe,caption)
for seed in ${SEEDS:-0 1 2}; do
  while read -r recipe steps _; do
    run=$OUT/$recipe/seed$seed
    [ -f "$RESULTS/$recipe/seed$seed/eval.json" ] && continue
    # shellcheck disable=SC2046
    $VLP train "$recipe" --data "$DATA" --out "$run" --steps "$steps" --no-progress $(resume_flag "$run") \
      train.seed=$seed train.ckpt_every=$steps
    $VLP eval "$run" --data "$DATA" --tasks "${TASKS[$recipe]}" --k-test 0 --no-report
    keep "$run/eval.json" "$recipe" "$seed"
  done < "$budget"
done
