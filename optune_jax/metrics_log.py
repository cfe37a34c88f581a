"""Per-iteration metrics to JSONL and TensorBoard (only process 0 writes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax


class MetricsLog:
    def __init__(self, directory: str | Path, *, resume_after: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = Path(directory) / "metrics.jsonl"
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after is not None and self.path.exists():  # drop lines past the checkpoint
            lines = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln and json.loads(ln)["iteration"] <= resume_after
            ]
            self.path.write_text("".join(ln + "\n" for ln in lines))
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(Path(directory) / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        step = record["iteration"]
        for key, value in record.items():
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                self._tb.add_scalar(key.replace(".", "/"), value, step)
        self._tb.flush()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln]

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
