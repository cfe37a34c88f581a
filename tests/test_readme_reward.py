"""The README's bring-your-own-reward example works as written: its module and its config."""

import re
import sys
from pathlib import Path

import numpy as np
import yaml

from optune_jax.rewards import functions as rewards
from optune_jax.run.config_file import load_config


def _example() -> tuple[str, str]:
    """(python, yaml) of the two code blocks after the README's reward-example marker."""
    text = Path("README.md").read_text()
    after = text[text.index("<!-- README reward example"):]
    python, config = re.findall(r"```(?:python|yaml)\n(.*?)```", after, re.S)[:2]
    return python, config


def test_the_readme_reward_example_runs(tmp_path, monkeypatch):
    python, config = _example()
    assert python.startswith("# my_rewards.py\n") and len(python.splitlines()) <= 10
    (tmp_path / "my_rewards.py").write_text(python)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)  # test_rewards' module
    path = tmp_path / "c.yaml"
    path.write_text(config)
    cfg = load_config(path)
    assert yaml.safe_load(config)["reward"]["name"] == "weighted"
    fn = rewards.make_reward(cfg.reward)
    rows = [{"prompt": "Describe a traffic jam."}] * 2
    texts = ["What a lovely day!", "A calm, pleasant drive home. " * 8]
    total, parts = rewards.score_parts("weighted", rows, texts, fn=fn)
    assert list(parts) == ["sentiment", "calm"]
    np.testing.assert_allclose(parts["calm"], [0.0, 1.0 - 0.02 * (40 - 30)], atol=1e-6)
    np.testing.assert_allclose(total, parts["sentiment"] + 0.5 * parts["calm"], atol=1e-6)
