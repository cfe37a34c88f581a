import json

import pytest

from optune_jax.data import (
    DataError,
    describe_prompts,
    encode_prompts,
    load_pair_rows,
    load_prompt_rows,
    split_eval,
)

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
    with pytest.raises(DataError, match=r"^data file not found: .*nope\.jsonl$"):
        load_prompt_rows([str(tmp_path / "nope.jsonl")], "prompt")
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\nhi\n")
    with pytest.raises(DataError, match=r"extension must be one of \.json, \.jsonl, \.parquet$"):
        load_prompt_rows([str(csv)], "prompt")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="data file is empty"):
        load_prompt_rows([str(empty)], "prompt")
    with pytest.raises(DataError, match="no prompt files given"):
        load_prompt_rows([], "prompt")
    with pytest.raises(DataError, match=f"^data file {tmp_path} is a directory, not a file$"):
        load_prompt_rows([str(tmp_path)], "prompt")


def test_non_string_prompt(tmp_path):
    path = _jsonl(tmp_path / "n.jsonl", [{"prompt": "ok"}, {"prompt": None}])
    with pytest.raises(DataError, match=f"^{path} line 2: 'prompt' must be a string, got null$"):
        load_prompt_rows([path], "prompt")


def _one_line_error(capfd, call) -> str:
    """The DataError's message; the call printed nothing (no second line from a library)."""
    capfd.readouterr()
    with pytest.raises(DataError) as info:
        call()
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert "\n" not in str(info.value)
    return str(info.value)


def test_malformed_files_name_the_file_and_the_line_counted_from_one(tmp_path, capfd):
    # issue 20, case 7: a non-UTF-8 byte and a malformed line, with their 1-based line
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"prompt": "ok"}\n\n{"prompt": "caf\xff"}\n')
    got = _one_line_error(capfd, lambda: load_prompt_rows([str(binary)], "prompt"))
    assert got == f"{binary} line 3: not UTF-8 text (byte 0xff at column 16)"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",}\n')
    got = _one_line_error(capfd, lambda: load_prompt_rows([str(broken)], "prompt"))
    assert got.startswith(f"{broken} line 3: not valid JSON (")
    not_object = tmp_path / "list.jsonl"
    not_object.write_text('{"prompt": "a"}\n"just text"\n')
    got = _one_line_error(capfd, lambda: load_prompt_rows([str(not_object)], "prompt"))
    assert got == f"{not_object} line 2: expected a JSON object, got a string"
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"prompt": "a"}, {"prompt": 3}], indent=2))
    got = _one_line_error(capfd, lambda: load_prompt_rows([str(array)], "prompt"))
    assert got == f"{array} item 2: 'prompt' must be a string, got int"
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                              {"prompt": "p", "chosen": "c"}])
    got = _one_line_error(capfd, lambda: load_pair_rows([pairs], ("prompt", "chosen", "rejected")))
    assert got == f"{pairs} line 2: no text column 'rejected' (columns: prompt, chosen)"


def test_an_unreadable_file_names_the_cause(tmp_path, monkeypatch):
    path = _jsonl(tmp_path / "p.jsonl", ROWS)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(tmp_path), "read_bytes", denied)
    with pytest.raises(DataError, match=f"^cannot read data file {path}: permission denied$"):
        load_prompt_rows([path], "prompt")


def test_duplicate_ids_are_refused_across_files(tmp_path):
    # issue 20, case 8
    a = _jsonl(tmp_path / "a.jsonl", ROWS)
    b = _jsonl(tmp_path / "b.jsonl", [{"id": "z", "prompt": "x"}, {"id": "b", "prompt": "y"}])
    with pytest.raises(DataError, match=f'^{b} line 2: id "b" repeats {a} line 2$'):
        load_prompt_rows([a, b], "prompt")
    no_ids = _jsonl(tmp_path / "c.jsonl", [{"prompt": "x"}, {"prompt": "x"}])
    assert len(load_prompt_rows([no_ids], "prompt")) == 2  # ids are checked only where given


def test_empty_prompts_are_dropped_and_counted():
    # issue 20, case 8
    rows = [*ROWS, {"id": "d", "prompt": ""}, {"id": "e", "prompt": " \n "}]
    tokens, kept, stats = encode_prompts(rows, FakeTokenizer(), column="prompt", max_tokens=5,
                                         overlong="drop")
    assert [r["id"] for r in kept] == ["a", "c"] and len(tokens) == 2
    assert (stats["empty"], stats["dropped"], stats["kept"]) == (2, 1, 2)
    assert describe_prompts(stats, max_tokens=5) == (
        "2 of 5 (1 longer than 5 tokens with the chat template dropped (longest 9), "
        "2 empty dropped)"
    )
    with pytest.raises(DataError, match="^all 2 prompts are empty$"):
        encode_prompts(rows[3:], FakeTokenizer(), column="prompt", max_tokens=5, overlong="drop")


# ----------------------------------------------------------------------------------- encoding
@pytest.mark.parametrize("as_list", [False, True])
def test_encode_within_the_limit(as_list):
    tokens, kept, stats = encode_prompts(ROWS, FakeTokenizer(as_list), column="prompt",
                                         max_tokens=100, overlong="drop")
    assert tokens[0] == [1, 3, 13, 13, 4]
    assert kept == ROWS
    assert stats == {"prompts": 3, "kept": 3, "empty": 0, "dropped": 0, "truncated": 0,
                     "longest": 9}


def test_overlong_drop_counts_and_keeps_rows_aligned():
    tokens, kept, stats = encode_prompts(ROWS, FakeTokenizer(), column="prompt",
                                         max_tokens=5, overlong="drop")
    assert [r["id"] for r in kept] == ["a", "c"]
    assert all(len(t) <= 5 for t in tokens)
    assert stats == {"prompts": 3, "kept": 2, "empty": 0, "dropped": 1, "truncated": 0,
                     "longest": 9}
    assert describe_prompts(stats, max_tokens=5) == (
        "2 of 3 (1 longer than 5 tokens with the chat template dropped (longest 9))"
    )


def test_overlong_truncate_keeps_the_generation_prompt():
    tokens, kept, stats = encode_prompts(ROWS, FakeTokenizer(), column="prompt",
                                         max_tokens=5, overlong="truncate")
    assert kept == ROWS
    assert tokens[1] == [15, 14, 14, 13, FakeTokenizer.ASSISTANT]  # the last 5 tokens
    assert stats == {"prompts": 3, "kept": 3, "empty": 0, "dropped": 0, "truncated": 1,
                     "longest": 9}


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
    with pytest.raises(DataError, match="row 1 has no prompt column 'text'"):
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
