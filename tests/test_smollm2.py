"""The real SmolLM2-135M-Instruct weights: our GGUF loader + model + sampler vs transformers."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models import forward, load_tokenizer
from sampling import SamplingOptions, common_prefix, sample_prompts

CHATS = [
    "What is the capital of France?",
    "Give me two tips for sleeping better.",
    "Write one sentence about the sea, all in lowercase.",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_ours, smollm2_transformers):
    _, config, params = smollm2_ours
    hf = smollm2_transformers
    tok = load_tokenizer("smollm2")
    prompts = [
        list(
            tok.apply_chat_template(
                [{"role": "user", "content": c}], add_generation_prompt=True, tokenize=True
            )["input_ids"]
        )
        for c in CHATS
    ]
    return config, params, hf, prompts


def test_logits_match_transformers_on_left_padded_chat_prompts(smollm2):
    config, params, hf, prompts = smollm2
    t = max(map(len, prompts))
    tokens = np.full((len(prompts), t), 2, np.int64)
    mask = np.zeros_like(tokens)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p) :], mask[i, t - len(p) :] = p, 1
    with torch.no_grad():
        want = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(mask), config=config))
    diff = np.abs(want - got) * mask[..., None]
    # 30 float32 layers, logits up to ~40: transformers differs from ITSELF by 7e-5 between a
    # padded and an unpadded run of these prompts, so the bound is 2e-4 (5e-6 relative)
    assert diff.max() < 2e-4, diff.max()
    assert diff.max() / np.abs(want).max() < 5e-6


@pytest.fixture(scope="module")
def transformers_greedy(smollm2):
    """transformers' greedy answers (24 new tokens) to each prompt, alone, without padding."""
    _, _, hf, prompts = smollm2
    answers = []
    for p in prompts:
        with torch.no_grad():
            answers.append(
                hf.generate(
                    torch.tensor([p]),
                    attention_mask=torch.ones(1, len(p), dtype=torch.long),
                    do_sample=False,
                    max_new_tokens=24,
                    eos_token_id=2,
                    pad_token_id=2,
                )[0, len(p) :].numpy()
            )
    return answers


@pytest.mark.parametrize("share_prefix", [False, True])
def test_greedy_decoding_reproduces_transformers_generate(
    smollm2, transformers_greedy, share_prefix
):
    config, params, hf, prompts = smollm2
    opts = SamplingOptions(max_new_tokens=24, eos_ids=(2,), pad_id=2, num_samples=1, greedy=True)
    prefix = common_prefix(prompts) if share_prefix else ()
    assert len(prefix) > 20 or not share_prefix  # the chat template's system turn
    ours = sample_prompts(
        params,
        prompts,
        list(range(len(prompts))),
        config=config,
        opts=opts,
        seed=0,
        iteration=0,
        batch_size=4,
        max_prompt_len=64,
        shared_prefix=prefix,
    )
    for i, want in enumerate(transformers_greedy):
        n = ours.lengths[i, 0]
        assert n == len(want)
        np.testing.assert_array_equal(ours.tokens[i, 0, :n], want)
