"""Reward-model data: preference pairs read through `datasets`, chat-templated, in bucketed batches.

    pairs = load_preference_pairs(["pairs.jsonl"], PairColumns())
    chosen, rejected, stats = encode_pairs(pairs, tokenizer, max_tokens=256)

A row holds a preferred (chosen) and a dispreferred (rejected) answer, in one of two formats:
- text: `prompt`, `chosen`, `rejected` strings (the prompt is the user turn, answers the
  assistant turn);
- chat: `chosen` and `rejected` lists of {role, content} messages, whole conversations or
  only the answer turns, in which case a `prompt` column (text or messages) is prepended.
Every conversation is encoded with the tokenizer's chat template as one sequence; the reward is
read at its last token, so an overlong one keeps its LAST `max_tokens` tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from optune_jax.batch import ScoredPairBatch
from optune_jax.data import DataError, read_table
from sampling.batching import bucket, length_buckets

Messages = list[dict[str, str]]
SMALLEST_LENGTH = 16  # shortest length bucket


@dataclasses.dataclass(frozen=True)
class PairColumns:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


def _messages(value: Any, where: str) -> Messages:
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, Mapping)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not ok:
        raise DataError(
            f"{where} must be text or a non-empty list of {{role, content}} messages, "
            f"got {str(value)[:60]!r}"
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _turns(value: Any, role: str, where: str) -> Messages:
    """Text as one `role` turn, or a message list as it is."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, where)


def load_preference_pairs(
    files: Sequence[str], columns: PairColumns = PairColumns()
) -> list[tuple[Messages, Messages]]:
    """(chosen conversation, rejected conversation) of every row of `files`, in order.

    Raises DataError (one line, naming the file and the 1-based line or row) for an
    unreadable file, a missing column, or a value that is neither text nor a list of messages.
    """
    if isinstance(files, str):
        files = [files]
    pairs = []
    for name in files:
        table = read_table(name)
        have = table.columns
        for column in (columns.chosen, columns.rejected):
            if column not in have:
                raise DataError(
                    f"preference file {name} has no column {column!r}; columns: "
                    f"{', '.join(have) or '(none)'}"
                )
        for i, row in enumerate(table.rows):
            where = table.where(i)
            texts = [isinstance(row[c], str) for c in (columns.chosen, columns.rejected)]
            prompt: Messages = []
            if columns.prompt in have and row[columns.prompt] is not None:
                prompt = _turns(row[columns.prompt], "user", f"{where}: {columns.prompt!r}")
            elif any(texts):
                raise DataError(
                    f"{where}: text answers need a prompt column {columns.prompt!r}; columns: "
                    f"{', '.join(have)}"
                )
            chosen, rejected = (
                prompt + _turns(row[c], "assistant", f"{where}: {c!r}")
                for c in (columns.chosen, columns.rejected)
            )
            pairs.append((chosen, rejected))
    if not pairs:
        raise DataError(f"no preference pairs in {list(files)}")
    return pairs


def conversation(prompt: str, response: str) -> Messages:
    """The conversation a reward model scores: user turn `prompt`, assistant turn `response`."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def encode_conversation(tokenizer: Any, messages: Messages) -> list[int]:
    """Chat-template token ids of a whole conversation (no generation prompt)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    if isinstance(ids, Mapping):  # transformers >= 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def encode_pairs(
    pairs: Sequence[tuple[Messages, Messages]], tokenizer: Any, *, max_tokens: int
) -> tuple[list[list[int]], list[list[int]], dict[str, int]]:
    """(chosen ids, rejected ids, stats): stats counts "pairs", "truncated" and "longest"."""
    chosen, rejected, truncated, longest = [], [], 0, 0
    for c, r in pairs:
        full = [encode_conversation(tokenizer, m) for m in (c, r)]
        longest = max(longest, *map(len, full))
        truncated += any(len(ids) > max_tokens for ids in full)
        chosen.append(full[0][-max_tokens:])
        rejected.append(full[1][-max_tokens:])
    return chosen, rejected, {"pairs": len(pairs), "truncated": truncated, "longest": longest}


# ------------------------------------------------------------------------------- batches
def pad_rows(
    token_lists: Sequence[Sequence[int]], *, rows: int, length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded tokens and mask [rows, length]; filler rows hold one real pad token."""
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    mask[len(token_lists) :, 0] = 1  # keeps filler rows well defined; their scores are dropped
    for i, ids in enumerate(token_lists):
        tokens[i, : len(ids)], mask[i, : len(ids)] = ids, 1
    return tokens, mask


def length_bucket(longest: int, max_len: int) -> int:
    """The power-of-two length (at least 16, at most `max_len`) that holds `longest` tokens."""
    return bucket(longest, length_buckets(max_len, smallest=min(SMALLEST_LENGTH, max_len)))


def scoring_batches(
    token_lists: Sequence[Sequence[int]], *, batch_size: int, max_len: int, pad_id: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(indices, tokens_BT, mask_BT) over `token_lists` sorted by length, so a run compiles a
    handful of shapes: rows and length are padded to powers of two."""
    lens = np.array([len(ids) for ids in token_lists])
    order = np.argsort(lens, kind="stable")
    row_sizes = length_buckets(batch_size, smallest=1)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = bucket(len(idx), row_sizes)
        length = length_bucket(int(lens[idx].max()), max_len)
        yield idx, *pad_rows([token_lists[i] for i in idx], rows=rows, length=length, pad_id=pad_id)


def score_all(
    score_fn,
    params,
    token_lists: Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_len: int,
    pad_id: int,
) -> np.ndarray:
    """float32 [N]: `score_fn(params, tokens_BT, mask_BT)` of every sequence, in input order."""
    out = np.zeros((len(token_lists),), np.float32)
    for idx, tokens, mask in scoring_batches(
        token_lists, batch_size=batch_size, max_len=max_len, pad_id=pad_id
    ):
        out[idx] = np.asarray(score_fn(params, tokens, mask))[: len(idx)]
    return out


def pair_batch(
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    idx: np.ndarray,
    *,
    batch_size: int,
    micro_batch_size: int,
    max_len: int,
    pad_id: int,
) -> ScoredPairBatch:
    """One training batch [A, M] of pairs `idx` (filled up to `batch_size` with masked pairs),
    A = batch_size / micro_batch_size micro-batches of M pairs."""
    rows = [ids for i in idx for ids in (chosen[i], rejected[i])]
    length = length_bucket(max(map(len, rows)), max_len)
    tokens, mask = pad_rows(rows, rows=2 * batch_size, length=length, pad_id=pad_id)
    a, m = batch_size // micro_batch_size, micro_batch_size
    pair_mask = np.arange(batch_size) < len(idx)
    return ScoredPairBatch(
        tokens.reshape(a, m, 2, length), mask.reshape(a, m, 2, length), pair_mask.reshape(a, m)
    )
