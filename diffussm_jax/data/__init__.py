"""Input pipeline: tfds array_record datasets (embedded MNIST digits by default) read by grain.

Modules:

    input_pipeline.py   grain loaders: per-process, and the topology-independent global stream
    preprocessing.py    ADM's center crop, uint8 -> [-1, 1]
    embedded_digits.py  the default dataset: 5000 MNIST digits shipped in a wheel, as tfds
    latents.py          latent datasets: images -> VAE latents (`vae.codec`) -> array_record
    synthetic.py        generated data for tests and diagnosis (the two-halves task)
"""

from diffussm_jax.data.embedded_digits import (
    CLASSIFIER_TEST_SPLIT,
    CLASSIFIER_TRAIN_SPLIT,
    EmbeddedDigits,
    default_data_dir,
    prepare_embedded_digits,
)
from diffussm_jax.data.input_pipeline import (
    CorruptRecordError,
    DatasetNotPreparedError,
    GlobalOrderSampler,
    create_global_loader,
    create_loader,
    create_loader_from_source,
    make_global_batch,
    open_data_source,
    per_process_batch_size,
    process_rows,
)
from diffussm_jax.data.preprocessing import adm_center_crop, to_model_range

__all__ = [
    "CLASSIFIER_TEST_SPLIT",
    "CLASSIFIER_TRAIN_SPLIT",
    "CorruptRecordError",
    "DatasetNotPreparedError",
    "EmbeddedDigits",
    "GlobalOrderSampler",
    "adm_center_crop",
    "create_global_loader",
    "create_loader",
    "create_loader_from_source",
    "default_data_dir",
    "make_global_batch",
    "open_data_source",
    "per_process_batch_size",
    "prepare_embedded_digits",
    "process_rows",
    "to_model_range",
]
