"""Per-iteration metrics to JSONL and TensorBoard (only process 0 writes).

metrics.jsonl is strict JSON, one object per line with an "iteration" key: a NaN or infinite
value is written as null (RFC 8259 has no NaN or Infinity; `jq` and strict readers refuse the
bare `NaN` Python's json module writes by default).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax

from optune_jax.run.errors import RunError, file_error, one_line


def strict(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON null), nested dicts/lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def read_records(path: Path) -> tuple[list[dict], bool]:
    """(records, torn): every line of a metrics file, and whether an unfinished last line (a
    write cut short) was left out. Raises RunError naming the file and 1-based line for any
    other line that is not a JSON object with an "iteration"."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        if isinstance(e, OSError):
            raise file_error("read", path, e) from None
        raise RunError(f"{path} is not UTF-8 text ({one_line(e)})") from None
    lines = text.split("\n")
    records, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("iteration"), int)
        except ValueError as e:
            record, ok = one_line(e), False
        if not ok:
            if number == len(lines):  # no newline after it: the write was cut short
                torn = True
                continue
            raise RunError(f"{path} line {number} is not a metrics record: {str(record)[:80]}")
        records.append(record)
    return records, torn


class MetricsLog:
    """Appends one record per iteration to `directory/metrics.jsonl` and TensorBoard.

    `resume_after`: a resumed run keeps the lines of iterations up to this one and drops the
    rest (they are computed again), a torn last line included; the initial evaluation's line
    (iteration -1) goes with iteration 0, so `resume_after=-1` (no checkpoint) keeps nothing
    and no iteration is ever written twice. None: keep the file as it is.
    `name`, `tensorboard`: another log of the same kind (e.g. the per-prompt reward history,
    `reward_history.FILE`), with the same resume rule and without the TensorBoard copy.
    """

    def __init__(self, directory: str | Path, *, resume_after: int | None = None,
                 name: str = "metrics.jsonl", tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(directory) / name
        self._tb = None
        if not self.enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_after is not None and self.path.exists():
                records, _ = read_records(self.path)
                self.rewrite(
                    [r for r in records if 0 <= resume_after and r["iteration"] <= resume_after]
                )
            if not tensorboard:
                return
            from tensorboardX import SummaryWriter

            # TensorBoard drops the events an earlier run wrote at steps from `purge_step` on
            purge = None
            if resume_after is not None:
                purge = resume_after + 1 if resume_after >= 0 else -1
            self._tb = SummaryWriter(str(Path(directory) / "tensorboard"), purge_step=purge)
        except OSError as e:
            raise file_error("write", self.path, e) from None

    @staticmethod
    def _line(record: dict) -> str:
        return json.dumps(strict(record), sort_keys=True, allow_nan=False) + "\n"

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = self._line(record)
        try:
            with self.path.open("a") as f:
                f.write(line)
            if self._tb is None:
                return
            step = record["iteration"]
            for key, value in record.items():
                if (
                    isinstance(value, int | float)
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                ):
                    self._tb.add_scalar(key.replace(".", "/"), value, step)
            self._tb.flush()
        except OSError as e:
            raise file_error("write", self.path, e) from None

    def rewrite(self, records: list[dict]) -> None:
        """Replaces the file with `records`, one line each (written beside it, then renamed)."""
        if not self.enabled:
            return
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text("".join(self._line(r) for r in records))
            tmp.replace(self.path)
        except OSError as e:
            raise file_error("write", self.path, e) from None

    def read(self) -> list[dict]:
        """Every record written so far (null, for a non-finite value, read as None)."""
        if not self.path.exists():
            return []
        return read_records(self.path)[0]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
