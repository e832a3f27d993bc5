#!/usr/bin/env bash
# VLMo and BEiT-3 at tiny scale, 3 seeds (the VLMo/BEiT-3 issue's comparisons):
#   vlmo_scratch    VLMo (ITC + ITM + MLM) on image-text pairs only, STEPS steps;
#   vlmo_stagewise  stage 1 masked image modeling on images, stage 2 text MLM with attention and
#                   V-FFN frozen (their configs' steps), then the same STEPS image-text steps;
#   beit3           BEiT-3's one masked-data-modeling objective for the FLOPs of STEPS VLMo steps
#                   (experiments/equal_compute.py), then `beit3_retrieval` (ITC on the V and L
#                   paths, its config's steps: extra compute in BEiT-3's favour, said in results);
#   vlmo_itc        vlmo_scratch followed by the same ITC fine-tuning (`beit3_retrieval` from the
#                   VLMo run), so that BEiT-3 and VLMo are compared with the extra step on both sides.
# Evaluation: zero-shot, retrieval with the dual encoder (ITC) and re-ranked by fusion-mode ITM
# over the top 16 (each eval.json has both recalls and both timings), swap probe. Runs go to
# runs/vlmo_beit3/<variant>/seed<k>/; eval.json files to experiments/results/vlmo_beit3/.
# Usage: bash experiments/vlmo_beit3.sh [DATA] [STEPS]   (defaults: data/shapes 300; OUT, RESULTS,
# SEEDS="0 1 2" and VARIANTS="vlmo_scratch vlmo_stagewise beit3 vlmo_itc" can be set in the
# environment, e.g. for a smoke run or to share the work between two instances)
set -euo pipefail
DATA=${1:-data/shapes}
STEPS=${2:-300}
source "$(dirname "$0")/common.sh"  # VLP, PYTHON, resume_flag, write_once, keep
OUT=${OUT:-runs/vlmo_beit3}
RESULTS=${RESULTS:-experiments/results/vlmo_beit3}
TOKENIZER=$DATA/image_tokenizer.safetensors
train() {  # RECIPE RUN [ARGS...]: train (or finish) a run
  local recipe=$1 run=$2
  shift 2
  # shellcheck disable=SC2046
  $VLP train "$recipe" --data "$DATA" --out "$run" --no-progress $(resume_flag "$run") "$@" \
    model.image_tokenizer="$TOKENIZER"
}
wanted() {  # VARIANT SEED: VARIANT is selected and SEED's result of it is not kept yet
  [[ " ${VARIANTS:-vlmo_scratch vlmo_stagewise beit3 vlmo_itc} " == *" $1 "* ]] &&
    [ ! -f "$RESULTS/$1/seed$2/eval.json" ]
}
train_vlmo() {  # RUN SEED [OPTIONS...]: the image-text VLMo stage (ITC + ITM + MLM), STEPS steps
  local run=$1 seed=$2
  shift 2
  train vlmo "$run" "$@" --steps "$STEPS" "model.objectives=[itc,itm,mlm]" train.seed="$seed" train.ckpt_every="$STEPS"
}
evaluate() {  # RUN VARIANT SEED: evaluate RUN and keep its eval.json
  $VLP eval "$1" --data "$DATA" --tasks zeroshot,retrieval,probe --k-test 16 --no-report
  keep "$1/eval.json" "$2" "$3"
}
[ -f "$TOKENIZER" ] || $VLP tokenizer image "$DATA" --out "$TOKENIZER"
mkdir -p "$RESULTS"
write_once "$RESULTS/beit3_steps.txt" $PYTHON experiments/equal_compute.py --data "$DATA" --budget "vlmo:$STEPS" \
  --set "model.image_tokenizer=$TOKENIZER" beit3
beit3_steps=$(awk '{print $2}' "$RESULTS/beit3_steps.txt")
for seed in ${SEEDS:-0 1 2}; do
  scratch=$OUT/vlmo_scratch/seed$seed
  if wanted vlmo_scratch "$seed"; then
    train_vlmo "$scratch" "$seed"
    evaluate "$scratch" vlmo_scratch "$seed"
  fi
  run=$OUT/vlmo_stagewise/seed$seed
  if wanted vlmo_stagewise "$seed"; then
    train vlmo_stage1 "$run-stage1" train.seed="$seed"
    train vlmo_stage2 "$run-stage2" --init "$run-stage1" train.seed="$seed"
    train_vlmo "$run" "$seed" --init "$run-stage2"
    evaluate "$run" vlmo_stagewise "$seed"
  fi
  run=$OUT/beit3/seed$seed
  if wanted beit3 "$seed"; then
    train beit3 "$run-pretrain" --steps "$beit3_steps" train.seed="$seed" train.ckpt_every="$beit3_steps"
    train beit3_retrieval "$run" --init "$run-pretrain" train.seed="$seed"
    evaluate "$run" beit3 "$seed"
  fi
  run=$OUT/vlmo_itc/seed$seed
  if wanted vlmo_itc "$seed"; then
    train_vlmo "$scratch" "$seed"  # returns at once where vlmo_scratch's run is here
    train beit3_retrieval "$run" --init "$scratch" train.seed="$seed"
    evaluate "$run" vlmo_itc "$seed"
  fi
done
