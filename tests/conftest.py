"""Test setup: 8 fake CPU devices (for sharding tests) before jax initialises."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# Each test process (pytest-xdist worker) builds the embedded digits once into its own directory,
# so parallel workers never race on one tfds build and nothing touches ~/tensorflow_datasets.
if "DIFFUSSM_TEST_DATA_DIR" not in os.environ:
    os.environ["DIFFUSSM_TEST_DATA_DIR"] = tempfile.mkdtemp(prefix="diffussm_tfds_")

# Many tests (and the launcher subprocesses) compile the same tiny train step: share the
# compiled executables through JAX's persistent cache for the session.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "diffussm_jax_test_cache")
)
