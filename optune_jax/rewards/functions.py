"""Reward functions: `(rows, responses) -> float32 scores`, one score per response
(design §4 step 3).

`rows[i]` is the dataset row of the prompt that `responses[i]` answers (it carries metadata such
as the IFEval `constraints`). What `reward.name` can name:
- a built-in: "ifeval" (optune_jax.rewards.ifeval, verifiable instruction following, in [0, 1]),
  "sentiment" (VADER's compound score of the response, in [-1, 1]), "tiny" (`tiny_reward`, for
  smoke runs of a randomly initialised tiny model);
- "model": a learned reward model read from `reward.path` (optune_jax.rewards.learned.ModelReward);
- "weighted": Σ_k weight_k · reward_k over `reward.components` (`WeightedReward`; each
  component's own scores are logged beside the total, like TRL's `reward_weights`);
- any importable callable with the same contract, as "package.module:function" (a module in the
  working directory works too: `python -m` puts it on the path).
`make_reward(reward_section)` builds the one a run uses; `score_parts` runs it and checks each
output with `check_rewards` (one-line RewardError naming the reward, the response and its prompt).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Sequence

import numpy as np

from optune_jax.rewards.ifeval import ifeval_reward
from optune_jax.run.errors import RunError

RewardFn = Callable[[Sequence[dict], Sequence[str]], np.ndarray]

_VOWELS = frozenset("aeiou")


class RewardError(RunError):
    """A reward that cannot be trained on: it raised, or returned NaN, inf, a wrong shape or
    type."""


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


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_reward(rows: Sequence[dict], responses: Sequence[str]) -> np.ndarray:
    """VADER's compound sentiment score of each response (Hutto & Gilbert 2014), in [-1, 1];
    a response without a word character scores -1 (saying nothing is not positive).

    The controlled-sentiment task's reward (the role of the DPO paper's sentiment classifier,
    Rafailov et al. 2023 §6.1). A lexicon-and-rules scorer: exclamation marks, capitals and
    repeated positive words raise it, and it does not read the topic, so the evaluation's drift
    and topic checks watch for those games. `rows` is unused.
    """
    del rows
    vader = _vader()
    scores = [vader.polarity_scores(t)["compound"] if any(c.isalnum() for c in t) else -1.0
              for t in responses]
    return np.asarray(scores, np.float32)


BUILTIN: dict[str, RewardFn] = {
    "ifeval": ifeval_reward, "sentiment": sentiment_reward, "tiny": tiny_reward,
}
MODEL_REWARD = "model"  # not a fixed function: built from a checkpoint by `make_reward`
WEIGHTED = "weighted"  # Σ weight · component over reward.components


def import_reward(spec: str) -> RewardFn:
    """The callable that "package.module:function" (or "module:Class.method") names."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {spec!r}: expected package.module:function")
    try:
        obj = importlib.import_module(module_name)
    except Exception as error:  # any failure inside the user's module is theirs to see
        raise ValueError(
            f"reward {spec!r}: cannot import module {module_name!r} "
            f"({type(error).__name__}: {_first_line(error)})"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f"reward {spec!r} is a {type(obj).__name__}, not a callable (rows, responses) -> scores"
        )
    return obj


def get_reward(name: str) -> RewardFn:
    """A built-in reward by name, or the callable "package.module:function" names."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" in name:
        return import_reward(name)
    raise ValueError(
        f"unknown reward {name!r}; built-in rewards: {sorted(BUILTIN)}, {MODEL_REWARD!r} with "
        f"reward.path, {WEIGHTED!r} with reward.components, or a callable as "
        "package.module:function"
    )


@dataclasses.dataclass(frozen=True)
class Component:
    label: str  # its name in the metrics: reward_new.<label>, eval.reward.<label>
    weight: float
    fn: RewardFn


class WeightedReward:
    """Σ_k weight_k · r_k(rows, responses) (TRL's `reward_weights`); `parts` gives each r_k."""

    def __init__(self, components: Sequence[Component]):
        self.components = tuple(components)

    def parts(self, rows: Sequence[dict], responses: Sequence[str], *,
              prompt_column: str = "prompt") -> dict[str, np.ndarray]:
        """Each component's checked float32 scores [N], by label."""
        return {c.label: score(c.label, rows, responses, fn=c.fn, prompt_column=prompt_column)
                for c in self.components}

    def total(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        out = sum(np.float64(c.weight) * parts[c.label] for c in self.components)
        return np.asarray(out, np.float32)

    def __call__(self, rows: Sequence[dict], responses: Sequence[str]) -> np.ndarray:
        return self.total(self.parts(rows, responses))


def _one(section, *, prompt_column, dtype, layout, where: str = "reward") -> RewardFn:
    """The reward of one `name` (+ `path`): a reward model, a built-in or an imported callable."""
    if section.name == MODEL_REWARD:
        if not section.path:
            raise ValueError(
                f"{where}.name=model needs {where}.path, a reward-model checkpoint directory "
                "(python -m optune_jax.train_rm exports one to <run.output_dir>/model)"
            )
        from optune_jax.rewards.learned import ModelReward  # jax and the checkpoint only when asked

        return ModelReward(
            section.path, prompt_column=prompt_column, dtype=dtype, layout=layout
        )
    if section.path is not None:
        raise ValueError(
            f"{where}.path is read only with {where}.name=model, not {section.name!r}"
        )
    if section.name == WEIGHTED:
        raise ValueError(f"{where}.name={WEIGHTED!r} cannot be a component of itself")
    return get_reward(section.name)


def make_reward(
    section, *, prompt_column: str = "prompt", dtype: str = "float32", layout=None
) -> RewardFn:
    """The reward function of a run's `reward` config section (`name`, `path`, `components`).

    Name "model" loads the reward-model checkpoint at `path`, scoring each row's
    `prompt_column` with its response in `dtype` (laid out by the run's `layout` when given);
    "weighted" builds a `WeightedReward` of `components`; any other name is a built-in or an
    importable callable. Raises ValueError (one line) for anything that cannot be built.
    """
    kw = dict(prompt_column=prompt_column, dtype=dtype, layout=layout)
    components = getattr(section, "components", ())
    if section.name != WEIGHTED:
        if components:
            raise ValueError(
                f"reward.components is read only with reward.name={WEIGHTED}, not {section.name!r}"
            )
        return _one(section, **kw)
    if section.path is not None:
        raise ValueError(f"reward.path is read only with reward.name=model, not {WEIGHTED!r}")
    if not components:
        raise ValueError(
            f"reward.name={WEIGHTED} needs reward.components, e.g. "
            "[{name: sentiment, weight: 1.0}, {name: my_rewards:brevity, weight: 0.5}]"
        )
    built, labels = [], set()
    for i, c in enumerate(components):
        where = f"reward.components[{i}]"
        if not c.name:
            raise ValueError(
                f"{where}.name is missing: a built-in, model or package.module:function"
            )
        label = c.label or c.name.rpartition(":")[2]
        if label in labels:
            raise ValueError(f"{where}: label {label!r} is used twice; give each component a label")
        labels.add(label)
        built.append(Component(label, c.weight, _one(c, where=where, **kw)))
    return WeightedReward(built)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _prompt(rows: Sequence[dict] | None, i: int, prompt_column: str) -> str:
    """" (prompt: '…')" for row i when it has the prompt text, else ""."""
    if rows is None or i >= len(rows) or not isinstance(rows[i], dict):
        return ""
    text = rows[i].get(prompt_column)
    if not isinstance(text, str):
        return ""
    return f" (prompt: {text if len(text) <= 60 else text[:57] + '...'!r})"


def check_rewards(name: str, scores, n: int, *, rows: Sequence[dict] | None = None,
                  prompt_column: str = "prompt") -> np.ndarray:
    """`scores` as a float32 array of shape (n,), or a one-line RewardError naming the reward, the
    response's index and (given `rows`) its prompt.

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
        raise RewardError(
            f"reward {name!r}: scores do not cast to float32 ({_first_line(error)})"
        ) from None
    if scores_N.shape != (n,):
        raise RewardError(
            f"reward {name!r}: expected {n} scores of shape ({n},), one per response, "
            f"got {scores_N.shape}"
        )
    bad_N = ~np.isfinite(scores_N)
    if bad_N.any():
        i = int(np.argmax(bad_N))
        raise RewardError(
            f"reward {name!r}: score {scores_N[i]} for response {i} is not finite"
            + _prompt(rows, i, prompt_column)
        )
    return scores_N


def _run(name: str, fn: RewardFn, rows, responses, prompt_column: str):
    """fn(rows, responses); an exception becomes one RewardError naming the first response (and
    prompt) that raises alone, found by scoring one at a time (only once the batch failed)."""
    try:
        return fn(rows, responses)
    except RunError:
        raise
    except Exception as error:
        where = f" on a batch of {len(responses)} responses"
        for i in range(len(responses)):
            try:
                fn(rows[i : i + 1], responses[i : i + 1])
            except Exception:
                where = f" on response {i}{_prompt(rows, i, prompt_column)}"
                break
        raise RewardError(
            f"reward {name!r} raised {type(error).__name__}: {_first_line(error)}{where}"
        ) from error


def score_parts(
    name: str, rows: Sequence[dict], responses: Sequence[str], *, fn: RewardFn | None = None,
    prompt_column: str = "prompt",
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Checked float32 scores [N] of reward `name` (run as `fn` when given, `make_reward`'s
    build) on (rows[i], responses[i]), and each weighted component's scores ({} for others)."""
    if len(rows) != len(responses):
        raise RewardError(
            f"reward {name!r}: {len(rows)} rows but {len(responses)} responses; expected one each"
        )
    fn = get_reward(name) if fn is None else fn
    if isinstance(fn, WeightedReward):
        parts = fn.parts(rows, responses, prompt_column=prompt_column)
        return check_rewards(name, fn.total(parts), len(responses)), parts
    raw = _run(name, fn, rows, responses, prompt_column)
    return check_rewards(name, raw, len(responses), rows=rows, prompt_column=prompt_column), {}


def score(name: str, rows: Sequence[dict], responses: Sequence[str], *,
          fn: RewardFn | None = None, prompt_column: str = "prompt") -> np.ndarray:
    """`score_parts`' total alone."""
    return score_parts(name, rows, responses, fn=fn, prompt_column=prompt_column)[0]
