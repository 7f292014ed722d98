#!/usr/bin/env bash
# Creates .venv (if missing), installs nnunet-semi with nnU-Net, and sets up the generated example dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q -e .
nnUNetv2_semi_example --out "${1:-demo_output}"
