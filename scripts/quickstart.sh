#!/usr/bin/env bash
# The main job on a fresh machine with only Python: set up .venv (pinned versions), train the
# quickstart DiffuSSM on the embedded MNIST digits (CPU), then draw 200 class-conditional samples
# from the EMA weights and score them with the digits classifier.
# The console: one line for the install, the run's config in five lines, a progress line every
# 30 s (a bar on a terminal), where everything is, and the samples' scores. Plots of the run are
# in <workdir>/plots/training.png.
# Usage: bash scripts/quickstart.sh [WORKDIR] [extra launch.train flags, e.g. --config.num_train_steps=500]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
workdir="${1:-runs/quickstart}"
shift || true
.venv/bin/python -m launch.train --config=configs/quickstart.py --workdir="$workdir" "$@"
mkdir -p "$workdir/samples"
# The summary goes to the console; the scores as JSON (stdout) to samples/evaluation.json.
.venv/bin/python -m launch.evaluate --workdir="$workdir" --num_samples=200 --labels=balanced \
  --output_dir="$workdir/samples" > "$workdir/samples/evaluation.json"
