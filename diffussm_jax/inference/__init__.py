"""Inference on a trained run (a workdir written by `training.train`).

restore.py   the run's config, and the EMA weights of one checkpoint (a partial restore:
             no optimizer state is read)
export.py    `sample_to_npz`: N samples into an ADM-style .npz and a PNG grid
evaluate.py  `evaluate`: the FID protocol (resumable sample shards, ADM's .npz, the digits
             or Inception metrics) and its summary lines

from diffussm_jax import inference
inference.evaluate(workdir, num_samples=50_000, inception_path=..., reference_path=...)
"""

from diffussm_jax.inference.export import sample_to_npz
from diffussm_jax.inference.restore import load_config, restore_ema_params
from diffussm_jax.inference.score import evaluate, summary_lines

__all__ = ["evaluate", "load_config", "restore_ema_params", "sample_to_npz", "summary_lines"]
