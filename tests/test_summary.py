"""The end of a run: the summary's new rows, the one line in words, and run_plot.png."""

import pytest

from optune_jax import run_plot, train


def _record(it, reward, kl, **extra):
    return {
        "iteration": it, "eval.reward": reward, "eval.win_score": 50.0 + 10 * (it + 1),
        "eval.kl_initial": kl, "eval.nll_initial": 0.9 + kl / 2, "eval.greedy_eos_rate": 0.5,
        "eval.greedy_tokens": 30.0, "eval.greedy_rep4": 0.1, "eval.eos_rate": 0.5,
        "eval.response_tokens": 40.0, "eval.prompts": 48, "eval.samples": 4,
        "eval.on_topic": 0.9 - it / 20, "eval.greedy_on_topic": 0.95, "eval.exclamations": 0.1,
        "eval.examples": [{"prompt": "Describe a traffic jam.", "answer": "Cars everywhere."}],
        "prompts_regenerated": 8, "total.prompts_regenerated": 16,
        "total.tokens_generated": 1000, "total.generation_seconds": 3.0, **extra,
    }


RECORDS = [
    _record(-1, 0.208, 0.0),
    _record(0, 0.45, 0.1, **{"eval.reward_gain_ci95": 0.09}),
    _record(1, 0.52, 0.2, **{"eval.reward_gain_ci95": 0.081}),
]


def test_headline_says_what_happened_in_words(tmp_path):
    line = train.headline(RECORDS, tmp_path)
    assert line == (
        "In words: held-out reward 0.208 → 0.520, +0.312 ± 0.081 (95 %, paired over 48 prompts"
        " × 4 samples; beyond noise); KL to π_0 0.20 nats/token, NLL of greedy answers under π_0"
        f" +0.10, on topic 95% → 85%; greedy answers above, curves in {tmp_path}/run_plot.png."
    )
    noisy = [RECORDS[0], {**RECORDS[1], "eval.reward_gain_ci95": 0.3}]
    assert "within noise: the interval includes 0" in train.headline(noisy, tmp_path)


def test_summary_rows_for_topic_exclamations_and_reward_components():
    last = {**RECORDS[-1], "eval.reward.sentiment": 0.61, "eval.reward.brevity": -0.4}
    first = {**RECORDS[0], "eval.reward.sentiment": 0.3, "eval.reward.brevity": -0.5}
    text = train.summary_table([first, last])
    assert "| held-out reward: component brevity | -0.5000 | -0.4000 |" in text
    assert "| held-out reward: component sentiment | 0.3000 | 0.6100 |" in text
    assert "| samples that name their prompt's subject | 95% | 85% |" in text
    assert "| '!' per sample | 0.10 | 0.10 |" in text


@pytest.mark.parametrize("drift", [True, False])
def test_run_plot_is_a_png_and_nothing_half_written(tmp_path, drift):
    records = RECORDS if drift else [
        {k: v for k, v in r.items() if not k.startswith(("eval.kl", "eval.nll"))} for r in RECORDS
    ]
    path = run_plot.plot_run(records, tmp_path)
    assert path == tmp_path / "run_plot.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_plot.png"]
