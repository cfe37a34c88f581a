"""The run's prompt sets: the files' rows as chat-template ids, capped, cut or dropped."""

import json
import os

import pytest

from models import load_tokenizer
from optune_jax import prompts
from optune_jax.run.config_file import load_config
from optune_jax.run.errors import RunError

TINY = "configs/tiny.yaml"  # data/ifeval, 64 training and 32 held-out prompts, 96 tokens at most
MINE = ["data.num_train_prompts=null", "data.num_eval_prompts=null"]  # every row of own files
ASSISTANT = "<|im_start|>assistant\n"  # the cue that ends every prompt


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2")  # cached: test_scoring.py shares it in one process


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _ids(tok, text, system=None):
    """Reference ids: the chat template rendered as text, then tokenized (not the module's path)."""
    turns = [{"role": "system", "content": system}] if system is not None else []
    rendered = tok.apply_chat_template(
        [*turns, {"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return [int(t) for t in tok(rendered, add_special_tokens=False)["input_ids"]]


def _config(train, held_out=None, *extra):
    files = [f"data.train_files=[{train}]", f"data.eval_files=[{held_out or ''}]"]
    return load_config(TINY, [*files, *MINE, *extra])


def _stats(prompts_, kept, *, empty=0, dropped=0, truncated=0, longest):
    return dict(prompts=prompts_, kept=kept, empty=empty, dropped=dropped, truncated=truncated,
                longest=longest)


def test_tiny_config_sets_are_the_files_first_rows_as_chat_template_ids(tok):
    """configs/tiny.yaml: the first 64 / 32 rows of each file, every column kept, with the ids
    the tokenizer gives the rendered chat template."""
    cfg = load_config(TINY)
    train, held_out = prompts.load_prompts(cfg, tok, pair_files=False)
    for got, path, n in ((train, "data/ifeval/train.jsonl", 64),
                         (held_out, "data/ifeval/heldout.jsonl", 32)):
        rows = _rows(path)[:n]
        ref = [_ids(tok, r["prompt"]) for r in rows]
        assert got.rows == rows and got.ids == ref
        assert got.stats == _stats(n, n, longest=max(map(len, ref)))
        assert got.capped == ""


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_prompts_over_max_prompt_tokens_are_dropped_or_cut_to_their_last_tokens(tok, overlong):
    """Beyond data.max_prompt_tokens a prompt is dropped (row with it) or keeps its last tokens,
    the assistant cue included; one of exactly the limit stays whole."""
    limit = 50
    cfg = load_config(TINY, [f"data.max_prompt_tokens={limit}", f"data.overlong={overlong}"])
    train, _ = prompts.load_prompts(cfg, tok, pair_files=False)
    rows = _rows("data/ifeval/train.jsonl")[:64]
    ref = [_ids(tok, r["prompt"]) for r in rows]
    over = sum(len(r) > limit for r in ref)
    assert 0 < over < 64 and any(len(r) == limit for r in ref)  # the data has both boundaries
    if overlong == "drop":
        assert train.ids == [r for r in ref if len(r) <= limit]
        assert train.rows == [row for row, r in zip(rows, ref, strict=True) if len(r) <= limit]
        assert train.stats == _stats(64, 64 - over, dropped=over, longest=max(map(len, ref)))
    else:
        assert train.ids == [r[-limit:] for r in ref] and train.rows == rows
        assert train.stats == _stats(64, 64, truncated=over, longest=max(map(len, ref)))
        cue = tok(ASSISTANT, add_special_tokens=False)["input_ids"]
        assert all(ids[-len(cue):] == cue for ids in train.ids)
    assert max(map(len, train.ids)) == limit


def test_prompt_counts_take_the_first_rows_and_note_a_count_beyond_the_files(tmp_path, tok):
    """data.num_train_prompts / num_eval_prompts keep the first rows; asking for more than the
    files hold uses them all and says so (asking for exactly as many does not)."""
    train_file = _jsonl(tmp_path / "t.jsonl", [{"prompt": f"Question {i}?"} for i in range(5)])
    held_file = _jsonl(tmp_path / "h.jsonl", [{"prompt": f"Query {i}?"} for i in range(3)])
    cfg = _config(train_file, held_file, "data.num_train_prompts=2", "data.num_eval_prompts=7")
    train, held_out = prompts.load_prompts(cfg, tok, pair_files=False)
    assert [r["prompt"] for r in train.rows] == ["Question 0?", "Question 1?"]
    assert train.stats["prompts"] == 2 and train.capped == ""
    assert len(held_out.ids) == 3
    assert held_out.capped == "data.num_eval_prompts=7 but the files hold 3 prompts: all 3 used"
    cfg = _config(train_file, held_file, "data.num_train_prompts=5", "data.num_eval_prompts=3")
    train, held_out = prompts.load_prompts(cfg, tok, pair_files=False)
    assert (len(train.ids), train.capped, len(held_out.ids), held_out.capped) == (5, "", 3, "")


def test_system_prompt_opens_every_prompt_and_rows_keep_their_columns(tmp_path, tok):
    """data.system_prompt becomes each prompt's system turn; rows keep columns rewards read."""
    rows = [{"id": "a", "prompt": "Name a colour.", "constraints": [{"type": "lowercase"}]},
            {"id": "b", "prompt": "Count to three.", "constraints": []}]
    path = _jsonl(tmp_path / "t.jsonl", rows)
    cfg = _config(path, path, "data.system_prompt='Be brief.'")
    train, held_out = prompts.load_prompts(cfg, tok, pair_files=False)
    assert train.ids == [_ids(tok, r["prompt"], "Be brief.") for r in rows]
    assert train.ids != [_ids(tok, r["prompt"]) for r in rows]
    assert train.rows == rows and held_out.rows == rows


def test_prefix_is_each_sets_common_opening_short_of_its_shortest_prompt(tmp_path, tok):
    """sampling.share_prefix: each set's longest common prefix, one token short of its shortest
    prompt (a set of one prompt: all but its last token); () when turned off."""
    texts = ["Apples are red.", "Bananas are yellow and long.", "Cherries?"]
    train_file = _jsonl(tmp_path / "t.jsonl", [{"prompt": t} for t in texts])
    held_file = _jsonl(tmp_path / "h.jsonl", [{"prompt": "Dates."}])
    train, held_out = prompts.load_prompts(_config(train_file, held_file), tok, pair_files=False)
    ref = [_ids(tok, t) for t in texts]
    common = os.path.commonprefix(ref)
    assert 0 < len(common) < min(map(len, ref)) - 1  # the template's opening, then they differ
    assert train.prefix == tuple(common)
    assert held_out.prefix == tuple(_ids(tok, "Dates.")[:-1])
    off = _config(train_file, held_file, "sampling.share_prefix=false")
    train, held_out = prompts.load_prompts(off, tok, pair_files=False)
    assert train.prefix == () and held_out.prefix == ()


def test_without_eval_files_a_seeded_fraction_of_training_rows_is_held_out(tmp_path, tok):
    """No data.eval_files: round(eval_fraction · rows) rows held out, the rest trained on, both in
    file order, the same split on every call with the seed."""
    rows = [{"id": i, "prompt": f"Prompt number {i}."} for i in range(10)]
    path = _jsonl(tmp_path / "t.jsonl", rows)
    cfg = _config(path, None, "data.eval_fraction=0.3")
    train, held_out = prompts.load_prompts(cfg, tok, pair_files=False)
    ids_t, ids_h = [r["id"] for r in train.rows], [r["id"] for r in held_out.rows]
    assert len(ids_h) == 3 and sorted(ids_t + ids_h) == list(range(10))
    assert ids_t == sorted(ids_t) and ids_h == sorted(ids_h)
    assert held_out.ids == [_ids(tok, r["prompt"]) for r in held_out.rows]
    again, again_h = prompts.load_prompts(cfg, tok, pair_files=False)
    assert again.rows == train.rows and again_h.rows == held_out.rows


def test_pair_files_train_on_offline_rows_with_both_responses(tmp_path, tok):
    """pair_files: training rows come from data.offline_files, chosen and rejected kept; the
    held-out set still from data.eval_files."""
    pairs = [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
             {"prompt": "Say bye.", "chosen": "Bye!", "rejected": "Hi."}]
    offline = _jsonl(tmp_path / "pairs.jsonl", pairs)
    held_file = _jsonl(tmp_path / "h.jsonl", [{"prompt": "Say thanks."}])
    cfg = _config(str(tmp_path / "unused.jsonl"), held_file, f"data.offline_files=[{offline}]")
    train, held_out = prompts.load_prompts(cfg, tok, pair_files=True)
    assert train.rows == pairs and train.ids == [_ids(tok, p["prompt"]) for p in pairs]
    assert held_out.rows == [{"prompt": "Say thanks."}]


def test_describe_says_what_was_kept_dropped_cut_and_capped(tmp_path, tok):
    """`describe`: one line with each set's kept-of-given count and why the others went."""
    long = "Please " * 40 + "answer."
    train_file = _jsonl(tmp_path / "t.jsonl", [{"prompt": "Hi."}, {"prompt": "  "},
                                               {"prompt": long}, {"prompt": "Why?"}])
    held_file = _jsonl(tmp_path / "h.jsonl", [{"prompt": "Bye."}])
    limit = len(_ids(tok, "Why?")) + 5
    cfg = _config(train_file, held_file, f"data.max_prompt_tokens={limit}",
                  "data.num_eval_prompts=4")
    train, held_out = prompts.load_prompts(cfg, tok, pair_files=False)
    longest = len(_ids(tok, long))
    assert train.stats == _stats(4, 2, empty=1, dropped=1, longest=longest)
    line = prompts.describe(train, held_out, cfg.data)
    assert line == (
        f"prompts: training 2 of 4 (1 longer than {limit} tokens with the chat template dropped "
        f"(longest {longest}), 1 empty dropped), held-out 1 of 1 "
        f"(data.max_prompt_tokens={limit}, data.overlong=drop); "
        "data.num_eval_prompts=4 but the files hold 1 prompts: all 1 used"
    )
    cut = _config(train_file, held_file, f"data.max_prompt_tokens={limit}",
                  "data.overlong=truncate")
    train, held_out = prompts.load_prompts(cut, tok, pair_files=False)
    assert prompts.describe(train, held_out, cut.data) == (
        f"prompts: training 3 of 4 (1 longer than {limit} tokens cut to their last ones, "
        f"1 empty dropped), held-out 1 of 1 (data.max_prompt_tokens={limit}, "
        "data.overlong=truncate)"
    )


def _bad_input(tmp_path, tok, case):
    """(config, pair_files, expected message) of one kind of bad input."""
    good = _jsonl(tmp_path / "good.jsonl", [{"id": 1, "prompt": "Hello."},
                                            {"id": 2, "prompt": "Goodbye."}])
    if case == "column":
        return _config(good, good, "data.prompt_column=question"), False, (
            f"prompt column 'question' not found in {good}; available columns: id, prompt")
    if case == "too few to split":
        one = _jsonl(tmp_path / "one.jsonl", [{"prompt": "Alone."}])
        return _config(one, None), False, (
            "cannot split 1 prompt(s) into train and eval sets; need at least 2")
    if case == "all too long":
        longest = max(len(_ids(tok, "Hello.")), len(_ids(tok, "Goodbye.")))
        return _config(good, good, "data.max_prompt_tokens=10"), False, (
            f"all 2 prompts are longer than max_tokens=10 (longest {longest}); raise the limit "
            "or truncate instead of dropping")
    if case == "all empty":
        blank = _jsonl(tmp_path / "blank.jsonl", [{"prompt": ""}, {"prompt": " \n"}])
        return _config(good, blank), False, "all 2 prompts are empty"
    if case == "not a string":
        bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "Fine."}, {"prompt": 7}])
        return _config(bad, good), False, f"{bad} line 2: 'prompt' must be a string, got int"
    if case == "missing file":
        gone = str(tmp_path / "gone.jsonl")
        return _config(gone, good), False, f"data file not found: {gone}"
    if case == "no rejected":
        pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "A.", "chosen": "B", "rejected": "C"},
                                                  {"prompt": "D.", "chosen": "E"}])
        return _config(good, good, f"data.offline_files=[{pairs}]"), True, (
            f"{pairs} line 2: no text column 'rejected' (columns: prompt, chosen)")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["column", "too few to split", "all too long", "all empty",
                                  "not a string", "missing file", "no rejected"])
def test_bad_prompt_input_stops_with_one_line_naming_it(tmp_path, tok, case):
    """Unusable prompt data raises a one-line RunError that names the bad value or file."""
    cfg, pair_files, message = _bad_input(tmp_path, tok, case)
    with pytest.raises(RunError) as info:
        prompts.load_prompts(cfg, tok, pair_files=pair_files)
    assert str(info.value) == message and "\n" not in message
