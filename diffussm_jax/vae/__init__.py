"""The frozen VAE of latent diffusion: Stable Diffusion's AutoencoderKL in Flax, diffusers weights.

    model, params = vae.load("weights/sd-vae-ft-ema")           # config.json + .safetensors
    mean, logvar = model.apply({"params": params}, images, method=model.encode)
    images = model.apply({"params": params}, mean, method=model.decode)

    autoencoder.py  the AutoencoderKL network (encoder, decoder, diagonal Gaussian posterior)
    weights.py      diffusers' config.json + safetensors <-> Flax parameters
    codec.py        the latent codec: jitted batch encoding, and the decoder that turns a latent
                    model's (scaled) samples into images

See docs/latents.md for the weights and the latent datasets.
"""

from diffussm_jax.vae.autoencoder import (
    SD_KL_F8,
    AutoencoderKL,
    VAEConfig,
    init_params,
    param_shapes,
    sample_posterior,
)
from diffussm_jax.vae.codec import LatentDecoder, make_encode_fn
from diffussm_jax.vae.weights import (
    VAEWeightsError,
    VAEWeightsNotFoundError,
    config_from_diffusers,
    convert_state_dict,
    flax_to_state_dict,
    key_map,
    load,
    read_safetensors,
    save,
)

__all__ = [
    "SD_KL_F8",
    "AutoencoderKL",
    "LatentDecoder",
    "VAEConfig",
    "VAEWeightsError",
    "VAEWeightsNotFoundError",
    "config_from_diffusers",
    "convert_state_dict",
    "flax_to_state_dict",
    "init_params",
    "key_map",
    "load",
    "make_encode_fn",
    "param_shapes",
    "read_safetensors",
    "sample_posterior",
    "save",
]
