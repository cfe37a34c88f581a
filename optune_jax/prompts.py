"""The run's training and held-out prompts, read and tokenized once (design §4's prompt set)."""

from __future__ import annotations

import dataclasses
import functools

from optune_jax import data as data_lib
from optune_jax.run.errors import RunError
from optune_jax.run.schema import DataSection, RunConfig
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
    capped: str = ""  # "data.num_train_prompts=N but the files hold M" when it asked for more


def load_prompts(cfg: RunConfig, tokenizer, *, pair_files: bool) -> tuple[PromptSet, PromptSet]:
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
    caps = [_cap_note("data.num_train_prompts", d.num_train_prompts, len(rows)),
            _cap_note("data.num_eval_prompts", d.num_eval_prompts, len(eval_rows))]
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
    for name, split, cap in (("training", rows, caps[0]), ("held-out", eval_rows, caps[1])):
        ids, kept, stats = enc(split)
        if not ids:
            raise RunError(
                f"no {name} prompts left (files {list(d.train_files)}, "
                f"max_prompt_tokens={d.max_prompt_tokens}, overlong={d.overlong})"
            )
        sets.append(PromptSet(ids, kept, stats, share(ids), cap))
    return sets[0], sets[1]


def _cap_note(key: str, asked: int | None, available: int) -> str:
    if asked is None or asked <= available:
        return ""
    return f"{key}={asked} but the files hold {available} prompts: all {available} used"


def describe(train: PromptSet, held_out: PromptSet, d: DataSection) -> str:
    """One line for the console: the prompts used, and why any were dropped or cut."""
    line = functools.partial(data_lib.describe_prompts, max_tokens=d.max_prompt_tokens)
    caps = "".join(f"; {s.capped}" for s in (train, held_out) if s.capped)
    return (
        f"prompts: training {line(train.stats)}, held-out {line(held_out.stats)} "
        f"(data.max_prompt_tokens={d.max_prompt_tokens}, data.overlong={d.overlong}){caps}"
    )
