"""The embedded digits in memory, preprocessed as the input pipeline does (diagnosis scripts)."""

import numpy as np


def digits_for(config) -> tuple[np.ndarray, np.ndarray]:
    """The embedded digits as the input pipeline delivers them for `config`: (N, S, S, 1), (N,)."""
    from diffussm_jax.data import embedded_digits, preprocessing

    images, labels = embedded_digits.read_mnist_5k()
    if config.data.center_crop:
        images = np.stack(
            [preprocessing.adm_center_crop(x, config.data.center_crop) for x in images]
        )
    return preprocessing.to_model_range(images), labels.astype(np.int32)
