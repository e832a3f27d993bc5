# Sourced by the experiment scripts: the commands they run, resuming runs and keeping results.
# A script sets RESULTS before calling `keep`.
VLP=${VLP:-.venv/bin/vlp}
PYTHON=${PYTHON:-.venv/bin/python}

resume_flag() {  # RUN: --resume where RUN has a checkpoint (a finished run then returns at once)
  [ -e "$1/checkpoints/latest" ] && echo --resume || true
}

keep() {  # FILE WHAT SEED: copy FILE to $RESULTS/WHAT/seedSEED/, where the script looks for finished work
  mkdir -p "$RESULTS/$2/seed$3"
  cp "$1" "$RESULTS/$2/seed$3/"
}
