#!/usr/bin/env bash
# DiffuSSM-XL vs DiT-XL/2 train-step throughput and MFU on ONE accelerator: bf16 compute (fp32
# parameters, Adam, MSE loss), 256 px (latent 32x32x4) and 512 px (64x64x4), DiffuSSM with the
# fft and the chunked SSM backends. For each model and resolution the largest per-device batch
# of BATCH_SIZES that fits is used: one compile at the smallest batch predicts the memory of the
# others (compiled memory_analysis), the chosen one is compiled, checked, and timed.
# Prints the table of runs and, below it, each DiffuSSM-XL row's dense FLOP/s and images/s as a
# fraction of DiT-XL/2's at the same resolution (with DiT's fraction of the nominal bf16 peak);
# writes $OUT_DIR/throughput.{md,csv,png}.
#
# Status: its 256 px part ran on one H100 (115 s for 3 configurations at batches 32,16; numbers in
# docs/benchmarks/README.md, "On one H100"); the full command has not run yet. DiffuSSM-XL needs
# 79 GiB at batch 32 without remat, so expect batch 16 at 256 px on an 80 GB card.
#
#   bash scripts/gpu_bench.sh           # on the accelerator machine, from any directory
#   bash scripts/gpu_bench.sh --tiny    # the same code path at toy sizes on CPU (tests use it)
#   OUT_DIR=/tmp/x PYTHON=python3 bash scripts/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then
  :
elif [[ -x .venv/bin/python ]]; then
  PYTHON=.venv/bin/python
else
  PYTHON=python3
fi
OUT_DIR=${OUT_DIR:-docs/benchmarks/gpu}

# --nointerleave: one configuration at a time, so that only one XL train state is in memory.
common=(--mode=throughput --precision=bfloat16 --scan_layers --train_only --nointerleave
        --backends=fft,chunked --repeats=3 --time_budget_s=20 --out_dir="$OUT_DIR")
if [[ "${1:-}" == "--tiny" ]]; then
  # Generic families at width 32, depth 1 (the XL models are far too big for a CPU), chunked
  # backend only (the fft one runs the same way) to keep the smoke test short.
  run=(--models=DiffuSSM,DiT/2 --backends=chunked --width=32 --depth=1 --input_sizes=8
       --batch_sizes=4,2 --repeats=1 --matmul_size=256)
else
  if [[ "$("$PYTHON" -c 'import jax; print(jax.default_backend())')" == "cpu" ]]; then
    echo "gpu_bench.sh: jax sees no accelerator; use --tiny for the CPU smoke test." >&2
    exit 1
  fi
  run=(--models=DiffuSSM-XL,DiT-XL/2 --input_sizes=32,64
       --batch_sizes=256,192,128,96,64,48,32,24,16,8)
fi

start=$(date +%s)
"$PYTHON" -m launch.benchmark "${common[@]}" "${run[@]}"
echo "gpu_bench.sh: done in $(( $(date +%s) - start )) s"
