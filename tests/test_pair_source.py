"""optune_jax.pair_source (design §4 steps 1-6, `run.mode`): where each iteration's pairs come
from, checked against a brute-force pure-Python model with a fake generator and a fake reward
(no model, no tokenizer files)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from optune_jax import data as data_lib
from optune_jax.components import Policy
from optune_jax.pair_source import FilePairs, SampledPairs, make_source, pairs_from_file
from optune_jax.prompts import PromptSet
from optune_jax.run.config_file import load_config
from optune_jax.run.errors import RunError
from sampling import Generation

EOS, PAD, FILLER = 2, 1, 7  # FILLER: the token an unfinished response goes on with
P, L = 10, 8  # prompts, data.max_prompt_tokens
SMALL = [
    f"data.num_train_prompts={P}",
    "data.num_eval_prompts=4",
    f"data.max_prompt_tokens={L}",
    "sampling.batch_size=16",
    "train.batch_size=8",
    "train.micro_batch_size=4",
    "train.epochs=1",
]
PROMPTS = [[10 + i] * (1 + i % 4) + [60 + i] for i in range(P)]  # 2..5 tokens, distinct


def _config(*extra):
    return load_config("configs/tiny.yaml", [*SMALL, *extra])


def _policy(tokenizer=None):
    return Policy(config=None, tokenizer=tokenizer, eos_ids=(EOS,), pad_id=PAD)


def _prompt_set(rows=None):
    rows = rows or [{"prompt": f"p{i}", "i": i} for i in range(P)]
    return PromptSet(ids=[list(p) for p in PROMPTS[: len(rows)]], rows=rows, stats={})


def _response(t: int, i: int, j: int, finished: bool, y: int) -> list[int]:
    """The j-th sample of prompt i at iteration t: it names (t, i, j) in its first tokens, then
    EOS (finished) or FILLER up to the budget y (cut without EOS)."""
    head = [100 + t, 110 + i, 130 + j]
    return [*head, EOS] if finished else head + [FILLER] * (y - len(head))


class FakeGenerator:
    """Generator-shaped: S responses per prompt from the tables of finished flags; records
    every call."""

    def __init__(self, finished, y: int, prompts: PromptSet):
        self.finished, self.y, self.prompts, self.calls = finished, y, prompts, []

    def __call__(self, params, prompts, ids, *, seed, iteration, num_samples, desc, prefix,
                 **override):
        ids = [int(i) for i in ids]
        assert [list(p) for p in prompts] == [self.prompts.ids[i] for i in ids]
        self.calls.append(dict(params=params, ids=ids, seed=seed, iteration=iteration,
                               num_samples=num_samples, prefix=prefix))
        n, s, t = len(ids), num_samples, iteration
        tokens = np.full((n, s, self.y), PAD, np.int32)
        lengths = np.zeros((n, s), np.int32)
        fin = np.zeros((n, s), bool)
        for a, i in enumerate(ids):
            for j in range(s):
                fin[a, j] = self.finished[t][i][j]
                r = _response(t, i, j, fin[a, j], self.y)
                tokens[a, j, : len(r)], lengths[a, j] = r, len(r)
        return Generation(tokens, lengths, fin, np.zeros((n, s, self.y), np.float32),
                          tokens_generated=int(lengths.sum()), max_cache_bytes=0, shapes=set(),
                          compile_seconds=0.25)


class FakeScorer:
    """`score_parts` reading (t, i, j) back from each response and returning the hand-set
    reward of the table; its one component is the response length."""

    def __init__(self, rewards):
        self.rewards, self.calls = rewards, 0

    def score_parts(self, rows, tokens_NSY, lengths_NS):
        self.calls += 1
        n, s = lengths_NS.shape
        out = np.zeros((n, s), np.float32)
        for a in range(n):
            for j in range(s):
                t, i, jj = (int(x) for x in tokens_NSY[a, j, :3] - [100, 110, 130])
                assert rows[a]["i"] == i and jj == j  # rows in the order of the responses
                out[a, j] = self.rewards[t][i][j]
        return out, {"length": lengths_NS.astype(np.float32)}


def _tables(s: int, iterations: int, seed: int = 0):
    """Rewards [t][i][j], multiples of 0.25 all distinct (so ranking keys never tie, also with
    a penalty of an odd multiple of 0.125), and finished flags; prompt 2 ties at t = 0 and
    prompt 7 (lowest at t = 0, so selected at t = 1) ties at t = 1."""
    rng = np.random.default_rng(seed)
    values = rng.permutation(iterations * P * s).reshape(iterations, P, s) * 0.25
    rewards = values.tolist()
    finished = (rng.random((iterations, P, s)) < 0.7).tolist()
    rewards[0][2] = [rewards[0][2][0]] * s
    finished[0][2] = [True] * s
    rewards[0][7] = [-10.0 - j for j in range(s)]
    rewards[1][7] = [-20.0] * s
    finished[1][7] = [True] * s
    return rewards, finished


def _brute_force(rewards, finished, *, s, y, penalty, n_sel, every_iteration, truncated):
    """Per iteration: (selected prompts, expected D_t rows/rewards/mask/prompt idx, record),
    by steps 1-6 of design §4 in plain Python."""
    pool = [None] * P  # per prompt: (responses, rewards, finished, iteration)
    for t in range(len(rewards)):
        if t == 0:
            sel = list(range(P))
        elif not every_iteration:
            sel = []
        else:
            key = {i: max(pool[i][1]) for i in range(P)}
            sel = sorted(sorted(range(P), key=lambda i: key[i])[:n_sel])
        spreads = []
        for i in sel:
            r = [rewards[t][i][j] - (0 if finished[t][i][j] else penalty) for j in range(s)]
            best = next(j for j in range(s) if r[j] == max(r))
            others = [j for j in range(s) if j != best]
            worst = next(j for j in others if r[j] == min(r[k] for k in others))
            a, b = sorted([best, worst])
            pool[i] = (
                [_response(t, i, j, finished[t][i][j], y) for j in (a, b)],
                [r[a], r[b]],
                [finished[t][i][j] for j in (a, b)],
                t,
            )
            spreads.append(max(r) - min(r))
        idx = [i for i in range(P) if pool[i][1][0] != pool[i][1][1]]
        tokens, attn, resp, pair_rewards, mask = [], [], [], [], []
        for i in idx:
            responses, r, fin, _ = pool[i]
            order = (0, 1) if r[0] > r[1] else (1, 0)
            rows = [[], [], []]
            for side in order:
                pre = [PAD] * (L - len(PROMPTS[i])) + PROMPTS[i]
                res = responses[side] + [PAD] * (y - len(responses[side]))
                rows[0].append(pre + res)
                on = [1] * len(responses[side]) + [0] * (y - len(responses[side]))
                rows[1].append([0] * (L - len(PROMPTS[i])) + [1] * len(PROMPTS[i]) + on)
                rows[2].append([0] * L + on)
            for k, rows_k in enumerate(rows):
                (tokens, attn, resp)[k].append(rows_k)
            pair_rewards.append([r[order[0]], r[order[1]]])
            mask.append(truncated == "keep" or all(fin))
        new = [i for i in range(P) if pool[i][3] == t]
        kept = [i for i in range(P) if pool[i][3] != t]
        mean_pair = lambda ids: (sum((pool[i][1][0] + pool[i][1][1]) / 2 for i in ids) / len(ids)
                                 if ids else math.nan)
        lengths = [len(_response(t, i, j, finished[t][i][j], y)) for i in sel for j in range(s)]
        record = {
            "prompts_regenerated": len(sel),
            "responses_generated": s * len(sel),
            "tokens_generated": sum(lengths),
            "pairs": len(idx),
            "pairs_dropped_ties": P - len(idx),
            "pairs_dropped_truncated": mask.count(False),
            "reward_new": mean_pair(new),
            "reward_kept": mean_pair(kept),
            "responses_finished": (sum(finished[t][i][j] for i in sel for j in range(s))
                                   / (s * len(sel)) if sel else math.nan),
            "reward_spread_new": sum(spreads) / len(spreads) if spreads else math.nan,
        }
        if sel:
            record["reward_new.length"] = sum(lengths) / len(lengths)
        expect = dict(tokens=tokens, attn=attn, resp=resp, rewards=pair_rewards, mask=mask,
                      idx=idx)
        yield t, sel, expect, record


def _check_record(got: dict, want: dict):
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, float) and math.isnan(v):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(v, abs=1e-6), k


def _check_batch(batch, prompt_idx, expect, y):
    q = len(expect["idx"])
    np.testing.assert_array_equal(prompt_idx, expect["idx"])
    for name in ("tokens", "attn", "resp"):
        got = np.asarray(getattr(batch, name))
        assert got.shape == (q, 2, L + y), name
        np.testing.assert_array_equal(got, np.array(expect[name]).reshape(q, 2, L + y), name)
    np.testing.assert_array_equal(batch.rewards, np.array(expect["rewards"]).reshape(q, 2))
    np.testing.assert_array_equal(batch.pair_mask, expect["mask"])
    np.testing.assert_array_equal(batch.ref_logps, np.zeros((q, 2)))


@pytest.mark.parametrize(
    "s, permille, penalty, truncated",
    [(3, 300, 0.375, "keep"), (2, 500, 0.0, "drop"), (4, 300, 0.125, "drop")],
)
def test_sampled_pairs_follow_steps_1_to_6(s, permille, penalty, truncated):
    """OPTune over 3 iterations: all prompts at t = 0, then the ceil(ρ·P) lowest pool rewards
    regenerated; best vs worst of S after the missing-EOS penalty; ties and (with
    truncated=drop) unfinished pairs dropped; batch rows and record as the brute force."""
    y = 6
    cfg = _config(f"sampling.num_samples={s}", f"optune.rho={permille / 1000}",
                  f"reward.missing_eos_penalty={penalty}", f"sampling.truncated={truncated}",
                  f"sampling.max_new_tokens={y}", "run.seed=3")
    rewards, finished = _tables(s, 3)
    prompts = _prompt_set()
    gen, scorer = FakeGenerator(finished, y, prompts), FakeScorer(rewards)
    source = make_source(cfg, _policy(), prompts, gen, scorer)
    assert type(source) is SampledPairs and source.every_iteration
    n_sel = -(-permille * P // 1000)
    for t, sel, expect, want in _brute_force(rewards, finished, s=s, y=y, penalty=penalty,
                                            n_sel=n_sel, every_iteration=True,
                                            truncated=truncated):
        timers = {}
        pi_t = f"pi_{t}"
        batch, prompt_idx, record = source.pairs(t, pi_t, timers)
        call = gen.calls[-1]
        assert call["ids"] == sel and len(sel) == (P if t == 0 else n_sel)
        assert (call["params"], call["iteration"], call["num_samples"], call["seed"]) == (
            pi_t, t, s, 3)
        assert timers["generation_compile"] == 0.25 and timers["generation"] >= 0
        _check_batch(batch, prompt_idx, expect, y)
        _check_record(record, want)
    assert len(gen.calls) == scorer.calls == 3


def test_selection_takes_the_lowest_rewards_at_t1():
    """At t = 1 exactly ceil(0.3·10) = 3 prompts are regenerated, those with the lowest
    max(r1, r2) in the pool (hand-set rewards), and the others keep their pair."""
    s, y = 2, 4
    # t = 0 rewards per prompt (r1, r2); keys (max): 3, 9, 1, 8, 7, 2, 6, 5, 4, 0.5
    r0 = [[3, 1], [9, 0], [1, 0.5], [2, 8], [7, 7], [2, 0], [6, 5], [5, 4.5], [4, 0],
          [0.5, 0.25]]
    rewards = [r0, [[-1.0, 1.0]] * P]
    finished = [[[True] * s] * P] * 2
    cfg = _config("sampling.num_samples=2", "optune.rho=0.3", f"sampling.max_new_tokens={y}")
    prompts = _prompt_set()
    gen = FakeGenerator(finished, y, prompts)
    source = make_source(cfg, _policy(), prompts, gen, FakeScorer(rewards))
    source.pairs(0, "pi_0", {})
    _, prompt_idx, record = source.pairs(1, "pi_1", {})
    assert gen.calls[1]["ids"] == [2, 5, 9]  # keys 1, 2, 0.5: the three lowest
    assert record["prompts_regenerated"] == 3 and record["responses_generated"] == 6
    # prompt 4 ties at t = 0 (7 vs 7) and is kept, so it stays out of D_1
    assert record["pairs"] == 9 and record["pairs_dropped_ties"] == 1
    np.testing.assert_array_equal(prompt_idx, [0, 1, 2, 3, 5, 6, 7, 8, 9])
    assert record["reward_new"] == pytest.approx(0.0)
    kept = [0, 1, 3, 4, 6, 7, 8]
    assert record["reward_kept"] == pytest.approx(np.mean([np.mean(r0[i]) for i in kept]))
    np.testing.assert_array_equal(source.pool.iteration_P, [0, 0, 1, 0, 0, 1, 0, 0, 0, 1])


def test_missing_eos_penalty_picks_the_best_and_worst():
    """The penalty is subtracted from unfinished responses before best vs worst: S = 3 rewards
    (5, 4, 3) with sample 0 unfinished and penalty 2.5 keep samples 1 (best, 4) and 0 (worst,
    2.5); the pair's rewards are the penalised ones."""
    s, y = 3, 5
    rewards = [[[5.0, 4.0, 3.0]] + [[1.0, 0.0, 0.5]] * (P - 1)]
    finished = [[[False, True, True]] + [[True] * s] * (P - 1)]
    cfg = _config("sampling.num_samples=3", "reward.missing_eos_penalty=2.5",
                  f"sampling.max_new_tokens={y}")
    prompts = _prompt_set()
    source = make_source(cfg, _policy(), prompts, FakeGenerator(finished, y, prompts),
                         FakeScorer(rewards))
    batch, prompt_idx, record = source.pairs(0, "pi_0", {})
    assert prompt_idx[0] == 0
    np.testing.assert_array_equal(batch.rewards[0], [4.0, 2.5])
    np.testing.assert_array_equal(batch.tokens[0, 0, L : L + 4], [100, 110, 131, EOS])
    np.testing.assert_array_equal(batch.tokens[0, 1, L:], [100, 110, 130, FILLER, FILLER])
    np.testing.assert_array_equal(batch.rewards[1], [1.0, 0.0])  # samples 0 and 1 of (1, 0, .5)
    assert record["reward_spread_new"] == pytest.approx((1.5 + 9 * 1.0) / P)
    assert record["responses_finished"] == pytest.approx(29 / 30)


def test_offline_mode_samples_only_at_t0_and_keeps_every_pair():
    """run.mode=offline without offline_files: D_0 sampled from π_0 (all prompts), later
    iterations generate nothing and return the same pairs, all kept."""
    s, y = 2, 6
    cfg = _config("run.mode=offline", "loss.name=dpo", f"sampling.max_new_tokens={y}",
                  "reward.missing_eos_penalty=0.375")
    rewards, finished = _tables(s, 3, seed=1)
    prompts = _prompt_set()
    gen, scorer = FakeGenerator(finished, y, prompts), FakeScorer(rewards)
    source = make_source(cfg, _policy(), prompts, gen, scorer)
    assert type(source) is SampledPairs and not source.every_iteration
    expected = list(_brute_force(rewards, finished, s=s, y=y, penalty=0.375, n_sel=P,
                                 every_iteration=False, truncated="keep"))
    assert [sel for _, sel, _, _ in expected] == [list(range(P)), [], []]
    for t, _, expect, want in expected:
        batch, prompt_idx, record = source.pairs(t, f"pi_{t}", {})
        _check_batch(batch, prompt_idx, expect, y)
        _check_record(record, want)
        assert all(not c["ids"] for c in gen.calls[1:])  # nothing generated after t = 0
    assert scorer.calls == 1
    assert expected[1][3]["reward_kept"] == pytest.approx(expected[0][3]["reward_new"])


class CharTokenizer:
    """One id per character (its code point)."""

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}


class Forbidden:
    """A generator / scorer that must not be used."""

    def __call__(self, *a, **k):
        raise AssertionError("generated")

    score_parts = __call__


def _pair_file(tmp_path):
    rows = [
        {"question": "q0", "good": "ab", "bad": "c"},
        {"question": "q1", "good": "d", "bad": "efghij"},  # 6 chars + EOS: cut at 5, no EOS
        {"question": "q2", "good": "xy", "bad": "xy"},  # same text: still one pair, 1 vs 0
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_file_pairs_one_pair_per_row_rewards_1_0_nothing_generated(tmp_path):
    """FilePairs: each row of data.offline_files is one pair (its chosen/rejected columns),
    chosen reward 1.0, rejected 0.0, responses + EOS cut at the budget; same batch every
    iteration and a record with nothing generated."""
    path = _pair_file(tmp_path)
    cfg = _config("run.mode=offline", "loss.name=dpo", f"data.offline_files=[{path}]",
                  "data.prompt_column=question", "data.chosen_column=good",
                  "data.rejected_column=bad", "sampling.max_new_tokens=5")
    rows = data_lib.load_pair_rows([str(path)], ("question", "good", "bad"))
    prompts = _prompt_set(rows)
    source = make_source(cfg, _policy(CharTokenizer()), prompts, Forbidden(), Forbidden())
    assert type(source) is FilePairs
    chosen = [[97, 98, EOS, PAD, PAD], [100, EOS, PAD, PAD, PAD], [120, 121, EOS, PAD, PAD]]
    rejected = [[99, EOS, PAD, PAD, PAD], [101, 102, 103, 104, 105], [120, 121, EOS, PAD, PAD]]
    lengths = [[3, 2], [2, 5], [3, 3]]
    for t in range(3):
        timers = {}
        batch, prompt_idx, record = source.pairs(t, f"pi_{t}", timers)
        np.testing.assert_array_equal(prompt_idx, [0, 1, 2])
        np.testing.assert_array_equal(batch.tokens[:, 0, L:], chosen)
        np.testing.assert_array_equal(batch.tokens[:, 1, L:], rejected)
        np.testing.assert_array_equal(batch.resp[:, :, L:].sum(-1), lengths)
        for q in range(3):  # the prompt left-padded before the responses
            p = PROMPTS[q]
            np.testing.assert_array_equal(batch.tokens[q, :, :L],
                                          [[PAD] * (L - len(p)) + p] * 2)
            np.testing.assert_array_equal(batch.attn[q, :, :L],
                                          [[0] * (L - len(p)) + [1] * len(p)] * 2)
        np.testing.assert_array_equal(batch.rewards, [[1.0, 0.0]] * 3)
        np.testing.assert_array_equal(batch.pair_mask, [True] * 3)
        assert record == {"prompts_regenerated": 0, "responses_generated": 0,
                          "tokens_generated": 0, "pairs": 3, "pairs_dropped_ties": 0}


def test_make_source_by_mode(tmp_path):
    """make_source: optune samples every iteration (offline_files ignored), offline / hypo
    without files sample D_0 once, offline / hypo with files read them."""
    path = _pair_file(tmp_path)
    files = f"data.offline_files=[{path}]"
    prompts = _prompt_set([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3)
    cases = [
        ((), SampledPairs, True),
        ((files,), SampledPairs, True),
        (("run.mode=offline", "loss.name=dpo"), SampledPairs, False),
        (("run.mode=offline", "loss.name=ipo", files), FilePairs, None),
        (("run.mode=hypo", "loss.name=hypo"), SampledPairs, False),
        (("run.mode=hypo", "loss.name=hypo", files), FilePairs, None),
    ]
    for overrides, kind, every in cases:
        cfg = _config("sampling.max_new_tokens=4", *overrides)
        source = make_source(cfg, _policy(CharTokenizer()), prompts, Forbidden(), Forbidden())
        assert type(source) is kind, overrides
        if every is not None:
            assert source.every_iteration is every, overrides


FILES = "data.offline_files=[pairs.jsonl]"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (("run.mode=optune", "loss.name=dpo"), False),
        (("run.mode=optune", "loss.name=wdpo", FILES, "sampling.num_samples=3"), False),
        (("run.mode=offline", "loss.name=wdpo"), False),  # D_0 sampled: it has rewards
        (("run.mode=offline", "loss.name=hinge", FILES), True),
        (("run.mode=hypo", "loss.name=hypo"), False),
        (("run.mode=hypo", "loss.name=hypo", FILES), True),
        (("run.mode=optune", "loss.name=hypo"),
         "loss.name=hypo does not fit run.mode=optune; allowed: dpo, wdpo, ipo, hinge"),
        (("run.mode=offline", "loss.name=hypo"),
         "loss.name=hypo does not fit run.mode=offline; allowed: dpo, wdpo, ipo, hinge"),
        (("run.mode=offline", "loss.name=wdpo", FILES),
         "loss.name=wdpo does not fit run.mode=offline; allowed: dpo, ipo, hinge"),
        (("run.mode=hypo", "loss.name=dpo"),
         "loss.name=dpo does not fit run.mode=hypo; allowed: hypo"),
        (("run.mode=hypo", "loss.name=dpo", FILES),
         "loss.name=dpo does not fit run.mode=hypo; allowed: hypo"),
        (("run.mode=offline", "loss.name=dpo", FILES, "sampling.num_samples=3"),
         "sampling.num_samples=3 has no effect on pairs from data.offline_files; allowed: 2"),
        (("run.mode=hypo", "loss.name=hypo", FILES, "sampling.num_samples=4"),
         "sampling.num_samples=4 has no effect on pairs from data.offline_files; allowed: 2"),
    ],
)
def test_pairs_from_file_fits_mode_loss_and_samples(overrides, expected):
    """pairs_from_file: True only for offline / hypo with offline_files; a loss that does not
    fit run.mode (design §2's table) or num_samples != 2 with file pairs is a one-line
    RunError."""
    cfg = _config(*overrides)
    if isinstance(expected, bool):
        assert pairs_from_file(cfg) is expected
        return
    with pytest.raises(RunError) as info:
        pairs_from_file(cfg)
    assert str(info.value) == expected
