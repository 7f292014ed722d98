#!/usr/bin/env bash
# One benchmark cell in one command, on a machine with torch and no package index:
#   benchmarks/scripts/run_cell.sh CELL OUT_DIR [--deadline SECONDS] [--data DATASET_FOLDER] [--work DIR] [--wheels DIR]
# installs the wheel folder (.whl, from benchmarks/scripts/build_wheels.sh) where packages are missing, copies and preprocesses
# the dataset (data/Dataset101_LA by default), trains the cell's runs side by side, predicts, scores, packs the test
# predictions and copies the results into OUT_DIR after every finished run, stopping before the deadline (GPU cells:
# 540 s from this script's start). `python -m semi_lab cell --list` (PYTHONPATH=benchmarks) prints the cells.
set -euo pipefail
started=$(date +%s)
root="$(cd "$(dirname "$0")/../.." && pwd)"
if [ $# -lt 2 ]; then
  echo "usage: benchmarks/scripts/run_cell.sh CELL OUT_DIR [--deadline SECONDS] [--data DIR] [--work DIR] [--wheels DIR]" >&2
  exit 2
fi
cell=$1 out=$2
shift 2
wheels="$root/.whl" args=()
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) wheels=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
site="${NNUNET_SEMI_SITE:-${TMPDIR:-/tmp}/nnunet_semi_site}"
if [ -d "$wheels" ]; then
  python3 "$root/benchmarks/semi_lab/offline.py" install "$wheels" "$site"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
fi
# the checkout's own code (the library and the lab), not an installed copy of another commit
export PYTHONPATH="$root:$root/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 -m semi_lab cell "$cell" -o "$out" --started "$started" "${args[@]}"
