"""The host's count of skipped (non-finite) optimizer steps, which stops a run of them."""

from __future__ import annotations

import dataclasses
import math

from optune_jax.run.errors import RunError


@dataclasses.dataclass
class NonFiniteGuard:
    """Host-side count of skipped (non-finite) steps: `limit` in a row stop the run.

    The count runs across iterations (and epochs); `in_a_row` is saved with a checkpoint so a
    resumed run stops where an uninterrupted one would.
    """

    limit: int
    in_a_row: int = 0

    def counts(self, metrics: dict, *, where: str) -> bool:
        """True when the step was applied; False when skipped. Raises RunError (one line,
        naming `where`, e.g. "iteration 2, step 5") on the `limit`-th skipped step in a row."""
        if not metrics["skipped"]:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            loss, norm = float(metrics["loss"]), float(metrics["grad_norm"])
            if not math.isfinite(loss):
                what = f"loss ({loss})"
            elif not math.isfinite(norm):
                what = f"gradient norm ({norm})"
            else:
                what = f"update (loss {loss:.4g} and gradient norm {norm:.4g} were finite)"
            raise RunError(
                f"{where}: {self.in_a_row} optimizer steps in a row were skipped, the last for a "
                f"non-finite {what} (train.max_skipped_steps={self.limit}); the run stops here "
                "and its newest checkpoint stays as it was"
            )
        return False

