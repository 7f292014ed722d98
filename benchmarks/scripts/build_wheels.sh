#!/usr/bin/env bash
# On a machine with a package index, from an environment with the project installed (pip install -e .):
# a folder of wheels for every dependency a GPU machine with torch preinstalled lacks, for Python 3.12 and this one.
#   benchmarks/scripts/build_wheels.sh [WHEEL_DIR (default .whl)] [--python 3.12 3.11] [--include NAME ...]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
wheels="${1:-$root/.whl}"
[ $# -gt 0 ] && shift
exec python3 "$root/benchmarks/semi_lab/offline.py" build "$wheels" "$@"
