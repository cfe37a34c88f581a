import os

# Tests run on the CPU in float32; 8 simulated devices let mesh tests run anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Compiled programs are shared between the many short runs of the suite (and its two xdist
# workers) through JAX's persistent cache; OPTUNE_TEST_JAX_CACHE="" turns it off.
_cache = os.environ.get("OPTUNE_TEST_JAX_CACHE", os.path.join(".pytest_cache", "jax"))
if _cache:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
