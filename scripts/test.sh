#!/usr/bin/env bash
# Sets up .venv (pinned versions, plus the `reference` extra: PyTorch, diffusers and pytorch-fid for
# the checks of our ports against them) and runs the whole test suite.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
pip_install -e ".[test,reference]" -c requirements/constraints.txt
exec .venv/bin/python -m pytest -n 2 -q "$@"
