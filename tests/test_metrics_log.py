"""metrics.jsonl: strict JSON, torn lines trimmed on resume, no iteration written twice."""

import errno
import json
from pathlib import Path

import pytest

from optune_jax.run.errors import RunError
from optune_jax.run.metrics_log import MetricsLog, strict


def _strict_json(line: str):
    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def _log(tmp_path, iterations, resume_after=None):
    log = MetricsLog(tmp_path, resume_after=resume_after)
    for i in iterations:
        log.write({"iteration": i, "loss": 1.0 / (i + 2)})
    log.close()
    return tmp_path / "metrics.jsonl"


def test_non_finite_values_are_null(tmp_path):
    # issue 20, case 3: jq and strict readers refuse a bare NaN
    log = MetricsLog(tmp_path)
    nan, inf = float("nan"), float("inf")
    log.write({"iteration": 0, "reward_kept": nan, "grad": -inf, "nested": [{"x": nan}, 1.5]})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert _strict_json(line) == {"iteration": 0, "reward_kept": None, "grad": None,
                                  "nested": [{"x": None}, 1.5]}
    assert log.read()[0]["reward_kept"] is None
    assert strict((1, nan, "a")) == [1, None, "a"]


def test_resume_trims_a_torn_last_line(tmp_path):
    # issue 20, case 4: a kill in the middle of a write
    path = _log(tmp_path, [-1, 0, 1])
    path.write_text(path.read_text() + '{"iteration": 2, "loss": 0.2')
    assert [r["iteration"] for r in _read(_log(tmp_path, [], resume_after=1))] == [-1, 0, 1]
    assert path.read_text().endswith("}\n")
    # a complete last record whose newline was not written is kept (and given one)
    path.write_text(path.read_text().rstrip("\n"))
    assert [r["iteration"] for r in _read(_log(tmp_path, [2], resume_after=1))] == [-1, 0, 1, 2]


def test_resume_never_writes_an_iteration_twice(tmp_path):
    # issue 20, case 5: killed after the initial evaluation, before checkpoint 0
    _log(tmp_path, [-1])
    assert _read(_log(tmp_path, [-1, 0], resume_after=-1)) == _read(_log(tmp_path / "b", [-1, 0]))
    # killed after iteration 1's line, before its checkpoint: from checkpoint 0
    _log(tmp_path, [1], resume_after=None)
    assert [r["iteration"] for r in _read(_log(tmp_path, [1], resume_after=0))] == [-1, 0, 1]


def _read(path: Path) -> list[dict]:
    return [_strict_json(line) for line in path.read_text().splitlines()]


def test_a_damaged_line_before_the_last_names_the_file_and_line(tmp_path):
    path = _log(tmp_path, [-1, 0, 1])
    lines = path.read_text().splitlines()
    lines[1] = "garbage"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match=f"^{path} line 2 is not a metrics record: "):
        MetricsLog(tmp_path, resume_after=1)


def test_a_failed_write_names_the_file_and_the_cause(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path)

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "open", no_space)
    with pytest.raises(RunError, match=f"^cannot write {tmp_path}/metrics.jsonl: no space left"):
        log.write({"iteration": 0})
    monkeypatch.undo()
    log.close()
