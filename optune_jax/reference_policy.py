"""Which policy a pair's reference logps come from (design §3): the one place
`optune.reference` is read.

- `current` (DPO's default): π_t, the policy about to train; every pair scored afresh.
- `behavior` (BPO): the π_t' that generated the pair; a new pair is scored by π_t, a kept pair
  keeps the logps it got when it was new.
- `initial`: π_0 throughout; it does not change, so each pair is scored once and keeps it.

`reference_for(cfg, ...)` (`make_reference` on the config's values) checks the choice fits and
builds it once, like the pair source; the object says whether π_0 must be kept and what a
checkpoint keeps (`kept_P2`: each prompt's pair logps, NaN until scored).
"""

from __future__ import annotations

import numpy as np

from losses import get_loss
from optune_jax.batch import PairBatch
from optune_jax.reference import ReferenceLogps
from optune_jax.run.errors import RunError
from optune_jax.run.schema import RunConfig

CHOICES = ("current", "behavior", "initial")


class ReferencePolicy:
    """`logps(...)` -> float32 [Q, 2] (chosen, rejected) of D_t's pairs under the reference."""

    name = "current"
    needs_initial = False  # π_0's weights kept for the whole run

    def __init__(self, num_prompts: int):
        self.kept_P2 = np.full((num_prompts, 2), np.nan, np.float32)

    def logps(self, scorer: ReferenceLogps, batch: PairBatch, prompt_idx: np.ndarray,
              new_Q: np.ndarray, *, pi_t, initial) -> np.ndarray:
        """`new_Q`: the pairs generated this iteration; `pi_t`, `initial`: π_t's and π_0's
        weights (`initial` None unless `needs_initial`)."""
        return scorer(pi_t, batch.tokens, batch.attn, batch.resp)


class _Kept(ReferencePolicy):
    """A pair keeps the reference logps it got when it was first scored."""

    def _unscored(self, new_Q, kept_Q2):
        return new_Q

    def logps(self, scorer, batch, prompt_idx, new_Q, *, pi_t, initial):
        kept_Q2 = self.kept_P2[prompt_idx]
        score_Q = self._unscored(new_Q, kept_Q2)
        out = np.array(kept_Q2, np.float32)
        if score_Q.any():
            rows = (x[score_Q] for x in (batch.tokens, batch.attn, batch.resp))
            out[score_Q] = scorer(initial if self.needs_initial else pi_t, *rows)
        if not np.isfinite(out).all():
            q = int(np.argmax(~np.isfinite(out).all(axis=1)))
            raise RunError(f"pair {q} was kept without reference logps from the iteration that "
                           f"generated it (optune.reference={self.name})")
        self.kept_P2[prompt_idx] = out
        return out


class BehaviorReference(_Kept):
    """BPO: the new pairs scored by π_t, which generated them."""

    name = "behavior"


class InitialReference(_Kept):
    """π_0 scores every pair it has not scored yet: the new ones, and pairs from a file or an
    older checkpoint that carry none."""

    name, needs_initial = "initial", True

    def _unscored(self, new_Q, kept_Q2):
        return new_Q | ~np.isfinite(kept_Q2).all(axis=1)


_CLASSES = {c.name: c for c in (ReferencePolicy, BehaviorReference, InitialReference)}


def make_reference(name: str, *, num_prompts: int, loss_name: str,
                   pairs_from_file: bool) -> ReferencePolicy:
    """The reference `optune.reference` names; RunError (one line) when it does not fit the
    loss (HyPO's KL term is to π_0, design §5) or the pairs (a file's have no known behavior
    policy)."""
    if name not in _CLASSES:
        raise RunError(f"optune.reference={name}: allowed: {', '.join(CHOICES)}")
    if get_loss(loss_name).needs_samples and name != "initial":
        raise RunError(f"optune.reference={name} does not fit loss.name={loss_name}: "
                       "its KL term is to the initial policy; allowed: initial")
    if pairs_from_file and name == "behavior":
        raise RunError("optune.reference=behavior needs the policy that generated each pair; "
                       "pairs from data.offline_files have none known; allowed: current, initial")
    return _CLASSES[name](num_prompts)


def reference_for(cfg: RunConfig, *, num_prompts: int, pairs_from_file: bool) -> ReferencePolicy:
    """The reference of a run: `optune.reference` for `loss.name` (`make_reference`)."""
    return make_reference(cfg.optune.reference, num_prompts=num_prompts,
                          loss_name=cfg.loss.name, pairs_from_file=pairs_from_file)
