#!/usr/bin/env bash
# CapFilt on the shapes world with 40 % caption noise, 3 seeds (the CapFilt issue's experiment,
# BLIP's Table 1 ablation at tiny scale): BLIP pretrained on the noisy set ("noisy"), then CapFilt
# from that run in five variants, each followed by a new BLIP pretrained on the bootstrapped set:
#   filter        web captions filtered by ITM (threshold 0.5), no synthetic ones;
#   captioner     one nucleus-sampled synthetic caption added per image, nothing filtered;
#   both_nucleus  both (the paper's CapFilt);
#   both_beam     both, the synthetic caption by beam search (the paper: nucleus is better);
#   filter_0.3    the filter alone at threshold 0.3 (the filter's ITM scores are compressed below
#                 0.75, so 0.5 removes more than half of the captions; 0.3 keeps more of the true).
# Every model is evaluated on the source's test splits (zero-shot, ITC retrieval, probe, beam
# captioning). The captioner and filter are fine-tuned once per seed and shared by the variants.
# Runs go to runs/capfilt/; bootstrapped sets to runs/capfilt/data/; each eval.json and
# capfilt.json to experiments/results/capfilt/<variant>/seed<k>/ (a result there is skipped).
# Usage: bash experiments/capfilt.sh [DATA] [STEPS]   (defaults: data/noisy 300; a missing DATA is
# generated with TRAIN=10000 training images; OUT, RESULTS, SEEDS="0 1 2", ONLY (the variants to
# run, default all) and CAPFILT_ARGS, extra options of every `vlp capfilt` such as "--steps 100",
# can be set in the environment)
set -euo pipefail
DATA=${1:-data/noisy}
STEPS=${2:-300}
source "$(dirname "$0")/common.sh"  # VLP, PYTHON, resume_flag, write_once, keep
OUT=${OUT:-runs/capfilt}
RESULTS=${RESULTS:-experiments/results/capfilt}
declare -A VARIANTS=(
  [both_beam]="--synthetic 1 --method beam --threshold 0.5"
  [both_nucleus]="--synthetic 1 --method nucleus --threshold 0.5"
  [captioner]="--synthetic 1 --method nucleus --threshold 0"
  [filter]="--synthetic 0 --threshold 0.5"
  [filter_0.3]="--synthetic 0 --threshold 0.3"
)
pretrain() {  # DATA RUN SEED: BLIP pretraining (finishes an interrupted run; a finished one returns at once)
  # shellcheck disable=SC2046
  $VLP train blip --data "$1" --out "$2" --steps "$STEPS" --no-progress $(resume_flag "$2") train.seed="$3" \
    train.ckpt_every="$STEPS"
}
evaluate() {  # RUN WHAT SEED: evaluate RUN on the source's test splits and keep its eval.json
  $VLP eval "$1" --data "$DATA" --tasks zeroshot,retrieval,probe,caption --k-test 0 --no-report
  keep "$1/eval.json" "$2" "$3"
}
[ -f "$DATA/info.json" ] || $VLP data shapes --out "$DATA" --train "${TRAIN:-10000}" --noise 0.4
for seed in ${SEEDS:-0 1 2}; do
  missing=0
  for what in noisy "${!VARIANTS[@]}"; do [ -f "$RESULTS/$what/seed$seed/eval.json" ] || missing=1; done
  [ "$missing" = 1 ] || continue
  noisy=$OUT/noisy/seed$seed
  pretrain "$DATA" "$noisy" "$seed"  # retrained where an earlier session kept only its eval.json
  [ -f "$RESULTS/noisy/seed$seed/eval.json" ] || evaluate "$noisy" noisy "$seed"
  shared=""  # the out dir of the seed's first CapFilt: its fine-tuned captioner and filter
  for variant in $(printf '%s\n' "${!VARIANTS[@]}" | sort); do
    boot=$OUT/data/$variant/seed$seed
    run=$OUT/$variant/seed$seed
    if [ -f "$RESULTS/$variant/seed$seed/eval.json" ]; then
      [ -d "$boot/captioner" ] && shared=${shared:-$boot}  # an earlier session's runs may be gone
      continue
    fi
    [[ " ${ONLY:-${!VARIANTS[*]}} " == *" $variant "* ]] || continue
    if [ -n "$shared" ] && [ ! -d "$boot/captioner" ]; then
      mkdir -p "$boot" && cp -r "$shared/captioner" "$shared/filter" "$boot/"
    fi
    # shellcheck disable=SC2086
    $VLP capfilt --init "$noisy" --data "$DATA" --clean "$DATA" --out "$boot" --seed "$seed" --no-progress \
      ${VARIANTS[$variant]} ${CAPFILT_ARGS:-}
    shared=${shared:-$boot}
    pretrain "$boot" "$run" "$seed"
    keep "$boot/capfilt.json" "$variant" "$seed"
    evaluate "$run" "$variant" "$seed"
  done
done
