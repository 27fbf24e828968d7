#!/usr/bin/env bash
# The main job on a fresh machine with only Python: set up .venv (pinned versions), train the
# quickstart DiffuSSM on the embedded MNIST digits (CPU), then draw 200 class-conditional samples
# from the EMA weights and score them with the digits classifier.
# Usage: bash scripts/quickstart.sh [WORKDIR] [extra launch.train flags, e.g. --config.num_train_steps=500]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
workdir="${1:-runs/quickstart}"
shift || true
.venv/bin/python -m launch.train --config=configs/quickstart.py --workdir="$workdir" "$@"
.venv/bin/python -m launch.evaluate --workdir="$workdir" --num_samples=200 --labels=balanced \
  --output_dir="$workdir/samples" > "$workdir/samples/evaluation.json"
.venv/bin/python - "$workdir/samples/evaluation.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
print()
print(f"Samples:      {result['samples']}  (grid: {result['grid']}, column k = digit k)")
print(f"Accuracy:     {result['accuracy']:.1%} of {result['num_samples']} samples classified as "
      f"the requested digit (real digits at this size: {result['held_out_accuracy']:.1%})")
print(f"Frechet:      {result['frechet_distance']:.1f} (real digits at this size: "
      f"{result['held_out_frechet_distance']:.1f})")
PY
echo "Run folder:   $workdir"
echo "Checkpoints:  $workdir/checkpoints"
echo "Metrics:      $workdir/metrics.jsonl  (TensorBoard: $workdir/tb)"
echo "Sample grids: $workdir/samples/step_*.png (one row per digit, during training)"
