"""The controlled-sentiment prompt set: written by scripts/make_sentiment_data.py, reproducibly."""

import json
import subprocess
import sys
from pathlib import Path

from optune_jax import text_checks

DATA = Path("data/sentiment")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_script_rewrites_the_shipped_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, "scripts/make_sentiment_data.py", "--out-dir", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    other = tmp_path / "seed1"
    subprocess.run([sys.executable, "scripts/make_sentiment_data.py", "--out-dir", str(other),
                    "--seed", "1"], check=True, capture_output=True)
    assert (other / "train.jsonl").read_bytes() != (DATA / "train.jsonl").read_bytes()


def test_held_out_situations_are_never_trained_on_and_prompts_name_their_topic():
    train, heldout = _rows(DATA / "train.jsonl"), _rows(DATA / "heldout.jsonl")
    assert len(train) == 256 and len(heldout) == 108
    assert not {r["situation"] for r in train} & {r["situation"] for r in heldout}
    assert len({r["id"] for r in train + heldout}) == len(train) + len(heldout)
    for r in train + heldout:
        assert r["situation"] in r["prompt"]
        # the topic check would call the prompt itself on topic: its stems come from it
        assert text_checks.mentions(r["prompt"], r["topic"]), r
    # the main job's first 64 held-out prompts cover most of the 36 held-out situations
    assert len({r["situation"] for r in heldout[:64]}) >= 32
