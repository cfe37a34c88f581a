"""Prompt data: rows of JSON(-lines) or parquet files, chat-templated token ids, a held-out split.

    rows = load_prompt_rows(["data/ifeval/train.jsonl"], "prompt")
    tokens, rows, stats = encode_prompts(rows, tokenizer, column="prompt", max_tokens=128,
                                         overlong="drop")

Rows are plain dicts and keep every column, because rewards read metadata from them (the IFEval
reward reads `constraints`). Errors a user can fix are one-line `DataError`s naming the file and,
numbered from 1, the line (JSON lines), item (a JSON array) or row (parquet).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from optune_jax.run.errors import RunError, describe_os_error, one_line

OVERLONG = ("drop", "truncate")
SUFFIXES = (".json", ".jsonl", ".parquet")  # .json(l) we parse ourselves, parquet via datasets
ID_COLUMN = "id"  # when prompt rows have it, its values must be unique


class DataError(RunError):
    """Prompt data that cannot be used; the message is one line naming the file or value."""


@dataclasses.dataclass
class Table:
    """The rows of one data file (every column kept; a row lacking a column has None there)
    and where each came from: `unit` "line" (JSON lines), "item" (a JSON array) or "row"
    (parquet, a hub dataset), numbered from 1."""

    name: str
    rows: list[dict]
    columns: list[str]
    unit: str
    numbers: list[int]

    def where(self, i: int) -> str:
        """`{file} line 12`: the place of row `i`, for messages."""
        return f"{self.name} {self.unit} {self.numbers[i]}"


def _read_json(path: Path, name: str) -> tuple[list[Any], str, list[int]]:
    """(values, unit, 1-based numbers) of a JSON array file or a JSON-lines file."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a BOM is no content
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{name} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column})"
        ) from None
    if text.lstrip().startswith("["):  # one JSON array of objects
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{name} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
            ) from None
        return values, "item", list(range(1, len(values) + 1))
    values, numbers = [], []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 is text
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{name} line {number}: not valid JSON ({e.msg} at column {e.colno})"
            ) from None
        numbers.append(number)
    return values, "line", numbers


def read_table(name: str) -> Table:
    """One data file (.json, .jsonl, .parquet) or, for a name without an extension that is no
    file, a hub dataset's "train" split. Raises DataError (one line, naming the file, and the
    1-based line for JSON) for a missing, unreadable, empty or malformed file."""
    path = Path(name)
    if path.is_dir():
        raise DataError(f"data file {name} is a directory, not a file")
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(
                f"unsupported data file {name!r}: extension must be one of {', '.join(SUFFIXES)}"
            )
        try:
            if path.stat().st_size == 0:
                raise DataError(f"data file is empty: {name}")
            if path.suffix.lower() == ".parquet":
                rows, unit, numbers = _read_datasets(name, path="parquet", data_files=[name])
            else:
                rows, unit, numbers = _read_json(path, name)
        except OSError as e:
            raise DataError(f"cannot read data file {name}: {describe_os_error(e)}") from None
    elif path.suffix or path.exists():
        raise DataError(f"data file not found: {name}")
    else:  # no such file and no extension: a hub dataset name, read where a network exists
        rows, unit, numbers = _read_datasets(name, path=name)
    for row, number in zip(rows, numbers, strict=True):
        if not isinstance(row, dict):
            raise DataError(f"{name} {unit} {number}: expected a JSON object, got {_kind(row)}")
    columns = list(dict.fromkeys(c for row in rows for c in row))
    rows = [{c: row.get(c) for c in columns} for row in rows]
    return Table(name, rows, columns, unit, numbers)


def _kind(value: Any) -> str:
    names = {list: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _read_datasets(name: str, **kwargs) -> tuple[list[dict], str, list[int]]:
    import datasets  # heavy import, kept off the module import path

    datasets.disable_progress_bars()  # a local file loads in milliseconds; keep stderr clean
    try:
        rows = datasets.load_dataset(**kwargs, split="train").to_list()
    except Exception as e:  # datasets raises many types, with multi-line messages
        raise DataError(f"cannot load data from {name!r}: {one_line(e)}") from None
    return rows, "row", list(range(1, len(rows) + 1))


def _text_rows(files: Sequence[str], column: str, what: str) -> list[tuple[str, dict]]:
    """(place, row) of every row of `files`, each with a string in `column`."""
    if isinstance(files, str):  # a lone path would otherwise be read character by character
        files = [files]
    out: list[tuple[str, dict]] = []
    for name in files:
        table = read_table(name)
        if not table.rows:
            raise DataError(f"no {what}s in {name}")
        if column not in table.columns:
            raise DataError(
                f"prompt column {column!r} not found in {name}; available columns: "
                f"{', '.join(table.columns) or '(none)'}"
            )
        for i, row in enumerate(table.rows):
            if not isinstance(row[column], str):
                raise DataError(
                    f"{table.where(i)}: {column!r} must be a string, got {_kind(row[column])}"
                )
            out.append((table.where(i), row))
    if not out:
        raise DataError(f"no {what} files given")
    return out


def load_prompt_rows(files: Sequence[str], column: str) -> list[dict]:
    """Every row of `files`, in order, as dicts (all columns kept).

    Args:
      files: paths ending in .json (an array or JSON lines), .jsonl or .parquet, or hub dataset
        names (no extension; their "train" split is read).
      column: the column holding the prompt text; every row must have a string there.
    Returns:
      the rows. Raises DataError, naming the file and the 1-based line (item, row), for a
      missing, unreadable, empty or malformed file, a missing column, a non-string prompt, an
      `id` that repeats one before it (in any of `files`), or no files. Empty prompts are kept
      here and dropped, counted, by `encode_prompts`.
    """
    rows, seen = [], {}
    for where, row in _text_rows(files, column, "prompt"):
        if row.get(ID_COLUMN) is not None:
            key = json.dumps(row[ID_COLUMN], sort_keys=True)
            if key in seen:
                raise DataError(f"{where}: {ID_COLUMN} {key} repeats {seen[key]}")
            seen[key] = where
        rows.append(row)
    return rows


def load_pair_rows(files: Sequence[str], columns: Sequence[str]) -> list[dict]:
    """Offline preference rows: `columns` = (prompt, chosen, rejected) text columns."""
    prompt, *responses = columns
    rows = []
    for where, row in _text_rows(files, prompt, "pair"):
        for column in responses:
            if not isinstance(row.get(column), str):
                found = ", ".join(c for c, v in row.items() if v is not None) or "(none)"
                raise DataError(f"{where}: no text column {column!r} (columns: {found})")
        rows.append(row)
    return rows


def encode_responses(
    texts: Sequence[str], tokenizer: Any, *, max_tokens: int, eos_id: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Offline responses as right-padded tokens [N, max_tokens] and lengths [N].

    A complete response ends with `eos_id`, as a sampled one does; one longer than the budget
    is cut there without an EOS (design §1).
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
    Empty (or blank) prompts are dropped and counted. Prompts longer than `max_tokens` follow
    `overlong`:
      "drop": the prompt and its row are removed;
      "truncate": the LAST `max_tokens` tokens are kept, so the assistant header that cues the
        response survives (the start of the prompt, system turn included, is lost).
    Args:
      rows: dataset rows; `row[column]` is the prompt text.
      tokenizer: anything with transformers' `apply_chat_template`.
    Returns:
      (token_lists, kept_rows, stats): kept_rows[i] is the row of token_lists[i]; stats counts
      "prompts" (given), "kept", "empty" (dropped), "dropped" (for length), "truncated", and
      "longest" (tokens, before the policy). Raises DataError when every prompt is dropped.
    """
    if overlong not in OVERLONG:
        raise DataError(f"overlong={overlong!r} is not one of: {', '.join(OVERLONG)}")
    if max_tokens <= 0:
        raise DataError(f"max_tokens={max_tokens} must be positive")
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    token_lists, kept, empty, dropped, truncated, longest = [], [], 0, 0, 0, 0
    for i, row in enumerate(rows):
        if column not in row:
            raise DataError(
                f"row {i + 1} has no prompt column {column!r}; it has: {', '.join(row)}"
            )
        if not row[column].strip():  # nothing to answer; a chat template would hide that
            empty += 1
            continue
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
    if rows and not kept and not dropped:
        raise DataError(f"all {len(rows)} prompts are empty")
    if rows and not kept:
        some_empty = f"empty ({empty}) or " if empty else ""
        raise DataError(
            f"all {len(rows)} prompts are {some_empty}longer than max_tokens={max_tokens} "
            f"(longest {longest}); raise the limit or truncate instead of dropping"
        )
    stats = {
        "prompts": len(rows),
        "kept": len(kept),
        "empty": empty,
        "dropped": dropped,
        "truncated": truncated,
        "longest": longest,
    }
    return token_lists, kept, stats


def describe_prompts(stats: dict[str, int], *, max_tokens: int) -> str:
    """`kept of given` and why the others are not used or were cut, from `encode_prompts`'s
    stats, e.g. "60 of 64 (3 longer than 96 tokens with the chat template dropped, 1 empty
    dropped)"."""
    why = []
    if stats["dropped"]:
        why.append(
            f"{stats['dropped']} longer than {max_tokens} tokens with the chat template dropped "
            f"(longest {stats['longest']})"
        )
    if stats["truncated"]:
        why.append(f"{stats['truncated']} longer than {max_tokens} tokens cut to their last ones")
    if stats["empty"]:
        why.append(f"{stats['empty']} empty dropped")
    return f"{stats['kept']} of {stats['prompts']}" + (f" ({', '.join(why)})" if why else "")


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
