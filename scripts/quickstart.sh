#!/usr/bin/env bash
# The main job on a fresh machine with only Python: set up .venv (pinned versions), train the
# quickstart DiffuSSM on the embedded MNIST digits (CPU), then sample from the EMA weights.
# Usage: bash scripts/quickstart.sh [WORKDIR] [extra launch.train flags, e.g. --config.num_train_steps=500]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
workdir="${1:-runs/quickstart}"
shift || true
.venv/bin/python -m launch.train --config=configs/quickstart.py --workdir="$workdir" "$@"
.venv/bin/python -m launch.sample --workdir="$workdir" --num_samples=100 \
  --labels=0,1,2,3,4,5,6,7,8,9 --output="$workdir/samples/final.npz"
echo
echo "Run folder:   $workdir"
echo "Checkpoints:  $workdir/checkpoints"
echo "Metrics:      $workdir/metrics.jsonl  (TensorBoard: $workdir/tb)"
echo "Sample grids: $workdir/samples/  (final: $workdir/samples/final.png)"
