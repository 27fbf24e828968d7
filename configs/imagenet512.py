"""Class-conditional ImageNet 512x512 in the latent space of Stable Diffusion's KL-f8 VAE.

64x64x4 latents (L = 4096); otherwise as configs/imagenet256.py. The paper saw 302M images.

    python -m launch.train --config=configs/imagenet512.py:model=DiffuSSM-XL --workdir=$WORKDIR

Needs the "imagenet2012_latents_512" latent dataset (latent extraction, not built yet). Not yet
run: no time or result measured.
"""

from configs import imagenet256


def get_config(arg: str | None = None):
    config = imagenet256.get_config(arg, resolution=512)
    with config.unlocked():
        config.num_train_steps = 1_180_000  # 302M images at batch 256
    return config
