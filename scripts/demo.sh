#!/usr/bin/env bash
# Installs nnunet-semi into .venv and runs the demo (about 10 minutes on 2 CPU cores).
set -euo pipefail
. "$(dirname "$0")/setup_venv.sh"
nnUNetv2_semi_demo --out "${1:-demo_output}"
