"""Class-conditional ImageNet 256x256 in the latent space of Stable Diffusion's KL-f8 VAE.

The paper's setting (spec section 5): 32x32x4 latents scaled by 0.18215, global batch 256,
AdamW lr 1e-4, EMA 0.9999, bf16, 8x A100 80GB in the paper.

    python -m launch.train --config=configs/imagenet256.py:model=DiffuSSM-XL --workdir=$WORKDIR
    python -m launch.train --config=configs/imagenet256.py:model=DiT-XL/2 --workdir=$WORKDIR

The latent dataset ("imagenet2012_latents_256": fields `latent` (32, 32, 4) float32 unscaled VAE
means and `label`) is written by the latent-extraction launcher, which is not built yet: until
then this config fails with an error that names the missing dataset. Not yet run: no time or
result measured.
"""

from configs import base


def get_config(arg: str | None = None, resolution: int = 256):
    args = base.parse_arg(arg, model="DiffuSSM-XL", batch=256)
    config = base.get_base_config()
    config.model = args.model
    config.dtype = "bfloat16"
    config.remat = True
    config.data.name = f"imagenet2012_latents_{resolution}"
    config.data.image_key = "latent"
    config.data.image_size = resolution // 8
    config.data.channels = 4
    config.data.num_classes = 1000
    config.data.random_flip = False  # flips are stored as separate latents at extraction
    config.data.latent_scale = 0.18215
    config.global_batch_size = args.batch
    config.num_train_steps = 2_600_000  # 660M images at batch 256 (the paper's 256px budget)
    config.log_every_steps = 100
    config.checkpoint_every_steps = 5_000
    config.sample_every_steps = 20_000
    config.sampling.sampler = "ddpm"
    config.sampling.steps = 250
    config.sampling.cfg_scale = 1.5
    config.lock()
    return config
