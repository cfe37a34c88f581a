import json

import pytest

from optune_jax.data import DataError, encode_prompts, load_prompt_rows, split_eval

ROWS = [
    {"id": "a", "prompt": "one two", "constraints": [{"type": "lowercase"}]},
    {"id": "b", "prompt": "one two three four five six", "constraints": [{"type": "quotes"}]},
    {"id": "c", "prompt": "seven", "constraints": [{"type": "bullets", "n": 3}]},
]


class FakeTokenizer:
    """Chat template: [BOS, (SYS, words...), USER, words..., ASSISTANT]; one id per word.

    Returns a dict like transformers 5's BatchEncoding, or a plain list with `as_list`.
    """

    BOS, SYS, USER, ASSISTANT = 1, 2, 3, 4

    def __init__(self, as_list: bool = False):
        self.as_list = as_list

    def apply_chat_template(self, messages, *, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        ids = [self.BOS]
        for m in messages:
            ids.append(self.SYS if m["role"] == "system" else self.USER)
            ids += [10 + len(word) for word in m["content"].split()]
        ids.append(self.ASSISTANT)
        return ids if self.as_list else {"input_ids": ids, "attention_mask": [1] * len(ids)}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------ loading
def test_jsonl_json_and_parquet(tmp_path):
    import pandas as pd

    jsonl = _jsonl(tmp_path / "a.jsonl", ROWS[:2])
    as_json = tmp_path / "b.json"
    as_json.write_text(json.dumps([ROWS[2]]))
    parquet = tmp_path / "c.parquet"
    pd.DataFrame([{"prompt": "from parquet", "id": "d"}]).to_parquet(parquet)
    rows = load_prompt_rows([jsonl, str(as_json), str(parquet)], "prompt")
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in ROWS] + ["from parquet"]
    assert rows[2]["constraints"] == [{"type": "bullets", "n": 3}]  # metadata kept for rewards


def test_bundled_ifeval_rows_keep_their_constraints():
    rows = load_prompt_rows(["data/ifeval/heldout.jsonl"], "prompt")
    assert len(rows) > 0 and all(isinstance(r["constraints"], list) for r in rows)
    # heterogeneous constraint dicts are not unified into one schema padded with None
    assert all(None not in c.values() for r in rows for c in r["constraints"])


def test_missing_column_lists_the_available_ones(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [{"question": "hi", "id": 1}])
    with pytest.raises(DataError) as info:
        load_prompt_rows([path], "prompt")
    want = f"prompt column 'prompt' not found in {path}; available columns: question, id"
    assert str(info.value) == want


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"^prompt file not found: .*nope\.jsonl$"):
        load_prompt_rows([str(tmp_path / "nope.jsonl")], "prompt")
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\nhi\n")
    with pytest.raises(DataError, match=r"extension must be one of \.json, \.jsonl, \.parquet$"):
        load_prompt_rows([str(csv)], "prompt")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="prompt file is empty"):
        load_prompt_rows([str(empty)], "prompt")
    with pytest.raises(DataError, match="no prompt files given"):
        load_prompt_rows([], "prompt")
    broken = tmp_path / "b.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(DataError) as info:
        load_prompt_rows([str(broken)], "prompt")
    assert str(info.value).startswith(f"cannot load prompts from {str(broken)!r}: ")
    assert "\n" not in str(info.value)


def test_non_string_prompt(tmp_path):
    path = _jsonl(tmp_path / "n.jsonl", [{"prompt": "ok"}, {"prompt": None}])
    with pytest.raises(DataError, match="row 1 of .*'prompt' must be a string, got NoneType"):
        load_prompt_rows([path], "prompt")


# ----------------------------------------------------------------------------------- encoding
@pytest.mark.parametrize("as_list", [False, True])
def test_encode_within_the_limit(as_list):
    tokens, kept, stats = encode_prompts(ROWS, FakeTokenizer(as_list), column="prompt",
                                         max_tokens=100, overlong="drop")
    assert tokens[0] == [1, 3, 13, 13, 4]
    assert kept == ROWS
    assert stats == {"prompts": 3, "kept": 3, "dropped": 0, "truncated": 0, "longest": 9}


def test_overlong_drop_counts_and_keeps_rows_aligned():
    tokens, kept, stats = encode_prompts(ROWS, FakeTokenizer(), column="prompt",
                                         max_tokens=5, overlong="drop")
    assert [r["id"] for r in kept] == ["a", "c"]
    assert all(len(t) <= 5 for t in tokens)
    assert stats == {"prompts": 3, "kept": 2, "dropped": 1, "truncated": 0, "longest": 9}


def test_overlong_truncate_keeps_the_generation_prompt():
    tokens, kept, stats = encode_prompts(ROWS, FakeTokenizer(), column="prompt",
                                         max_tokens=5, overlong="truncate")
    assert kept == ROWS
    assert tokens[1] == [15, 14, 14, 13, FakeTokenizer.ASSISTANT]  # the last 5 tokens
    assert stats == {"prompts": 3, "kept": 3, "dropped": 0, "truncated": 1, "longest": 9}


def test_system_prompt_is_a_system_turn():
    tokens, _, _ = encode_prompts(ROWS[:1], FakeTokenizer(), column="prompt", max_tokens=100,
                                  overlong="drop", system_prompt="be brief")
    assert tokens[0] == [1, 2, 12, 15, 3, 13, 13, 4]


def test_encode_errors():
    tok = FakeTokenizer()
    with pytest.raises(DataError, match="overlong='cut' is not one of: drop, truncate"):
        encode_prompts(ROWS, tok, column="prompt", max_tokens=5, overlong="cut")
    too_long = r"all 3 prompts are longer than max_tokens=2 \(longest 9\)"
    with pytest.raises(DataError, match=too_long):
        encode_prompts(ROWS, tok, column="prompt", max_tokens=2, overlong="drop")
    with pytest.raises(DataError, match="row 0 has no prompt column 'text'"):
        encode_prompts(ROWS, tok, column="text", max_tokens=5, overlong="drop")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from models.gguf_io import find_smollm2_gguf, load_gguf_tokenizer
    from models.hf_io import CheckpointError

    try:
        return load_gguf_tokenizer(find_smollm2_gguf())
    except CheckpointError as e:
        pytest.skip(str(e))


def test_smollm2_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    tokens, _, stats = encode_prompts(ROWS, tok, column="prompt", max_tokens=512,
                                      overlong="drop", system_prompt="Be brief.")
    text = tok.decode(tokens[0])
    assert "Be brief." in text and "one two" in text
    assert text.rstrip().endswith("<|im_start|>assistant")
    short, _, cut = encode_prompts(ROWS, tok, column="prompt", max_tokens=8, overlong="truncate")
    assert cut["truncated"] == 3 and all(len(t) == 8 for t in short)
    assert short[0] == tokens[0][-8:]  # the assistant header survives truncation


# -------------------------------------------------------------------------------------- split
def test_split_is_deterministic_disjoint_and_ordered():
    rows = [{"prompt": str(i), "i": i} for i in range(50)]
    train, held = split_eval(rows, 0.2, seed=3)
    assert (train, held) == split_eval(rows, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert sorted(r["i"] for r in train + held) == list(range(50))
    assert [r["i"] for r in held] == sorted(r["i"] for r in held)
    assert split_eval(rows, 0.2, seed=4)[1] != held
    assert held != rows[-10:]  # a random, not a tail, split


def test_split_edge_cases():
    two = [{"prompt": "a"}, {"prompt": "b"}]
    train, held = split_eval(two, 0.01, seed=0)
    assert len(train) == 1 and len(held) == 1  # both parts non-empty
    with pytest.raises(DataError, match="need at least 2"):
        split_eval(two[:1], 0.5, seed=0)
    with pytest.raises(DataError, match=r"out of range \(0, 1\)"):
        split_eval(two, 1.0, seed=0)
