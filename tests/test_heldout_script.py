"""scripts/heldout.py: paired held-out evaluation of exported models against the base."""

import importlib.util
import json
from pathlib import Path

import pytest

from optune_jax.loop import OptuneRun
from optune_jax.run.config_file import load_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "heldout.py"


def load_script():
    spec = importlib.util.spec_from_file_location("heldout", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.optimized  # samples the real model: optimising pays
def test_an_exported_copy_of_the_base_scores_exactly_the_base(tmp_path, capsys):
    # the base (tiny config, random weights) exported untrained: same weights, same draws, so
    # every per-prompt reward must match and the paired difference is exactly 0
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path / 'run'}", "mesh.fsdp=1"])
    run = OptuneRun(cfg, progress=False)
    exported = run.export()
    run.close()
    heldout = load_script()
    out = tmp_path / "heldout.json"
    argv = [str(exported), "--config", "configs/tiny.yaml", "--samples", "1",
            "--set", "sampling.max_new_tokens=8", "--set", "mesh.fsdp=1", "--json", str(out)]
    assert heldout.main(argv) == 0
    base, copy = json.loads(out.read_text())["results"]
    assert len(base["rewards"]) == 160  # every held-out prompt, whatever num_eval_prompts says
    assert copy["rewards"] == base["rewards"]
    assert len(set(base["rewards"])) > 1  # the draws differ between prompts
    assert "| +0.000 ± 0.000 |" in capsys.readouterr().out


def test_bad_input_stops_with_one_line(tmp_path, capsys):
    heldout = load_script()
    assert heldout.main([str(tmp_path)]) == 2
    assert "holds no exported model" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert heldout.main([str(tmp_path), "--set", "sampling.top_p=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "top_p" in err
    assert heldout.main([str(tmp_path), "--json", str(tmp_path / "no" / "h.json")]) == 2
    assert "--json" in capsys.readouterr().err and not (tmp_path / "no").exists()
