#!/usr/bin/env bash
# BLIP at tiny scale, 3 seeds: pretrain, then captioning with greedy / beam (3) / nucleus (0.9)
# decoding (BLEU-4, CIDEr, METEOR, diversity), ITM re-ranking against ITC-only retrieval, and
# VQA accuracy per question type after `blip_vqa` fine-tuning. Runs go to runs/blip_exp/;
# each eval.json is copied to experiments/results/blip/<what>/seed<k>/ (a result there is skipped).
# Usage: bash experiments/blip.sh [DATA] [STEPS]   (defaults: data/shapes 300)
set -euo pipefail
DATA=${1:-data/shapes}
STEPS=${2:-300}
source "$(dirname "$0")/common.sh"  # VLP, PYTHON, resume_flag, write_once, keep
OUT=runs/blip_exp
RESULTS=experiments/results/blip
for seed in 0 1 2; do
  run=$OUT/blip/seed$seed
  if [ ! -f "$RESULTS/nucleus/seed$seed/eval.json" ]; then
    # shellcheck disable=SC2046
    $VLP train blip --data "$DATA" --out "$run" --steps "$STEPS" --no-progress $(resume_flag "$run") \
      train.seed=$seed train.ckpt_every=$STEPS
    $VLP eval "$run" --data "$DATA" --tasks retrieval,probe,caption --decoding beam --k-test 16 --no-report
    keep "$run/eval.json" beam "$seed"
    $VLP eval "$run" --data "$DATA" --tasks caption --decoding greedy --no-report
    keep "$run/eval.json" greedy "$seed"
    $VLP eval "$run" --data "$DATA" --tasks caption --decoding nucleus --no-report
    keep "$run/eval.json" nucleus "$seed"
  fi
  vqa=$OUT/blip_vqa/seed$seed
  if [ ! -f "$RESULTS/vqa/seed$seed/eval.json" ]; then
    $VLP train blip_vqa --init "$run" --data "$DATA" --out "$vqa" --no-progress train.seed=$seed
    $VLP eval "$vqa" --data "$DATA" --no-report
    keep "$vqa/eval.json" vqa "$seed"
  fi
done
