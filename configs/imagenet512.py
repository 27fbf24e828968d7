"""Class-conditional ImageNet 512x512 in the latent space of Stable Diffusion's KL-f8 VAE.

64x64x4 latents (L = 4096); otherwise as configs/imagenet256.py. The paper saw 302M images.

    python -m launch.extract_latents --source=imagenet2012 --data_dir=$TFDS_DIR \
        --vae=weights/sd-vae-ft-ema --resolution=512       # writes imagenet2012_latents_512
    python -m launch.train --config=configs/imagenet512.py:model=DiffuSSM-XL \
        --config.data.data_dir=$TFDS_DIR --workdir=$WORKDIR

Not yet run: no time or result measured.
"""

from configs import imagenet256


def get_config(arg: str | None = None):
    # 302M images at batch 256.
    return imagenet256.get_config(arg, resolution=512, num_train_steps=1_180_000)
