"""Unconditional LSUN Church / Bedroom 256x256 in the latent space of the KL-f8 VAE.

Prepare the data once (docs/latents.md: LSUN via tfds, the VAE from huggingface
stabilityai/sd-vae-ft-ema), then train:

    python -m launch.extract_latents --source=lsun/church_outdoor --data_dir=$TFDS_DIR \
        --vae=weights/sd-vae-ft-ema --resolution=256   # writes lsun_church_outdoor_latents_256
    python -m launch.train --config=configs/lsun.py:category=church_outdoor \
        --config.data.data_dir=$TFDS_DIR --workdir=$WORKDIR
    python -m launch.train --config=configs/lsun.py:category=bedroom ...   (lsun/bedroom)

`:smoke` shrinks the model as in every experiment (`base.apply_smoke`). The paper reports about
3.9 / 3.0 FID (church / bedroom). Not yet run: no time or result measured.
"""

from configs import base, imagenet256

CATEGORIES = ("church_outdoor", "bedroom")


def get_config(arg: str | None = None):
    args = base.parse_arg(
        arg, model="DiffuSSM-XL", category="church_outdoor", batch=256, smoke=False
    )
    if args.category not in CATEGORIES:
        raise ValueError(f"unknown LSUN category {args.category!r}; choose one of {CATEGORIES}.")
    config = base.get_base_config()
    config.model_name = args.model
    config.model.remat = "full"
    config.data.name = f"lsun_{args.category}_latents_256"
    config.data.image_key = "latent"
    config.data.label_key = None
    config.data.image_size = 32
    config.data.channels = 4
    config.data.num_classes = 0
    config.data.random_flip = False  # mirrors are stored as separate latents at extraction
    config.data.latent_scale = 0.18215
    config.vae.path = imagenet256.VAE_PATH
    config.global_batch_size = args.batch
    config.num_train_steps = 500_000
    config.sampling.cfg_scale = None
    config.sampling.num_unconditional = 16
    if args.smoke:
        base.apply_smoke(config)
    config.lock()
    return config
