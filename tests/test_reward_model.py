"""Reward models: transformers parity, export, Bradley–Terry training, data, the loop's reward."""

import functools
import json

import jax
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForSequenceClassification,
    PreTrainedTokenizerFast,
)

from models import ModelConfig
from models.hf_io import CheckpointError
from models.reward_model import (
    export_reward_checkpoint,
    init_reward_params,
    is_reward_checkpoint,
    load_reward_checkpoint,
    reward_logical_axes,
    score_sequences,
)
from optune_jax import sharding
from optune_jax.data import DataError
from optune_jax.optimizer import TrainState, make_optimizer
from optune_jax.rewards import functions as rewards
from optune_jax.rewards.rm_data import (
    PairColumns,
    encode_conversation,
    load_preference_pairs,
    pair_batch,
    score_all,
)
from optune_jax.rewards.rm_trainer import rm_train_step
from optune_jax.run.schema import RewardComponent, RewardSection

PAD = 0
SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=PAD,
    num_labels=1,
)


def _torch_model(kind, seed=0, **overrides):
    torch.manual_seed(seed)
    if kind == "mistral":  # head_dim 32 with 4 heads (N*H != D) and a sliding window
        model = MistralForSequenceClassification(
            MistralConfig(**(SMALL | dict(head_dim=32, sliding_window=5) | overrides))
        )
    else:
        model = LlamaForSequenceClassification(LlamaConfig(**(SMALL | overrides)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1 + 0.1 * torch.randn_like(p)
                if name.endswith("norm.weight")
                else 0.1 * torch.randn_like(p)
            )
    return model.eval()


def _batch(lengths, side, seed=0):
    """Random non-pad tokens padded on `side` to the longest length, with their mask."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = np.full((len(lengths), t), PAD, np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):
        cols = slice(t - n, t) if side == "left" else slice(0, n)
        tokens[i, cols], mask[i, cols] = rng.integers(1, SMALL["vocab_size"], n), 1
    return tokens, mask


def _torch_scores(model, tokens, mask):
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)  # positions from the mask, as ours
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos),
        )
    return out.logits[:, 0].numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    out = {}
    for kind in ("mistral", "llama"):
        model = _torch_model(kind)
        model.save_pretrained(root / kind)
        out[kind] = (model, root / kind)
    return out


@pytest.mark.parametrize("kind", ["mistral", "llama"])
def test_scores_match_transformers_left_and_right_padding(saved, kind):
    model, path = saved[kind]
    config, params = load_reward_checkpoint(path)
    assert set(params) == {"embed", "layers", "final_norm", "score"}
    score = jax.jit(functools.partial(score_sequences, config=config))
    lengths = [9, 3, 12, 1, 7]
    for side in ("left", "right"):
        tokens, mask = _batch(lengths, side)
        ours = np.asarray(score(params, tokens, mask))
        theirs = _torch_scores(model, tokens, mask)
        assert ours.dtype == np.float32 and ours.shape == (len(lengths),)
        np.testing.assert_allclose(ours, theirs, atol=1e-4, err_msg=side)
        assert np.abs(theirs).max() > 1e-2  # the comparison is not between zeros
    # padding never changes a sequence's score
    left, right = (score(params, *_batch(lengths, s)) for s in ("left", "right"))
    np.testing.assert_allclose(left, right, atol=1e-5)


def test_export_round_trip(saved, tmp_path):
    model, path = saved["mistral"]
    config, params = load_reward_checkpoint(path)
    out = export_reward_checkpoint(params, config, tmp_path / "rm")
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["MistralForSequenceClassification"]
    assert is_reward_checkpoint(out) and not is_reward_checkpoint(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert reloaded.num_labels == 1 and reloaded.config.pad_token_id == PAD
    tokens, mask = _batch([6, 2, 10], "right", seed=1)
    np.testing.assert_allclose(
        _torch_scores(reloaded, tokens, mask), _torch_scores(model, tokens, mask), atol=1e-6
    )
    _, again = load_reward_checkpoint(out)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_random_init_tree_and_axes():
    config = ModelConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    params = init_reward_params(config, jax.random.key(0))
    assert "lm_head" not in params and params["score"]["kernel"].shape == (16, 1)
    assert reward_logical_axes(config)["score"]["kernel"] == jax.sharding.PartitionSpec(
        "embed", None
    )


def test_bad_checkpoints_are_one_line_errors(saved, tmp_path):
    two = _torch_model("llama", num_labels=2)
    two.save_pretrained(tmp_path / "two")
    with pytest.raises(CheckpointError, match="num_labels = 1.*num_labels = 2") as info:
        load_reward_checkpoint(tmp_path / "two")
    assert "\n" not in str(info.value)
    hf = json.loads((saved["llama"][1] / "config.json").read_text())
    causal = tmp_path / "causal"
    causal.mkdir()
    (causal / "config.json").write_text(json.dumps(hf | {"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match=r"no model.safetensors"):
        load_reward_checkpoint(causal)


# ---- data ----------------------------------------------------------------------------------
def test_preference_files_text_and_chat_formats(tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"}) + "\n")
    chat = tmp_path / "chat.jsonl"
    conv = lambda a: [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]
    chat.write_text(json.dumps({"chosen": conv("yes"), "rejected": conv("no")}) + "\n")
    (c, r), (c2, r2) = load_preference_pairs([str(text), str(chat)])
    assert c == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "good"}]
    assert r[-1]["content"] == "bad" and c2 == conv("yes") and r2 == conv("no")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "p", "chosen": "good", "worse": "bad"}) + "\n")
    with pytest.raises(DataError, match=r"no column 'rejected'; columns: prompt, chosen, worse"):
        load_preference_pairs([str(missing)])
    with pytest.raises(DataError, match=r"need a prompt column 'question'"):
        load_preference_pairs([str(text)], PairColumns(prompt="question"))


# ---- training ------------------------------------------------------------------------------
def test_bradley_terry_learns_a_separable_preference():
    """Chosen sequences contain token 5 somewhere, rejected ones never do: learnt in < 100 steps."""
    config = ModelConfig(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    rng = np.random.default_rng(0)

    def pairs(n):
        chosen, rejected = [], []
        for _ in range(n):
            c = list(rng.choice([1, 2, 3, 4, 6, 7, 8, 9], rng.integers(3, 12)))
            c[rng.integers(len(c))] = 5
            chosen.append(c)
            rejected.append(list(rng.choice([1, 2, 3, 4, 6, 7, 8, 9], rng.integers(3, 12))))
        return chosen, rejected

    train, held_out = pairs(256), pairs(64)
    opt = make_optimizer(
        name="adamw",
        learning_rate=1e-2,
        total_steps=96,
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=1.0,
    )
    params = init_reward_params(config, jax.random.key(0))
    state = TrainState(np.int32(0), params, opt.init(params))
    step = jax.jit(
        functools.partial(rm_train_step, optimizer=opt, config=config), donate_argnums=(0,)
    )
    for _ in range(6):
        order = rng.permutation(256)
        for start in range(0, 256, 16):
            batch = pair_batch(
                *train,
                order[start : start + 16],
                batch_size=16,
                micro_batch_size=8,
                max_len=16,
                pad_id=0,
            )
            state, metrics = step(state, batch)
    score = jax.jit(functools.partial(score_sequences, config=config))
    sc, sr = (
        score_all(score, state.params, x, batch_size=32, max_len=16, pad_id=0) for x in held_out
    )
    assert float(metrics["loss"]) < 0.1
    assert np.mean(sc > sr) >= 0.95


# ---- the loop's reward ---------------------------------------------------------------------
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "[UNK]", "user", "assistant", ":", *"abcdefghij"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="[UNK]"
    )
    tok.chat_template = "{% for m in messages %}{{ m.role }} : {{ m.content }} <eos> {% endfor %}"
    return tok


def test_model_reward_scores_the_chat_conversation(tmp_path):
    tok = _tokenizer()
    config = ModelConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    params = init_reward_params(config, jax.random.key(1))
    path = export_reward_checkpoint(params, config, tmp_path / "rm", tokenizer=tok)
    reward = rewards.make_reward(RewardSection(name="model", path=str(path)))
    rows = [{"prompt": "a b"}, {"prompt": "c"}, {"prompt": "d e f"}]
    responses = ["j", "i h g f", ""]
    got = rewards.score("model", rows, responses, fn=reward)
    score = jax.jit(functools.partial(score_sequences, config=config))
    for row, text, value in zip(rows, responses, got, strict=True):
        ids = encode_conversation(
            tok,
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": text}],
        )
        one = score(params, np.array([ids]), np.ones((1, len(ids)), np.int32))
        np.testing.assert_allclose(value, one[0], atol=1e-5)
    # under a mesh (8 simulated devices): weights laid out like the policy's, same scores
    layout = sharding.Layout(sharding.make_mesh((2, -1, 1)), sharding.make_rules())
    on_mesh = rewards.make_reward(RewardSection(name="model", path=str(path)), layout=layout)
    assert len(on_mesh.params["embed"]["embedding"].sharding.device_set) == 8
    np.testing.assert_allclose(on_mesh(rows, responses), got, atol=1e-5)
    # a learned reward as one component of a weighted sum
    weighted = rewards.make_reward(RewardSection(name="weighted", components=(
        RewardComponent(name="model", path=str(path), weight=2.0, label="rm"),
        RewardComponent(name="tiny", weight=1.0),
    )))
    total, parts = rewards.score_parts("weighted", rows, responses, fn=weighted)
    np.testing.assert_allclose(parts["rm"], got, atol=1e-6)
    np.testing.assert_allclose(total, 2.0 * got + rewards.tiny_reward(rows, responses), atol=1e-5)
    with pytest.raises(ValueError, match="reward.name=model needs reward.path"):
        rewards.make_reward(RewardSection(name="model"))
    with pytest.raises(ValueError, match="reward.path is read only with reward.name=model"):
        rewards.make_reward(RewardSection(name="ifeval", path=str(path)))


# ---- the trainer's command line ------------------------------------------------------------
def _rm_config(tmp_path, epochs=2):
    """(config file, pairs file) of a tiny reward model on 6 repeated pairs (4 trained)."""
    tok_dir = tmp_path / "tok"
    _tokenizer().save_pretrained(tok_dir)
    rows = [{"prompt": "a b", "chosen": "c d e", "rejected": "f"}] * 6
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "rm.yaml"
    config.write_text(
        f"model: {{checkpoint: random, tokenizer: {tok_dir},\n"
        "        random: {hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1,\n"
        "                 num_attention_heads: 2, num_key_value_heads: 1, head_dim: 8}}\n"
        f"data: {{train_files: [{pairs}], eval_files: [], eval_fraction: 0.3, max_tokens: 32}}\n"
        f"train: {{optimizer: adamw, learning_rate: 1.0e-2, epochs: {epochs}, batch_size: 4,\n"
        "        micro_batch_size: 2}\n"
        f"run: {{output_dir: {tmp_path / 'run'}}}\n"
    )
    return config, pairs


def test_train_rm_cli_end_to_end_and_errors(tmp_path, capsys):
    from optune_jax import train_rm

    config, pairs = _rm_config(tmp_path)
    assert train_rm.main(["--config", str(config), "--no-progress"]) == 0
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [-1, 0, 1]
    assert records[-1]["eval.accuracy"] == 1.0  # one repeated pair: learnt
    config_, params = load_reward_checkpoint(out / "model")
    assert params["score"]["kernel"].shape == (16, 1)
    # a second start refuses to clobber the run; bad keys and bad files are one-line errors
    capsys.readouterr()
    assert train_rm.main(["--config", str(config)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train_rm.main(["--config", str(config), "--set", "train.max_tokens=9"]) == 2
    assert "did you mean 'data.max_tokens'" in capsys.readouterr().err  # RMConfig's own keys
    pairs.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    assert train_rm.main(["--config", str(config), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "no column 'rejected'; columns: prompt, chosen" in err and err.count("\n") == 1


def test_train_rm_skips_non_finite_steps_and_stops_after_a_few(tmp_path, capsys):
    # issue 20: the reward model's trainer skips and counts non-finite steps as the loop does;
    # one step per epoch, so the second epoch's step is the second skipped in a row
    from optune_jax import train_rm

    config, _ = _rm_config(tmp_path, epochs=3)
    # no warm-up: its first step's learning rate would be 0, and that step finite
    sets = ["--set", "train.learning_rate=1e38", "--set", "train.max_skipped_steps=2",
            "--set", "train.warmup_ratio=0"]
    assert train_rm.main(["--config", str(config), "--no-progress", *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: epoch 1, step 1 of 1: 2 optimizer steps in a row were skipped, "
                          "the last for a non-finite update") and "\n" not in err
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [-1, 0]
    assert records[1]["train.skipped_steps"] == 1 and records[1]["train.grad_norm"] is None
    assert records[1]["eval.loss"] == records[0]["eval.loss"]  # the weights did not move
    assert not (out / "model").exists()
