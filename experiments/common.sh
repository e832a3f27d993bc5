# Sourced by the experiment scripts: the commands they run, resuming runs, writing a file once and
# keeping results.
# A script sets RESULTS before calling `keep`.
VLP=${VLP:-.venv/bin/vlp}
PYTHON=${PYTHON:-.venv/bin/python}

resume_flag() {  # RUN: --resume where RUN has a checkpoint (a finished run then returns at once)
  [ -e "$1/checkpoints/latest" ] && echo --resume || true
}

write_once() {  # FILE COMMAND...: COMMAND's output into FILE unless FILE holds it already; written
  # whole or not at all (an interrupted COMMAND leaves no FILE, so the next run tries again)
  local file=$1
  shift
  [ -s "$file" ] || { "$@" > "$file.tmp" && mv "$file.tmp" "$file"; }
}

keep() {  # FILE WHAT SEED: copy FILE to $RESULTS/WHAT/seedSEED/, where the script looks for finished work
  mkdir -p "$RESULTS/$2/seed$3"
  cp "$1" "$RESULTS/$2/seed$3/"
}
