"""Phase: sample responses of a policy to prompts with the run's `sampling.*` settings
(design §4)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from optune_jax import sharding
from optune_jax.components import Policy
from optune_jax.run import distributed
from optune_jax.run.compile_time import CompileClock
from optune_jax.run.schema import SamplingSection
from sampling import Generation, SamplingOptions, sample_prompts

# draws of π_θ itself, whatever `sampling.*` says: the KL estimators are unbiased only for these
# (design §5, §6)
EXACT = dict(temperature=1.0, top_p=1.0, top_k=0)


def is_exact(s) -> bool:
    """True when the `sampling` section's settings draw exactly from the policy."""
    return all(getattr(s, k) == v for k, v in EXACT.items())


@dataclasses.dataclass
class Generator:
    """`sample_prompts` on the run's mesh in the decode layout (`sharding.INFERENCE_RULES`),
    with a progress bar per call."""

    sampling: SamplingSection
    policy: Policy
    layout: sharding.Layout  # the training layout (params arrive in it); decoding has its own
    dtype: str  # model.dtype, the compute dtype
    prompt_len: int  # data.max_prompt_tokens
    progress: bool = True

    def __call__(
        self,
        params,
        prompts: Sequence[Sequence[int]],
        ids: np.ndarray,
        *,
        seed: int,
        iteration: int,
        num_samples: int,
        desc: str,
        prefix: tuple[int, ...],
        max_new: int | None = None,
        batch: int | None = None,
        **override,
    ) -> Generation:
        """`num_samples` responses [N, S, Y] to each prompt; `override` replaces
        SamplingOptions fields (e.g. greedy=True, top_p=1.0). `compile_seconds` counts the
        tracing and compiling the call did (the decode-layout move included)."""
        s = self.sampling
        opts = SamplingOptions(
            max_new_tokens=max_new or s.max_new_tokens,
            eos_ids=self.policy.eos_ids,
            pad_id=self.policy.pad_id,
            num_samples=num_samples,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
        )
        opts = dataclasses.replace(opts, **override)
        # the weights once per call in the decode layout, so no decode step gathers a layer
        decoding, dtype = self.layout.decoding(), self.dtype
        put = lambda x: distributed.put(x, sharding.batch_sharding(decoding, len(x)))
        with CompileClock() as clock:
            if len(prompts):
                to_decode = sharding.to_decode_layout(self.policy.config, self.layout, dtype)
                params = to_decode(params)
            with tqdm(
                total=len(prompts), desc=desc, unit="prompt", disable=not self.progress,
                leave=False,
            ) as bar, sharding.rules_context(decoding):
                gen = sample_prompts(
                    params,
                    prompts,
                    ids,
                    config=self.policy.config,
                    opts=opts,
                    seed=seed,
                    iteration=iteration,
                    batch_size=batch or s.batch_size,
                    max_prompt_len=self.prompt_len,
                    dtype=dtype,
                    shared_prefix=prefix,
                    pack=s.pack_prompts,
                    on_batch=bar.update,
                    device_put=put,
                    device_get=distributed.get,
                )
        return dataclasses.replace(gen, compile_seconds=clock.seconds)
