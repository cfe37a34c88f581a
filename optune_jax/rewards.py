"""Reward functions: `(rows, responses) -> float32 scores`, one score per response (SPEC §4 step 3).

`rows[i]` is the dataset row of the prompt that `responses[i]` answers (it carries metadata such
as the IFEval `constraints`). Known rewards:
- "ifeval": optune_jax.ifeval.ifeval_reward, verifiable instruction following, in [0, 1].
- "tiny": `tiny_reward`, for smoke runs of a randomly initialised tiny model (see its docstring).
- "model": a learned reward model read from `reward.path` (optune_jax.reward_model.ModelReward).
`make_reward(reward_section)` builds the one a run uses; `score(name, rows, responses)` runs one
and checks its output with `check_rewards`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from optune_jax.errors import RunError
from optune_jax.ifeval import ifeval_reward

RewardFn = Callable[[Sequence[dict], Sequence[str]], np.ndarray]

_VOWELS = frozenset("aeiou")


class RewardError(RunError):
    """A reward returned something that cannot be trained on (NaN, inf, wrong shape or type)."""


def tiny_reward(rows: Sequence[dict], responses: Sequence[str]) -> np.ndarray:
    """Fraction of a response's characters that are lowercase ASCII vowels (a e i o u); 0 if empty.

    Built for the random-initialised tiny smoke config: it depends only on which tokens are
    sampled, so a tiny transformer can learn it from its own samples in a few iterations by
    shifting probability towards vowel-rich tokens (a change of output bias suffices). It takes
    fine-grained values: two random samples of a few dozen tokens almost never score the same,
    so pairs rarely tie. `rows` is unused. Range [0, 1].
    """
    del rows
    scores = [sum(c in _VOWELS for c in text) / len(text) if text else 0.0 for text in responses]
    return np.asarray(scores, np.float32)


_REWARDS: dict[str, RewardFn] = {"ifeval": ifeval_reward, "tiny": tiny_reward}
MODEL_REWARD = "model"  # not a fixed function: built from a checkpoint by `make_reward`


def get_reward(name: str) -> RewardFn:
    """The reward function registered under `name` ("ifeval" or "tiny")."""
    if name not in _REWARDS:
        raise ValueError(
            f"unknown reward {name!r}; known rewards: {sorted(_REWARDS)} "
            f"or {MODEL_REWARD!r} with reward.path"
        )
    return _REWARDS[name]


def make_reward(
    section, *, prompt_column: str = "prompt", dtype: str = "float32", mesh=None, rules=None
) -> RewardFn:
    """The reward function of a run's `reward` config section (`name`, `path`).

    Name "model" loads the reward-model checkpoint at `path`, scoring each row's
    `prompt_column` with its response in `dtype` (laid out on `mesh` by `rules` when given);
    any other name is a registered function.
    Raises ValueError (one line) for an unknown name or a path given to the wrong name.
    """
    if section.name == MODEL_REWARD:
        if not section.path:
            raise ValueError(
                "reward.name=model needs reward.path, a reward-model checkpoint directory "
                "(python -m optune_jax.train_rm exports one to <run.output_dir>/model)"
            )
        from optune_jax.reward_model import ModelReward  # jax and the checkpoint only when asked

        return ModelReward(
            section.path, prompt_column=prompt_column, dtype=dtype, mesh=mesh, rules=rules
        )
    if section.path is not None:
        raise ValueError(f"reward.path is read only with reward.name=model, not {section.name!r}")
    return get_reward(section.name)


def check_rewards(name: str, scores, n: int) -> np.ndarray:
    """`scores` as a float32 array of shape (n,), or a one-line RewardError naming reward and index.

    Raises for a value that cannot be cast to float32, a wrong shape, or a NaN / infinite score
    (including a finite float64 that overflows float32).
    """
    try:
        raw = np.asarray(scores)
        if raw.dtype.kind not in "iuf":  # strings, objects and None are not scores
            raise TypeError(f"dtype {raw.dtype}")
        with np.errstate(over="ignore"):
            scores_N = raw.astype(np.float32)
    except (TypeError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RewardError(f"reward {name!r}: scores do not cast to float32 ({message})") from None
    if scores_N.shape != (n,):
        raise RewardError(
            f"reward {name!r}: expected {n} scores of shape ({n},), got {scores_N.shape}"
        )
    bad_N = ~np.isfinite(scores_N)
    if bad_N.any():
        i = int(np.argmax(bad_N))
        raise RewardError(
            f"reward {name!r}: score {scores_N[i]} for prompt index {i} is not finite"
        )
    return scores_N


def score(
    name: str, rows: Sequence[dict], responses: Sequence[str], *, fn: RewardFn | None = None
) -> np.ndarray:
    """Run reward `name` on (rows[i], responses[i]) pairs; checked float32 scores of shape (N,).

    `fn` is the function to run when it is not the one registered as `name` (`make_reward`).
    """
    if len(rows) != len(responses):
        raise RewardError(
            f"reward {name!r}: {len(rows)} rows but {len(responses)} responses; expected one each"
        )
    fn = get_reward(name) if fn is None else fn
    return check_rewards(name, fn(rows, responses), len(responses))
