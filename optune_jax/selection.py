"""Host-side OPTune prompt selection and pair assembly (design §4, Algorithm 1 of the OPTune paper).

Pure NumPy over a `PromptPool`: every prompt i of P carries its current pair of responses
(token ids right-padded with the pool's pad id), their lengths and rewards, and the iteration
the pair was generated in (-1 = never generated). Nothing here mutates its input: updates
return a new pool whose arrays are read-only.

One iteration on the host:

    idx_N = select(pool, rho, selection="reward", rank_key="chosen", rng=rng)  # design §4 step 1
    ... sample S >= 2 responses per selected prompt, score them ...           # steps 2-3
    tokens_N2Y, lengths_N2, rewards_N2 = best_and_worst(tokens_NSY, lengths_NS, rewards_NS)
    pool = update_pool(pool, idx_N, tokens_N2Y, lengths_N2, rewards_N2, t)   # step 4
    pairs = build_pairs(pool, t)                                              # steps 5-6
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

NEVER_GENERATED = -1
RANKING_KEYS = ("chosen", "mean", "rejected")
SELECTIONS = ("reward", "random")  # the config's optune.selection


@dataclasses.dataclass(frozen=True)
class PromptPool:
    """Current pair of every prompt. Arrays are stored as read-only views.

    Attributes:
      tokens_P2Y: int32 token ids of the two responses, right-padded with `pad_id`.
      lengths_P2: int32 number of real tokens of each response (0..Y).
      rewards_P2: float32 reward of each response (NaN where never generated).
      iteration_P: int32 iteration the current pair was generated in, -1 = never.
      pad_id: the id the token rows are padded with.
    """

    tokens_P2Y: np.ndarray
    lengths_P2: np.ndarray
    rewards_P2: np.ndarray
    iteration_P: np.ndarray
    pad_id: int = 0

    def __post_init__(self):
        num_prompts = self.iteration_P.shape[0] if self.iteration_P.ndim == 1 else -1
        if num_prompts < 0 or self.tokens_P2Y.ndim != 3:
            raise ValueError(
                f"PromptPool: expected iteration_P of rank 1 and tokens_P2Y of rank 3, got "
                f"{self.iteration_P.shape} and {self.tokens_P2Y.shape}"
            )
        expected = {
            "tokens_P2Y": ((num_prompts, 2, self.tokens_P2Y.shape[2]), np.int32),
            "lengths_P2": ((num_prompts, 2), np.int32),
            "rewards_P2": ((num_prompts, 2), np.float32),
            "iteration_P": ((num_prompts,), np.int32),
        }
        for name, (shape, dtype) in expected.items():
            array = getattr(self, name)
            if array.shape != shape or array.dtype != dtype:
                raise ValueError(
                    f"PromptPool.{name}: expected shape {shape} dtype {np.dtype(dtype)}, got "
                    f"{array.shape} {array.dtype}"
                )
            view = array.view()
            view.flags.writeable = False
            object.__setattr__(self, name, view)
        bad_P = (self.iteration_P != NEVER_GENERATED) & ~np.isfinite(self.rewards_P2).all(axis=1)
        if bad_P.any():
            raise ValueError(
                f"PromptPool: generated prompt {int(np.argmax(bad_P))} has a non-finite reward"
            )

    @property
    def num_prompts(self) -> int:
        return self.iteration_P.shape[0]

    @property
    def max_len(self) -> int:
        return self.tokens_P2Y.shape[2]

    @classmethod
    def empty(cls, num_prompts: int, max_len: int, *, pad_id: int = 0) -> PromptPool:
        """A pool of `num_prompts` never-generated prompts with responses of up to `max_len`."""
        if num_prompts < 0 or max_len < 0:
            raise ValueError(
                f"PromptPool.empty: num_prompts and max_len must be >= 0, got "
                f"{num_prompts} and {max_len}"
            )
        return cls(
            tokens_P2Y=np.full((num_prompts, 2, max_len), pad_id, np.int32),
            lengths_P2=np.zeros((num_prompts, 2), np.int32),
            rewards_P2=np.full((num_prompts, 2), np.nan, np.float32),
            iteration_P=np.full((num_prompts,), NEVER_GENERATED, np.int32),
            pad_id=pad_id,
        )


@dataclasses.dataclass(frozen=True)
class Pairs:
    """The preference pairs of D_t (design §4 step 5); Q = prompts whose two rewards differ.

    Attributes:
      prompt_idx_Q: int32 prompt index of each pair, ascending.
      chosen_tokens_QY, rejected_tokens_QY: int32 tokens of y_w and y_l (higher reward = chosen).
      chosen_lengths_Q, rejected_lengths_Q: int32 lengths of y_w and y_l.
      chosen_rewards_Q, rejected_rewards_Q: float32 rewards r(x, y_w) >= r(x, y_l).
      is_new_Q: bool, the pair was generated in the current iteration.
      tie_P: bool over all prompts, r1 == r2: no preference, dropped from the loss.
      num_ties: tie_P.sum().
      num_new, num_kept: prompts (ties included) whose pair is new / carried over.
      mean_reward_new, mean_reward_kept: mean of (r1 + r2) / 2 over those prompts; NaN if none.
    """

    prompt_idx_Q: np.ndarray
    chosen_tokens_QY: np.ndarray
    rejected_tokens_QY: np.ndarray
    chosen_lengths_Q: np.ndarray
    rejected_lengths_Q: np.ndarray
    chosen_rewards_Q: np.ndarray
    rejected_rewards_Q: np.ndarray
    is_new_Q: np.ndarray
    tie_P: np.ndarray
    num_ties: int
    num_new: int
    num_kept: int
    mean_reward_new: float
    mean_reward_kept: float


def num_selected(num_prompts: int, rho: float) -> int:
    """N = ceil(rho * P) (Algorithm 1, line 4), robust to float error (rho=0.3, P=10 gives 3)."""
    _check_rho(rho)
    if num_prompts == 0:
        return 0
    # Rounding to 6 decimals first absorbs the ~1e-16 relative error of rho * P.
    return min(num_prompts, max(1, math.ceil(round(rho * num_prompts, 6))))


def ranking_keys(rewards_P2: np.ndarray, key: str = "chosen") -> np.ndarray:
    """Per-prompt ranking key (design §4 step 1): max (default), mean or min of the two rewards.

    Returns float32 keys_P; the prompts with the LOWEST keys are regenerated.
    """
    if key == "chosen":
        return rewards_P2.max(axis=1)
    if key == "mean":
        return rewards_P2.mean(axis=1, dtype=np.float32)
    if key == "rejected":
        return rewards_P2.min(axis=1)
    raise ValueError(f"unknown ranking key {key!r}; expected one of {RANKING_KEYS}")


def select_lowest(keys_P: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Indices (ascending, int64) of the N = ceil(rho * P) prompts with the lowest keys.

    Ties are broken by a seeded random permutation from `rng`, never by input order.
    """
    if np.isnan(keys_P).any():
        raise ValueError(f"select_lowest: key is NaN at prompt {int(np.argmax(np.isnan(keys_P)))}")
    n = num_selected(keys_P.shape[0], rho)
    tie_key_P = rng.permutation(keys_P.shape[0])
    order_P = np.lexsort((tie_key_P, keys_P))  # the last key is the primary one
    return np.sort(order_P[:n])


def select_random(num_prompts: int, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Indices (ascending, int64) of N = ceil(rho * P) distinct uniform prompts (Rdm_rho)."""
    n = num_selected(num_prompts, rho)
    return np.sort(rng.choice(num_prompts, size=n, replace=False))


def select(
    pool: PromptPool,
    rho: float,
    *,
    selection: str = "reward",
    rank_key: str = "chosen",
    rng: np.random.Generator,
) -> np.ndarray:
    """Prompts to regenerate this iteration (design §4 step 1), as ascending int64 indices.

    Args:
      pool: the current pool.
      rho: selection ratio in (0, 1].
      selection: "reward" (OPTune: the lowest ranking keys) or "random" (the Rdm_rho baseline).
      rank_key: ranking key for "reward": "chosen" (default), "mean" or "rejected".
      rng: seeded generator; it breaks ties ("reward") or draws the sample ("random").

    Returns every prompt when any prompt was never generated (iteration 0 generates all of them,
    and a never-generated prompt must always be selected) or when rho == 1.
    """
    _check_rho(rho)
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")
    if rank_key not in RANKING_KEYS:
        raise ValueError(f"unknown ranking key {rank_key!r}; expected one of {RANKING_KEYS}")
    if rho == 1 or (pool.iteration_P == NEVER_GENERATED).any():
        return np.arange(pool.num_prompts)
    if selection == "random":
        return select_random(pool.num_prompts, rho, rng)
    return select_lowest(ranking_keys(pool.rewards_P2, rank_key), rho, rng)


def best_and_worst(
    tokens_NSY: np.ndarray, lengths_NS: np.ndarray, rewards_NS: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pair each prompt keeps of its S >= 2 sampled responses: the highest reward against
    the lowest (online DPO's best-vs-worst), both in sample order, so S = 2 returns its input.

    Among equal rewards the earliest sample wins; the worst is the lowest of the other S - 1,
    so a prompt whose S rewards are all equal keeps samples 0 and 1 (a tie `build_pairs` drops).

    Args:
      tokens_NSY: int32 token ids of the S responses to each of N prompts.
      lengths_NS: their lengths.
      rewards_NS: their finite rewards.

    Returns:
      (tokens_N2Y, lengths_N2, rewards_N2) of the two kept responses.
    """
    n, s = np.shape(rewards_NS)
    _check_shape("best_and_worst", "lengths_NS", lengths_NS, (n, s))
    _check_shape("best_and_worst", "tokens_NSY", tokens_NSY, (n, s, np.shape(tokens_NSY)[-1]))
    if s < 2:
        raise ValueError(f"best_and_worst: needs at least 2 samples per prompt, got {s}")
    if not np.isfinite(rewards_NS).all():
        raise ValueError("best_and_worst: rewards_NS has a NaN or infinite reward")
    rows_N = np.arange(n)
    best_N = np.argmax(rewards_NS, axis=1)  # argmax/argmin return the first of equal values
    others_NS = rewards_NS.astype(np.float64)  # the best excluded from the worst's candidates
    others_NS[rows_N, best_N] = np.inf
    worst_N = np.argmin(others_NS, axis=1)
    keep_N2 = np.sort(np.stack([best_N, worst_N], axis=1), axis=1)
    rows_N1 = rows_N[:, None]
    return tokens_NSY[rows_N1, keep_N2], lengths_NS[rows_N1, keep_N2], rewards_NS[rows_N1, keep_N2]


def update_pool(
    pool: PromptPool,
    idx_N: np.ndarray,
    tokens_N2Y: np.ndarray,
    lengths_N2: np.ndarray,
    rewards_N2: np.ndarray,
    iteration: int,
) -> PromptPool:
    """A new pool where prompts `idx_N` take their new pair (design §4 step 4); the rest are kept.

    Args:
      pool: the current pool (unchanged).
      idx_N: distinct prompt indices that were regenerated.
      tokens_N2Y: their two responses' token ids, right-padded to the pool's max_len.
      lengths_N2: their lengths, in [0, max_len].
      rewards_N2: their finite rewards.
      iteration: the current iteration t >= 0.
    """
    idx_N = np.asarray(idx_N)
    n, max_len = idx_N.shape[0], pool.max_len
    _check_shape("update_pool", "idx_N", idx_N, (n,))
    _check_shape("update_pool", "tokens_N2Y", tokens_N2Y, (n, 2, max_len))
    _check_shape("update_pool", "lengths_N2", lengths_N2, (n, 2))
    _check_shape("update_pool", "rewards_N2", rewards_N2, (n, 2))
    if iteration < 0:
        raise ValueError(f"update_pool: iteration must be >= 0, got {iteration}")
    if n and (idx_N.min() < 0 or idx_N.max() >= pool.num_prompts):
        raise ValueError(f"update_pool: idx_N out of range [0, {pool.num_prompts})")
    if np.unique(idx_N).shape[0] != n:
        raise ValueError("update_pool: idx_N has repeated prompt indices")
    if n and (np.min(lengths_N2) < 0 or np.max(lengths_N2) > max_len):
        raise ValueError(f"update_pool: lengths_N2 outside [0, {max_len}]")
    if not np.isfinite(rewards_N2).all():
        raise ValueError("update_pool: rewards_N2 has a NaN or infinite reward")

    tokens_P2Y = pool.tokens_P2Y.copy()
    lengths_P2 = pool.lengths_P2.copy()
    rewards_P2 = pool.rewards_P2.copy()
    iteration_P = pool.iteration_P.copy()
    tokens_P2Y[idx_N] = tokens_N2Y
    lengths_P2[idx_N] = lengths_N2
    rewards_P2[idx_N] = rewards_N2
    iteration_P[idx_N] = iteration
    return PromptPool(tokens_P2Y, lengths_P2, rewards_P2, iteration_P, pool.pad_id)


def build_pairs(pool: PromptPool, iteration: int) -> Pairs:
    """Chosen/rejected pairs of D_t and their accounting (design §4 steps 5-6).

    The higher-reward response is chosen; a pair with r1 == r2 is dropped and counted as a tie.
    Pairs generated at `iteration` count as new, the others as kept. Every prompt must have been
    generated (update the pool first).
    """
    never_P = pool.iteration_P == NEVER_GENERATED
    if never_P.any():
        raise ValueError(
            f"build_pairs: prompt {int(np.argmax(never_P))} was never generated; "
            "update the pool first"
        )
    r1_P, r2_P = pool.rewards_P2[:, 0], pool.rewards_P2[:, 1]
    tie_P = r1_P == r2_P
    prompt_idx_Q = np.flatnonzero(~tie_P).astype(np.int32)
    winner_Q = (r2_P[prompt_idx_Q] > r1_P[prompt_idx_Q]).astype(np.intp)
    loser_Q = 1 - winner_Q

    new_P = pool.iteration_P == iteration
    pair_reward_P = pool.rewards_P2.mean(axis=1, dtype=np.float32)
    return Pairs(
        prompt_idx_Q=prompt_idx_Q,
        chosen_tokens_QY=pool.tokens_P2Y[prompt_idx_Q, winner_Q],
        rejected_tokens_QY=pool.tokens_P2Y[prompt_idx_Q, loser_Q],
        chosen_lengths_Q=pool.lengths_P2[prompt_idx_Q, winner_Q],
        rejected_lengths_Q=pool.lengths_P2[prompt_idx_Q, loser_Q],
        chosen_rewards_Q=pool.rewards_P2[prompt_idx_Q, winner_Q],
        rejected_rewards_Q=pool.rewards_P2[prompt_idx_Q, loser_Q],
        is_new_Q=new_P[prompt_idx_Q],
        tie_P=tie_P,
        num_ties=int(tie_P.sum()),
        num_new=int(new_P.sum()),
        num_kept=int((~new_P).sum()),
        mean_reward_new=_mean_or_nan(pair_reward_P[new_P]),
        mean_reward_kept=_mean_or_nan(pair_reward_P[~new_P]),
    )


def _mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean(dtype=np.float64)) if values.size else float("nan")


def _check_rho(rho: float) -> None:
    if isinstance(rho, bool) or not isinstance(rho, int | float | np.floating | np.integer):
        raise ValueError(f"rho must be a number in (0, 1], got {rho!r}")
    if not 0 < rho <= 1:  # NaN fails this too
        raise ValueError(f"rho must be in (0, 1], got {rho}")


def _check_shape(fn: str, name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if np.shape(array) != shape:
        raise ValueError(f"{fn}: {name} must have shape {shape}, got {np.shape(array)}")
