"""Prompt data: rows read through `datasets`, chat-templated token ids, a held-out split.

    rows = load_prompt_rows(["data/ifeval/train.jsonl"], "prompt")
    tokens, rows, stats = encode_prompts(rows, tokenizer, column="prompt", max_tokens=128,
                                         overlong="drop")

Rows are plain dicts and keep every column, because rewards read metadata from them (the IFEval
reward reads `constraints`). Errors a user can fix are one-line `DataError`s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

OVERLONG = ("drop", "truncate")

# File extension -> the `datasets` builder that reads it.
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Prompt data that cannot be used; the message is one line naming the file or value."""


def _one_line(error: BaseException) -> str:
    error = error.__cause__ or error  # DatasetGenerationError wraps the parser's own message
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _load_one(name: str) -> Any:
    """One file (or hub dataset) as a `datasets.Dataset`."""
    import datasets  # heavy import, kept off the module import path

    path = Path(name)
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"unsupported prompt file {name!r}: extension must be one of {', '.join(_BUILDERS)}"
            )
        if path.stat().st_size == 0:
            raise DataError(f"prompt file is empty: {name}")
        kwargs: dict[str, Any] = {"path": builder, "data_files": [str(path)]}
    elif path.suffix or path.exists():
        raise DataError(f"prompt file not found: {name}")
    else:  # no such file and no extension: a hub dataset name, read where a network exists
        kwargs = {"path": name}
    datasets.disable_progress_bars()  # a local file loads in milliseconds; keep stderr clean
    try:
        return datasets.load_dataset(**kwargs, split="train")
    except Exception as e:  # datasets raises many types, with multi-line messages
        raise DataError(f"cannot load prompts from {name!r}: {_one_line(e)}") from None


def load_prompt_rows(files: Sequence[str], column: str) -> list[dict]:
    """Every row of `files`, in order, as dicts (all columns kept).

    Args:
      files: paths ending in .json, .jsonl or .parquet, or hub dataset names (no extension;
        their "train" split is read).
      column: the column holding the prompt text; every row must have a string there.
    Returns:
      the rows. Raises DataError for a missing file, an unsupported extension, a missing
      column, a non-string prompt, an unreadable or empty file, or no files.
    """
    if isinstance(files, str):  # a lone path would otherwise be read character by character
        files = [files]
    rows: list[dict] = []
    for name in files:
        dataset = _load_one(name)
        if len(dataset) == 0:
            raise DataError(f"no prompts in {name}")
        if column not in dataset.column_names:
            raise DataError(
                f"prompt column {column!r} not found in {name}; available columns: "
                f"{', '.join(dataset.column_names) or '(none)'}"
            )
        for i, row in enumerate(dataset.to_list()):
            if not isinstance(row[column], str):
                raise DataError(
                    f"row {i} of {name}: {column!r} must be a string, got "
                    f"{type(row[column]).__name__}"
                )
            rows.append(row)
    if not rows:
        raise DataError("no prompt files given")
    return rows


def load_pair_rows(files: Sequence[str], columns: Sequence[str]) -> list[dict]:
    """Offline preference rows: `columns` = (prompt, chosen, rejected) text columns."""
    prompt, *responses = columns
    rows = load_prompt_rows(files, prompt)
    for column in responses:
        for i, row in enumerate(rows):
            if not isinstance(row.get(column), str):
                found = ", ".join(rows[i]) or "(none)"
                raise DataError(
                    f"row {i} of {list(files)}: no text column {column!r} (columns: {found})"
                )
    return rows


def encode_responses(
    texts: Sequence[str], tokenizer: Any, *, max_tokens: int, eos_id: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Offline responses as right-padded tokens [N, max_tokens] and lengths [N].

    A complete response ends with `eos_id`, as a sampled one does; one longer than the budget
    is cut there without an EOS (SPEC §1).
    """
    tokens = np.full((len(texts), max_tokens), pad_id, np.int32)
    lengths = np.zeros((len(texts),), np.int32)
    for i, text in enumerate(texts):
        ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], eos_id][:max_tokens]
        tokens[i, : len(ids)], lengths[i] = ids, len(ids)
    return tokens, lengths


def _chat_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, Mapping):  # transformers >= 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def encode_prompts(
    rows: Sequence[dict],
    tokenizer: Any,
    *,
    column: str,
    max_tokens: int,
    overlong: str,
    system_prompt: str | None = None,
) -> tuple[list[list[int]], list[dict], dict[str, int]]:
    """Token ids of each prompt under the tokenizer's chat template, ready for generation.

    Each prompt becomes `[system turn,] user turn, assistant header` (add_generation_prompt).
    Prompts longer than `max_tokens` follow `overlong`:
      "drop": the prompt and its row are removed;
      "truncate": the LAST `max_tokens` tokens are kept, so the assistant header that cues the
        response survives (the start of the prompt, system turn included, is lost).
    Args:
      rows: dataset rows; `row[column]` is the prompt text.
      tokenizer: anything with transformers' `apply_chat_template`.
    Returns:
      (token_lists, kept_rows, stats): kept_rows[i] is the row of token_lists[i]; stats counts
      "prompts" (given), "kept", "dropped", "truncated", and "longest" (tokens, before the
      policy). Raises DataError when every prompt is dropped.
    """
    if overlong not in OVERLONG:
        raise DataError(f"overlong={overlong!r} is not one of: {', '.join(OVERLONG)}")
    if max_tokens <= 0:
        raise DataError(f"max_tokens={max_tokens} must be positive")
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    token_lists, kept, dropped, truncated, longest = [], [], 0, 0, 0
    for i, row in enumerate(rows):
        if column not in row:
            raise DataError(f"row {i} has no prompt column {column!r}; it has: {', '.join(row)}")
        ids = _chat_ids(tokenizer, [*system, {"role": "user", "content": row[column]}])
        longest = max(longest, len(ids))
        if len(ids) > max_tokens:
            if overlong == "drop":
                dropped += 1
                continue
            ids = ids[-max_tokens:]
            truncated += 1
        token_lists.append(ids)
        kept.append(row)
    if rows and not kept:
        raise DataError(
            f"all {len(rows)} prompts are longer than max_tokens={max_tokens} (longest "
            f"{longest}); raise the limit or truncate instead of dropping"
        )
    stats = {
        "prompts": len(rows),
        "kept": len(kept),
        "dropped": dropped,
        "truncated": truncated,
        "longest": longest,
    }
    return token_lists, kept, stats


def split_eval(rows: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train_rows, eval_rows): a seeded random `fraction` of rows held out, both kept in order.

    The same (rows, fraction, seed) always gives the same split; both parts are non-empty, so
    at least two rows are needed.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"eval fraction {fraction} is out of range (0, 1)")
    n = len(rows)
    if n < 2:
        raise DataError(f"cannot split {n} prompt(s) into train and eval sets; need at least 2")
    num_eval = min(n - 1, max(1, round(fraction * n)))
    held_out = np.zeros(n, bool)
    held_out[np.random.default_rng(seed).permutation(n)[:num_eval]] = True
    return (
        [r for r, h in zip(rows, held_out, strict=True) if not h],
        [r for r, h in zip(rows, held_out, strict=True) if h],
    )
