"""The dry run: the paper's 7B setting compiles on 8 simulated devices and fits 80 GB."""

import jax
import pytest

from optune_jax import dryrun, sharding
from optune_jax.components import build_layout
from optune_jax.run.config_file import load_config

pytestmark = pytest.mark.optimized  # the memory of the programs a real run compiles

GIB = 2**30


def test_the_7b_paper_setting_fits_8_devices_of_80gb_with_room_to_spare():
    cfg = load_config("configs/zephyr_7b_optune.yaml")
    config = dryrun.architecture(cfg.model)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (4096, 32, 32000)
    assert not config.tie_word_embeddings  # Mistral-7B has its own output head

    plan = dryrun.plan(cfg, jax.devices()[:8])  # abstract inputs: no weight is allocated
    n = 7_241_732_096  # Mistral-7B's parameters
    norms = (2 * 32 + 1) * 4096 * 4  # RMSNorm scales stay whole on every device
    assert plan.params == (n * 4 - norms) // 8 + norms  # float32 weights split 8 ways (FSDP)
    assert 0 <= plan.opt_state - plan.params < 64  # RMSProp: second moment (+ step count)
    # 64 prompts x 2 samples x 1024 positions x 32 layers x (k, v) x 8 heads x 128 x bf16, / 8
    assert plan.kv_cache == 128 * 1024 * 32 * 2 * 8 * 128 * 2 // 8
    assert plan.train_out < 1024  # only the metrics: the donated state is updated in place
    assert 0 < plan.train_temp and plan.kv_cache < plan.sample_temp
    assert plan.peak < 40 * GIB  # half of an 80 GB device or less
    # the sampler's bf16 copy in the decode layout: all but the norms split 8 ways
    assert plan.decode_params == (n * 2 - norms // 2) // 8 + norms // 2
    assert plan.sample_peak <= 12 * GIB  # no layer's gathered weights kept across steps
    assert plan.train_peak <= 20 * GIB  # 20.24 GiB with an element-wise non-finite guard

    text = "\n".join(dryrun.report(plan, cfg, 80))
    assert "| **peak** |" in text and text.splitlines()[-1].startswith("fits")
    assert "DOES NOT FIT" in dryrun.report(plan, cfg, 10)[-1]


def test_accumulating_micro_batches_costs_one_gradient_sum_not_a_second_set_of_activations():
    # SmolLM2 (no weight loaded), 4 pairs a micro-batch: 2 micro-batches add the float32
    # gradient sums only (a first micro-batch peeled out of the scan doubled the activations)
    # (the train step alone, as the dry run lowers it: its sampler has nothing to say here)
    temp = {}
    for a in (1, 2):
        overrides = [f"train.batch_size={4 * a}", "train.micro_batch_size=4"]
        cfg = load_config("configs/smollm2_ifeval.yaml", overrides)
        layout = build_layout(cfg.mesh, jax.devices()[:1])
        lowered, (*_, params, _) = dryrun.lower_train_step(cfg, dryrun.architecture(cfg.model),
                                                           layout)
        temp[a] = lowered.compile().memory_analysis().temp_size_in_bytes
    weights = sharding.per_device_bytes(params)
    assert 0 < temp[2] - temp[1] <= 1.1 * weights, (temp, weights)
