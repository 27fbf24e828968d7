"""DiffuSSM: diffusion models without attention, in JAX/Flax."""

__version__ = "0.1.0"
