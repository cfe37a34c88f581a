"""The run's training and held-out prompts, read and tokenized once (SPEC §4's prompt set)."""

from __future__ import annotations

import dataclasses
import functools

from optune_jax import data as data_lib
from optune_jax.errors import RunError
from sampling import common_prefix


@dataclasses.dataclass
class PromptSet:
    """Token ids, source rows (every column kept) and `encode_prompts` stats of one split;
    `prefix`: the token prefix all its prompts share (fixed per set, so a prompt's samples
    do not depend on the prompts beside it), or () without `sampling.share_prefix`."""

    ids: list
    rows: list[dict]
    stats: dict
    prefix: tuple[int, ...] = ()


def load_prompts(cfg, tokenizer, *, pair_files: bool) -> tuple[PromptSet, PromptSet]:
    """(training, held-out) prompt sets. `pair_files`: training rows come from
    `data.offline_files` (prompt, chosen, rejected) instead of `data.train_files`."""
    d = cfg.data
    if pair_files:
        columns = (d.prompt_column, d.chosen_column, d.rejected_column)
        rows = data_lib.load_pair_rows(list(d.offline_files), columns)
    else:
        rows = data_lib.load_prompt_rows(list(d.train_files), d.prompt_column)
    if d.eval_files:
        eval_rows = data_lib.load_prompt_rows(list(d.eval_files), d.prompt_column)
    else:
        rows, eval_rows = data_lib.split_eval(rows, d.eval_fraction, cfg.run.seed)
    rows = rows[: d.num_train_prompts] if d.num_train_prompts else rows
    eval_rows = eval_rows[: d.num_eval_prompts] if d.num_eval_prompts else eval_rows
    enc = functools.partial(
        data_lib.encode_prompts,
        tokenizer=tokenizer,
        column=d.prompt_column,
        max_tokens=d.max_prompt_tokens,
        overlong=d.overlong,
        system_prompt=d.system_prompt,
    )
    share = common_prefix if cfg.sampling.share_prefix else lambda _: ()
    sets = []
    for name, split in (("training", rows), ("held-out", eval_rows)):
        ids, kept, stats = enc(split)
        if not ids:
            raise RunError(
                f"no {name} prompts left (files {list(d.train_files)}, "
                f"max_prompt_tokens={d.max_prompt_tokens}, overlong={d.overlong})"
            )
        sets.append(PromptSet(ids, kept, stats, share(ids)))
    return sets[0], sets[1]


def describe(train: PromptSet, held_out: PromptSet, d) -> str:
    """One line for the console: the prompts used, and why any were dropped or cut."""
    line = functools.partial(data_lib.describe_prompts, max_tokens=d.max_prompt_tokens)
    return (
        f"prompts: training {line(train.stats)}, held-out {line(held_out.stats)} "
        f"(data.max_prompt_tokens={d.max_prompt_tokens}, data.overlong={d.overlong})"
    )
