"""Jitted batched generation from the policy: `generate` on device, `sample_prompts` on host."""

from sampling.batching import (
    Generation,
    common_prefix,
    kv_cache_bytes,
    length_buckets,
    sample_prompts,
)
from sampling.sampler import Samples, SamplingOptions, generate, row_keys
from sampling.truncation import sampling_logprobs

__all__ = [
    "Generation",
    "Samples",
    "SamplingOptions",
    "common_prefix",
    "generate",
    "kv_cache_bytes",
    "length_buckets",
    "row_keys",
    "sample_prompts",
    "sampling_logprobs",
]
