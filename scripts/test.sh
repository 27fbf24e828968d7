#!/usr/bin/env bash
# Sets up .venv (pinned versions) and runs the whole test suite. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec .venv/bin/python -m pytest -n 2 -q "$@"
