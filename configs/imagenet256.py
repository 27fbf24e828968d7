"""Class-conditional ImageNet 256x256 in the latent space of Stable Diffusion's KL-f8 VAE.

The paper's setting (spec section 5): 32x32x4 latents scaled by 0.18215, global batch 256,
AdamW lr 1e-4, EMA 0.9999, bf16, 8x A100 80GB in the paper. Prepare the data once
(docs/latents.md: ImageNet via tfds, the VAE from huggingface stabilityai/sd-vae-ft-ema):

    python -m launch.extract_latents --source=imagenet2012 --data_dir=$TFDS_DIR \
        --vae=weights/sd-vae-ft-ema --resolution=256       # writes imagenet2012_latents_256
    python -m launch.train --config=configs/imagenet256.py:model=DiffuSSM-XL \
        --config.data.data_dir=$TFDS_DIR --workdir=$WORKDIR
    python -m launch.train --config=configs/imagenet256.py:model=DiT-XL/2 ... (the baseline)

The dataset "imagenet2012_latents_256" holds `latent` (32, 32, 4) float32 unscaled VAE posterior
means of each center-cropped image and of its mirror (two records per image, so
`data.random_flip` stays False) and `label`. `vae.path` (default weights/sd-vae-ft-ema,
relative to the working directory) decodes the sample grids.

`:smoke` is a tiny model (`base.apply_smoke`: width 32, depth 2, float32, batch 8, 20 steps)
for checking the pipeline on a few extracted images (e.g. `launch.extract_latents ...
--max_images=64`). Single model fields are set with `--config.model.FIELD=VALUE`, e.g.
`--config.model.ssm.backend=chunked` (configs/base.py, `model_block`).
Not yet run at full size: no time or result measured.
"""

from configs import base

VAE_PATH = "weights/sd-vae-ft-ema"


def get_config(arg: str | None = None, resolution: int = 256, num_train_steps: int = 2_600_000):
    """num_train_steps default: 660M images at batch 256 (the paper's 256px budget)."""
    args = base.parse_arg(arg, model="DiffuSSM-XL", batch=256, smoke=False)
    config = base.get_base_config()
    config.model_name = args.model
    config.precision.compute = "bfloat16"
    config.model.remat = "full"
    config.data.name = f"imagenet2012_latents_{resolution}"
    config.data.image_key = "latent"
    config.data.image_size = resolution // 8
    config.data.channels = 4
    config.data.num_classes = 1000
    config.data.random_flip = False  # mirrors are stored as separate latents at extraction
    config.data.latent_scale = 0.18215
    config.vae.path = VAE_PATH
    config.global_batch_size = args.batch
    config.num_train_steps = num_train_steps
    config.log_every_steps = 100
    config.checkpoint_every_steps = 5_000
    config.sample_every_steps = 20_000
    config.sampling.sampler = "ddpm"
    config.sampling.steps = 250
    config.sampling.cfg_scale = 1.5
    if args.smoke:
        base.apply_smoke(config)
    config.lock()
    return config
