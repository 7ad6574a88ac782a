"""Evaluation metrics on tiny real models: loss, answers cache, win rate, grading."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from montessori.evaluation.answers import (Conversation, DecodeSettings, conversations_from_pairs, generate_answers,
                                           read_questions)
from montessori.evaluation.judge import HFJudge, parse_preference, parse_rating
from montessori.evaluation.loss import difference, example_losses, reference_answer_loss, summarize
from montessori.evaluation.winrate import Judgement, grade_answers, grade_summary, judge_pairs, win_rate
from montessori.errors import InputError
from montessori.models.chat import encode_example, user_turn
from montessori.readers import read_pairs


@pytest.fixture(scope="module")
def pairs():
    return read_pairs("builtin", limit=10).records


# ---------------------------------------------------------------------------------------------
# Reference-answer loss


def direct_token_mean(model, tokenizer, pairs, max_length):
    """The definition, written out: one example at a time, full logits, shifted cross-entropy."""
    total, count = 0.0, 0
    with torch.no_grad():
        for p in pairs:
            ids, labels = encode_example(tokenizer, user_turn(p.instruction), p.response, max_length=max_length)
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
            target = torch.tensor(labels[1:])
            total += float(F.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / count


def test_loss_equals_direct_computation_and_ignores_batch_size(tiny_model, pairs):
    model, tokenizer = tiny_model
    pairs = pairs[:6]
    expected = direct_token_mean(model, tokenizer, pairs, 192)
    for batch_size in (1, 4):
        summary, losses = reference_answer_loss(model, tokenizer, pairs, batch_size=batch_size, max_length=192)
        assert summary["token_mean"] == pytest.approx(expected, rel=1e-6)
        assert summary["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
        assert summary["token_mean_low"] <= summary["token_mean"] <= summary["token_mean_high"]
    assert [e.id for e in losses] == [p.id for p in pairs]  # input order, whatever the length sorting
    per_example = [e.loss_sum / e.tokens for e in losses]
    assert summary["example_mean"] == pytest.approx(np.mean(per_example), rel=1e-9)
    assert summary["tokens"] == sum(e.tokens for e in losses)


def test_loss_drops_after_training_on_the_answers(tiny_model, pairs):
    """The metric measures what it claims: a student trained on the answers predicts them better."""
    model, tokenizer = tiny_model
    before = example_losses(model, tokenizer, pairs[:4], max_length=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(3):
        for p in pairs[:4]:
            ids, labels = encode_example(tokenizer, user_turn(p.instruction), p.response, max_length=128)
            loss = model(torch.tensor([ids]), labels=torch.tensor([labels])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    after = example_losses(model, tokenizer, pairs[:4], max_length=128)
    diff = difference(after, before, samples=300)
    assert diff["token_mean_diff"] < 0 and diff["high"] < 0  # significantly better, paired interval below 0
    same = difference(before, before, samples=300)
    assert same["token_mean_diff"] == 0 and same["low"] == same["high"] == 0


def test_the_example_mean_difference_weighs_every_example_the_same():
    """One long answer A predicts better, nine short ones it predicts worse: the token mean says A is
    better, the example mean says B is; each equals its obvious definition."""
    from montessori.evaluation.loss import ExampleLoss
    a = [ExampleLoss("long", 1.0 * 1000, 1000)] + [ExampleLoss(f"s{i}", 3.0 * 10, 10) for i in range(9)]
    b = [ExampleLoss("long", 2.0 * 1000, 1000)] + [ExampleLoss(f"s{i}", 2.5 * 10, 10) for i in range(9)]
    a.append(ExampleLoss("empty", 0.0, 0))  # no response token in A: not part of the example mean
    b.append(ExampleLoss("empty", 5.0, 2))
    d = difference(a, b, samples=400)
    slow_token = sum(e.loss_sum for e in a) / sum(e.tokens for e in a) - sum(e.loss_sum for e in b) / sum(
        e.tokens for e in b)
    slow_example = sum(x.loss_sum / x.tokens - y.loss_sum / y.tokens for x, y in zip(a, b) if x.tokens and y.tokens) / 10
    assert d["token_mean_diff"] == pytest.approx(slow_token) and d["token_mean_diff"] < 0
    assert d["example_mean_diff"] == pytest.approx(slow_example) and d["example_mean_diff"] > 0
    assert d["example_low"] <= d["example_mean_diff"] <= d["example_high"]
    assert d["a_better_examples"] == pytest.approx(0.1)


def test_example_without_response_tokens_is_counted_not_averaged(tiny_model, pairs):
    model, tokenizer = tiny_model
    losses = example_losses(model, tokenizer, pairs[:3], max_length=40)  # prompts fill 40 tokens
    assert all(e.tokens == 0 for e in losses)
    summary = summarize(losses + example_losses(model, tokenizer, pairs[:3], max_length=256), samples=50)
    assert summary["examples_without_tokens"] == 3 and math.isfinite(summary["example_mean"])


# ---------------------------------------------------------------------------------------------
# Answers: generated once, cached, resumable


def test_answers_batched_equal_one_by_one_and_are_cached(tiny_model, tmp_path, pairs):
    model, tokenizer = tiny_model
    convs = conversations_from_pairs(pairs[:4])
    settings = DecodeSettings(temperature=0.0, max_new_tokens=8, batch_size=4)
    cache = tmp_path / "answers.jsonl"
    batched = generate_answers(model, tokenizer, convs, settings, cache)
    single = generate_answers(model, tokenizer, convs, DecodeSettings(0.0, 8, 1))
    assert batched == single  # left padding does not change greedy answers
    # Reused without a model: every answer comes from the cache.
    assert generate_answers(None, None, convs, settings, cache) == batched
    # Resumable: only the prompts missing from the cache are generated.
    lines = cache.read_text().splitlines()
    kept = json.loads(lines[0]) | {"answers": ["from the cache"]}
    cache.write_text(json.dumps(kept) + "\n")
    resumed = generate_answers(model, tokenizer, convs, settings, cache)
    assert resumed[convs[0].id] == ["from the cache"]
    assert {k: v for k, v in resumed.items() if k != convs[0].id} == {k: v for k, v in batched.items()
                                                                      if k != convs[0].id}


def test_multi_turn_answers_see_the_first_reply(tiny_model):
    model, tokenizer = tiny_model
    convs = [Conversation("q1", ["Name a fruit.", "Why that one?"]), Conversation("q2", ["Say hi."])]
    answers = generate_answers(model, tokenizer, convs, DecodeSettings(0.0, 6, 2))
    assert len(answers["q1"]) == 2 and len(answers["q2"]) == 1


# ---------------------------------------------------------------------------------------------
# Judges and win rate


class FirstPositionJudge:
    """Always prefers whichever answer it reads first: pure position bias."""
    name = "first"

    def prefer(self, instruction, a, b):
        return 1.0

    def grade(self, question, answer, reference=None):
        return 5.0


class LongerJudge:
    """Prefers the longer answer, grades by length: pure length bias."""
    name = "longer"

    def prefer(self, instruction, a, b):
        return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5

    def grade(self, question, answer, reference=None):
        return float(min(10, max(1, len(answer) // 10)))


class KeywordJudge:
    """Prefers the answer that contains 'good', whatever its length: a real quality signal."""
    name = "keyword"

    def prefer(self, instruction, a, b):
        return 0.5 + 0.5 * (("good" in a) - ("good" in b))

    def grade(self, question, answer, reference=None):
        return 8.0 if "good" in answer else 3.0


def _convs(n):
    return [Conversation(f"p{i}", [f"question {i}"]) for i in range(n)]


def test_position_swap_cancels_a_judge_that_always_prefers_the_first_answer():
    convs = _convs(20)
    a = {c.id: [f"answer A {c.id}"] for c in convs}
    b = {c.id: [f"a much longer answer B {c.id}"] for c in convs}
    result = win_rate(judge_pairs(FirstPositionJudge(), convs, a, b), samples=200)
    assert result["win_rate"] == 50.0  # without the swap it would be 100
    assert result["ties"] == 20 and result["first_position_rate"] == 1.0


def test_win_rate_of_a_student_against_itself_is_fifty_with_a_real_judge(tiny_model, tiny_spec, pairs):
    model, tokenizer = tiny_model
    convs = conversations_from_pairs(pairs[:6])
    answers = generate_answers(model, tokenizer, convs, DecodeSettings(0.0, 10, 6))
    judge = HFJudge(tiny_spec, device="cpu", dtype="float32")
    result = win_rate(judge_pairs(judge, convs, answers, answers), samples=200)
    assert result["win_rate"] == pytest.approx(50.0, abs=1e-9)
    assert result["win_rate_low"] <= 50.0 <= result["win_rate_high"]
    # The real judge's raw verdicts are probabilities and depend on the order (a random model has bias).
    p = judge.prefer("Say hi.", "Hello there!", "no")
    q = judge.prefer("Say hi.", "no", "Hello there!")
    assert 0 < p < 1 and 0 < q < 1 and p != q


def test_length_controlled_win_rate_removes_length_bias_but_keeps_quality():
    rng = np.random.default_rng(0)
    convs = _convs(200)
    # A is longer on 70% of prompts; quality ('good') is independent of length and A has it on 80%.
    long_a = rng.random(200) < 0.7
    good_a = rng.random(200) < 0.8
    a, b = {}, {}
    for c, is_long, is_good in zip(convs, long_a, good_a):
        words = "word " * int(rng.integers(5, 15))
        a[c.id] = [("good " if is_good else "fine ") + words * (3 if is_long else 1)]
        b[c.id] = ["fine " + words * (1 if is_long else 3)]
    by_length = win_rate(judge_pairs(LongerJudge(), convs, a, b), samples=200)
    assert by_length["win_rate"] > 60
    assert abs(by_length["lc_win_rate"] - 50) < 8  # the length effect is regressed out
    by_quality = win_rate(judge_pairs(KeywordJudge(), convs, a, b), samples=200)
    assert by_quality["win_rate"] > 85 and by_quality["lc_win_rate"] > 85
    assert by_quality["lc_win_rate_low"] <= by_quality["lc_win_rate"] <= by_quality["lc_win_rate_high"]


def test_judgements_are_cached_and_resumed(tmp_path):
    convs = _convs(5)
    a = {c.id: ["good answer"] for c in convs}
    b = {c.id: ["answer"] for c in convs}
    cache = tmp_path / "judgements.jsonl"
    first = judge_pairs(KeywordJudge(), convs, a, b, cache)
    # A different judge object reading the same cache does not judge again.
    assert judge_pairs(FirstPositionJudge(), convs, a, b, cache) == first
    assert all(isinstance(j, Judgement) and j.preference == 1.0 for j in first)


def test_grading_multi_turn_with_a_real_judge_and_deterministic_ones(tiny_spec, tmp_path):
    convs = [Conversation("q1", ["Name a fruit.", "Why?"]), Conversation("q2", ["Say hi."], references=["Hi!"])]
    answers = {"q1": ["good: apple", "it is sweet"], "q2": ["hello"]}
    grades = grade_answers(KeywordJudge(), convs, answers, tmp_path / "g.jsonl")
    assert [g["score"] for g in grades] == [8.0, 3.0, 3.0]
    summary = grade_summary(grades, samples=100)
    assert summary["score"] == pytest.approx(14 / 3) and summary["score_turn_1"] == 5.5
    score = HFJudge(tiny_spec, device="cpu", dtype="float32").grade("Say hi.", "hello", "Hi!")
    assert 1.0 <= score <= 10.0


def test_parsing_http_verdicts():
    assert parse_preference("Output (A)") == 1.0
    assert parse_preference("B") == 0.0
    assert parse_preference("They are equally good.") == 0.5
    assert parse_rating("Good answer. Rating: [[7]]") == 7.0
    assert parse_rating("no verdict") is None


# ---------------------------------------------------------------------------------------------
# Question files


def test_question_file_errors_name_file_line_and_field(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text('{"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now another."]}\n'
                    '{"instruction": "Add 2 and 2.", "output": "4"}\n')
    convs = read_questions(good)
    assert [c.id for c in convs] == ["81", "line-2"] and convs[1].references == ["4"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["ok"]}\n{"question_id": 2, "turns": []}\n')
    with pytest.raises(InputError, match=r"bad.jsonl, line 2, field 'turns'"):
        read_questions(bad)


# ---------------------------------------------------------------------------------------------
# Utility scorers (ablation signals for the pairs stage)


def test_utility_scorers_return_influence_records(tiny_model, pairs):
    from montessori.evaluation.utility import judge_utility, loss_utility
    from montessori.records import InfluenceResult
    model, tokenizer = tiny_model
    scored = loss_utility(model, tokenizer, pairs[:3], max_length=128)
    losses = example_losses(model, tokenizer, pairs[:3], max_length=128)
    assert [r.id for r in scored] == [p.id for p in pairs[:3]]
    for r, e in zip(scored, losses):
        assert isinstance(r, InfluenceResult) and r.estimator == "loss"
        assert (r.influence is None) == (e.tokens == 0)
        if e.tokens:
            assert r.influence == pytest.approx(e.loss_sum / e.tokens)
    good = [dataclasses.replace(pairs[0], response="a good answer"), pairs[1]]
    judged = judge_utility(KeywordJudge(), good)
    assert judged[0].influence > 0 and judged[1].influence < 0  # centred: 8 -> +2.5, 3 -> -2.5
