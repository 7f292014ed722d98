# Sourced by the other scripts: creates .venv (if missing), activates it and installs nnunet-semi with nnU-Net.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q -e .
