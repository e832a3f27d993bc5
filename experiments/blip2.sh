#!/usr/bin/env bash
# BLIP-2 at tiny scale, 3 seeds: stage 1 (Q-Former on a frozen CLIP image tower: ITC, ITG, ITM)
# evaluated on zero-shot classification, retrieval (best-query ITC, then ITM re-ranking of the
# top 16) and the swap probe; stage 2 (the Q-Former's queries as a soft prompt of a frozen LM)
# evaluated on zero-shot captioning and prompted VQA. The frozen parts are trained once (seed 0):
# a CLIP (CLIP_STEPS steps) for the image tower, and `caption_lm`, an OPT trained on the
# captions and question-answer text and exported to transformers' format, for the LM, whose
# zero-shot VQA without the picture (experiments/blind_vqa.py) is the prior stage 2 must beat.
# Runs go to runs/blip2_exp/; each eval.json is copied to experiments/results/blip2/<stage>/seed<k>/
# (a result there is skipped), the CLIP's to .../clip/seed0/ and the blind answers' accuracy to
# experiments/results/blip2/blind_vqa.json.
# Usage: bash experiments/blip2.sh [DATA] [CLIP_STEPS]   (defaults: data/shapes 600; OUT,
# RESULTS, SEEDS="0 1 2" and STEPS (of caption_lm and both stages; default: their configs') can
# be set in the environment, e.g. for a smoke run)
set -euo pipefail
DATA=${1:-data/shapes}
CLIP_STEPS=${2:-600}
source "$(dirname "$0")/common.sh"  # VLP, PYTHON, resume_flag, write_once, keep
STEPS_ARG=${STEPS:+--steps $STEPS}
OUT=${OUT:-runs/blip2_exp}
RESULTS=${RESULTS:-experiments/results/blip2}
clip=$OUT/clip
lm=$OUT/caption_lm
# shellcheck disable=SC2046
$VLP train clip --data "$DATA" --out "$clip" --steps "$CLIP_STEPS" --no-progress $(resume_flag "$clip") \
  train.ckpt_every="$CLIP_STEPS"
# shellcheck disable=SC2046
$VLP train caption_lm --data "$DATA" --out "$lm" --no-progress $(resume_flag "$lm") $STEPS_ARG
[ -f "$lm/hf/config.json" ] || $VLP convert "$lm" "$lm/hf" --to hf
if [ ! -f "$RESULTS/clip/seed0/eval.json" ]; then  # the frozen tower's own CLIP, for comparison
  $VLP eval "$clip" --data "$DATA" --tasks zeroshot,retrieval,probe --no-report
  keep "$clip/eval.json" clip 0
fi
write_once "$RESULTS/blind_vqa.json" $PYTHON experiments/blind_vqa.py "$lm/hf" "$DATA"  # the LM's prior, no picture
for seed in ${SEEDS:-0 1 2}; do
  stage1=$OUT/stage1/seed$seed
  if [ ! -f "$RESULTS/stage1/seed$seed/eval.json" ]; then
    # shellcheck disable=SC2046
    $VLP train blip2_stage1 --init "$clip" --data "$DATA" --out "$stage1" --no-progress $(resume_flag "$stage1") \
      $STEPS_ARG train.seed=$seed
    $VLP eval "$stage1" --data "$DATA" --tasks zeroshot,retrieval,probe --k-test 16 --no-report
    keep "$stage1/eval.json" stage1 "$seed"
  fi
  stage2=$OUT/stage2/seed$seed
  if [ ! -f "$RESULTS/stage2/seed$seed/eval.json" ]; then
    # shellcheck disable=SC2046
    $VLP train blip2_stage2 --init "$stage1" --lm "$lm/hf" --data "$DATA" --out "$stage2" --no-progress \
      $(resume_flag "$stage2") $STEPS_ARG train.seed=$seed
    $VLP eval "$stage2" --data "$DATA" --no-report
    keep "$stage2/eval.json" stage2 "$seed"
  fi
done
