"""scripts/prepare_zephyr.py on small stand-ins of the paper's downloads (design §7)."""

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from optune_jax.run.config_file import load_config

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("prepare_zephyr",
                                                  ROOT / "scripts/prepare_zephyr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checkpoint(path: Path, arch: str, **extra) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": [arch], **extra}))
    (path / "model.safetensors").write_bytes(b"")
    return path


def _downloads(tmp_path):
    data = tmp_path / "ultrachat" / "data"
    data.mkdir(parents=True)
    for shard in range(2):  # two shards of 30 prompts, 5 of them repeated across shards
        texts = [f"question {shard * 25 + i}" for i in range(30)]
        pq.write_table(pa.table({"prompt": texts, "prompt_id": [str(i) for i in range(30)]}),
                       data / f"train_gen-0000{shard}-of-00002.parquet")
    pq.write_table(pa.table({"prompt": ["sft only"]}), data / "train_sft-00000-of-00001.parquet")
    policy = _checkpoint(tmp_path / "policy", "MistralForCausalLM")
    rm = _checkpoint(tmp_path / "rm", "MistralForSequenceClassification", num_labels=1)
    return tmp_path / "ultrachat", policy, rm


def test_writes_a_seeded_distinct_prompt_file_and_the_command(tmp_path, capsys):
    prepare = _script()
    uc, policy, rm = _downloads(tmp_path)
    base = ["--ultrachat", str(uc), "--policy", str(policy), "--reward-model", str(rm),
            "--num-prompts", "40"]
    outs = []
    for name in ("a.jsonl", "b.jsonl"):
        assert prepare.main([*base, "--out", str(tmp_path / name)]) == 0
        outs.append([json.loads(x)["prompt"] for x in (tmp_path / name).read_text().splitlines()])
    assert outs[0] == outs[1] and len(set(outs[0])) == 40  # the same 40 of 55 distinct
    assert set(outs[0]) <= {f"question {i}" for i in range(55)}
    printed = capsys.readouterr().out
    assert f"--set reward.path={rm}" in printed and f"--set model.checkpoint={policy}" in printed
    # the config it points at loads with those overrides
    cfg = load_config(prepare.CONFIG, [f"reward.path={rm}",
                                       f"data.train_files=[{tmp_path}/a.jsonl]"])
    assert cfg.optune.iterations == 4 and cfg.train.optimizer == "rmsprop"


def test_refuses_with_one_line_what_is_missing(tmp_path, capsys):
    prepare = _script()
    uc, policy, rm = _downloads(tmp_path)

    def fails(message, **flags):
        args = {"--ultrachat": uc, "--policy": policy, "--reward-model": rm, **flags}
        argv = [str(x) for kv in args.items() for x in kv]
        assert prepare.main([*argv, "--out", str(tmp_path / "p.jsonl")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (tmp_path / "p.jsonl").exists()

    fails("no such directory", **{"--ultrachat": tmp_path / "nope"})
    fails("no test_gen-*.parquet shard; splits found: train_gen, train_sft",
          **{"--split": "test_gen"})
    fails("the split holds only 55 distinct prompts", **{"--num-prompts": 56})
    fails("no config.json", **{"--policy": tmp_path})
    fails("a reward model is *ForSequenceClassification with num_labels 1",
          **{"--reward-model": policy})
    fails("the policy is a *ForCausalLM", **{"--policy": rm})
