#!/usr/bin/env bash
# Installs nnunet-semi into .venv and sets up the generated example dataset (no training).
set -euo pipefail
. "$(dirname "$0")/setup_venv.sh"
nnUNetv2_semi_example --out "${1:-demo_output}"
