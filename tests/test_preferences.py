"""Preference pairs: the sign rule (docs/method.md, step 6), the rank rule, options, and the stage's plain errors."""

from __future__ import annotations

import pytest

from montessori.config import PreferencesConfig, load_preset
from montessori.errors import MontessoriError
from montessori.preferences.rules import Scored, build_pairs
from montessori.preferences.stage import run_preferences
from montessori.pipeline import StageContext
from montessori.records import Candidate, GenerationPrompt, InfluenceResult, Pair, PreferencePair
from montessori.store import RunStore, read_jsonl, write_jsonl


def scored(values: dict[str, list[float]]) -> list[Scored]:
    return [Scored(f"{p}-s{i}", p, v) for p, vs in values.items() for i, v in enumerate(vs)]


def ids(pairs) -> set[tuple[str, str]]:
    return {(c.id, r.id) for c, r in pairs}


def test_sign_rule_pairs_every_positive_with_every_negative_within_a_prompt():
    data = scored({"p0": [0.3, -0.1, 0.2, -0.4], "p1": [0.5, 0.1, 0.2, 0.0], "p2": [-0.2, 0.7]})
    pairs, counts = build_pairs(data, PreferencesConfig(rule="sign"))
    assert ids(pairs) == {("p0-s0", "p0-s1"), ("p0-s0", "p0-s3"), ("p0-s2", "p0-s1"), ("p0-s2", "p0-s3"),
                          ("p2-s1", "p2-s0")}
    # p1 has no negative candidate (0.0 is neither side): no pair, counted.
    assert counts["prompts"] == 3 and counts["prompts_without_pair"] == 1 and counts["pairs"] == 5
    assert all(c.prompt_id == r.prompt_id for c, r in pairs)


def test_sign_rule_starves_when_all_influence_is_positive_and_rank_rule_does_not():
    # The SmolLM2-135M measurement: 12 of 12 candidates had positive influence.
    data = scored({"p0": [0.3, 0.1, 0.2, 0.4], "p1": [0.5, 0.1, 0.2, 0.05], "p2": [0.2, 0.7, 0.6, 0.01]})
    assert build_pairs(data, PreferencesConfig(rule="sign"))[1]["pairs"] == 0
    pairs, counts = build_pairs(data, PreferencesConfig(rule="rank"))
    # n=4 per prompt: top 2 vs bottom 2 of each prompt.
    assert counts["pairs"] == 12 and counts["prompts_without_pair"] == 0
    assert ("p0-s3", "p0-s1") in ids(pairs) and ("p0-s0", "p0-s2") in ids(pairs)
    assert all(c.influence > r.influence for c, r in pairs)


def test_rank_rule_leaves_the_median_candidate_out_and_needs_two_candidates():
    pairs, counts = build_pairs(scored({"p0": [3.0, 2.0, 1.0], "p1": [5.0], "p2": [1.0, 1.0]}), PreferencesConfig(rule="rank"))
    assert ids(pairs) == {("p0-s0", "p0-s2")}
    assert counts["prompts_without_pair"] == 2


def test_best_vs_worst_min_gap_and_cap():
    data = scored({"p0": [0.4, 0.3, -0.1, -0.5], "p1": [0.2, -0.01]})
    assert ids(build_pairs(data, PreferencesConfig(best_vs_worst=True))[0]) == {("p0-s0", "p0-s3"), ("p1-s0", "p1-s1")}
    gap = build_pairs(data, PreferencesConfig(min_gap=0.5))[0]
    assert ids(gap) == {("p0-s0", "p0-s2"), ("p0-s0", "p0-s3"), ("p0-s1", "p0-s3")}
    capped = build_pairs(data, PreferencesConfig(max_per_prompt=2))[0]
    # The cap keeps the widest gaps of each prompt.
    assert ids(capped) == {("p0-s0", "p0-s3"), ("p0-s1", "p0-s3"), ("p1-s0", "p1-s1")}


def write_round(store: RunStore, influence: dict[str, list[float | None]]) -> None:
    """instructions/ and influence/ files of one round, as the generation and influence stages write them."""
    prompts, cands, results = [], [], []
    for p, values in influence.items():
        prompts.append(GenerationPrompt(id=p, messages=[{"role": "user", "content": f"Write an instruction ({p})"}],
                                        example_ids=["s1"], prefill="1."))
        for i, v in enumerate(values):
            cid = f"r1-{p}-s{i}"
            cands.append(Candidate(id=cid, prompt_id=p, completion=f" reasoning {i}\n<instruction>Task {p}{i}",
                                   instruction=f"Task {p}{i}"))
            results.append(InfluenceResult(id=cid, influence=v, ref_loss_before=2.0, ref_loss_after=None,
                                           status="ok" if v is not None else "non_finite_loss"))
    write_jsonl(store.stage(1, "instructions").file("prompts.jsonl"), prompts)
    write_jsonl(store.stage(1, "instructions").file("candidates.jsonl"), cands)
    write_jsonl(store.stage(1, "influence").file("influence.jsonl"), results)


def stage_ctx(store: RunStore, config) -> StageContext:
    return StageContext(config, store, 1, store.stage(1, "preferences"), progress=False)


def test_stage_writes_preference_pairs_with_the_generation_prompt_and_raw_completions(tmp_path):
    store = RunStore(tmp_path)
    write_round(store, {"p0": [0.3, -0.2, None, 0.1], "p1": [0.4, 0.2]})
    config = load_preset("tiny", ["preferences.rule=sign"])
    counts = run_preferences(stage_ctx(store, config))
    prefs = read_jsonl(store.stage(1, "preferences").path / "preferences.jsonl", PreferencePair)
    assert {(p.chosen_id, p.rejected_id) for p in prefs} == {("r1-p0-s0", "r1-p0-s1"), ("r1-p0-s3", "r1-p0-s1")}
    first = next(p for p in prefs if p.chosen_id == "r1-p0-s0")
    assert first.prompt == [{"role": "user", "content": "Write an instruction (p0)"}] and first.prefill == "1."
    assert first.chosen == " reasoning 0\n<instruction>Task p00" and first.rejected.startswith(" reasoning 1")
    assert (first.chosen_influence, first.rejected_influence) == (0.3, -0.2)
    assert counts["pairs"] == 2 and counts["prompts"] == 2 and counts["prompts_without_pair"] == 1
    assert counts["skipped_influence"] == 1  # the non-finite one is not used


def test_stage_refuses_to_build_nothing_and_names_the_rank_rule(tmp_path):
    store = RunStore(tmp_path)
    write_round(store, {"p0": [0.3, 0.2, 0.1], "p1": [0.4, 0.2, 0.5], "p2": [0.1, 0.3, 0.2], "p3": [0.2, 0.6, 0.1]})
    with pytest.raises(MontessoriError, match=r"0 preference pairs.*12 of 12.*preferences\.rule=rank"):
        run_preferences(stage_ctx(store, load_preset("tiny", ["preferences.rule=sign"])))
    assert not (store.stage(1, "preferences").path / "preferences.jsonl").exists()
    counts = run_preferences(stage_ctx(store, load_preset("tiny", ["preferences.rule=rank"])))
    assert counts["pairs"] == 4 and counts["rule"] == "rank"


def test_stage_warns_when_few_prompts_give_a_pair(tmp_path, caplog):
    store = RunStore(tmp_path)
    write_round(store, {"p0": [0.3, -0.2], "p1": [0.4, 0.2], "p2": [0.1, 0.3], "p3": [0.2, 0.6]})
    with caplog.at_level("WARNING"):
        counts = run_preferences(stage_ctx(store, load_preset("tiny", ["preferences.rule=sign"])))
    assert counts["pairs"] == 1
    assert "only 1 of 4 prompts" in caplog.text and "preferences.rule=rank" in caplog.text


def test_length_adjusted_is_the_least_squares_residual_in_log_length():
    import numpy as np
    from montessori.preferences.rules import length_adjusted
    rng = np.random.default_rng(0)
    chars = rng.integers(5, 2000, size=50)
    influence = 1e-3 * np.log(chars) + rng.normal(0, 1e-3, size=50)
    slope, intercept = np.polyfit(np.log(chars), influence, 1)  # the slow obvious fit
    expected = influence - (intercept + slope * np.log(chars))
    assert np.allclose(length_adjusted(list(influence), list(chars)), expected, rtol=0, atol=1e-12)
    assert length_adjusted([0.1, 0.3], [10, 10]) == pytest.approx([-0.1, 0.1])  # one length: the mean only


def write_responses(store: RunStore, chars: dict[str, list[int]]) -> None:
    pairs = [Pair(id=f"r1-{p}-s{i}", instruction=f"Task {p}{i}", response="x" * n, candidate_id=f"r1-{p}-s{i}",
                  prompt_id=p) for p, ns in chars.items() for i, n in enumerate(ns)]
    write_jsonl(store.stage(1, "responses").file("pairs.jsonl"), pairs)


def test_control_length_ranks_what_the_answer_length_does_not_explain(tmp_path):
    import math
    store = RunStore(tmp_path)
    # Influence = length term + a content term that favours candidate 1 (the shorter answer) of every prompt.
    chars = {f"p{k}": [400 + 50 * k, 40 + 5 * k] for k in range(6)}
    values = {p: [0.01 * math.log(n) + (0.002 if i == 1 else 0.0) for i, n in enumerate(ns)] for p, ns in chars.items()}
    write_round(store, values)
    write_responses(store, chars)
    plain = load_preset("tiny", ["preferences.rule=rank"])
    run_preferences(stage_ctx(store, plain))
    prefs = read_jsonl(store.stage(1, "preferences").path / "preferences.jsonl", PreferencePair)
    assert {p.chosen_id.endswith("-s0") for p in prefs} == {True}  # raw influence: the long answer wins
    counts = run_preferences(stage_ctx(store, load_preset("tiny", ["preferences.rule=rank",
                                                                   "preferences.control_length=true"])))
    prefs = read_jsonl(store.stage(1, "preferences").path / "preferences.jsonl", PreferencePair)
    assert len(prefs) == 6 and {p.chosen_id.endswith("-s1") for p in prefs} == {True}
    assert counts["control_length"] is True
    first = next(p for p in prefs if p.prompt_id == "p0")  # the pairs keep the raw influence values
    assert (first.chosen_influence, first.rejected_influence) == (values["p0"][1], values["p0"][0])


def test_control_length_names_a_candidate_without_an_answer(tmp_path):
    from montessori.errors import InputError
    store = RunStore(tmp_path)
    write_round(store, {"p0": [0.3, -0.2], "p1": [0.4, 0.2]})
    write_responses(store, {"p0": [10, 20], "p1": [30]})
    with pytest.raises(InputError, match=r"influence/influence\.jsonl.*r1-p1-s1.*responses/pairs\.jsonl"):
        run_preferences(stage_ctx(store, load_preset("tiny", ["preferences.rule=rank", "preferences.control_length=true"])))
    assert not (store.stage(1, "preferences").path / "preferences.jsonl").exists()


def test_several_answers_per_instruction_score_it_by_their_mean(tmp_path):
    import statistics
    from montessori.pipeline import run_pipeline
    cfg = load_preset("tiny", ["generation.responses.n=2", "preferences.rule=rank", "split.probing=16"])
    run_pipeline(cfg, tmp_path, until="preferences", progress=False)
    r1 = tmp_path / "round-1"
    kept = read_jsonl(r1 / "instructions" / "candidates.jsonl", Candidate)
    pairs = read_jsonl(r1 / "responses" / "pairs.jsonl", Pair)
    # Two answers per kept instruction, each its own pair, the first under the candidate's own id.
    assert [p.id for p in pairs] == [i for c in kept for i in (c.id, f"{c.id}-a1")]
    assert all(p.candidate_id == p.id.removesuffix("-a1") for p in pairs)
    assert any(a.response != b.response for a, b in zip(pairs[0::2], pairs[1::2]))
    answered = {p.id: p.candidate_id for p in pairs}
    by_candidate: dict[str, list[float]] = {}
    for res in read_jsonl(r1 / "influence" / "influence.jsonl", InfluenceResult):
        if res.status == "ok":
            by_candidate.setdefault(answered[res.id], []).append(res.influence)
    assert any(len(v) == 2 for v in by_candidate.values())
    prefs = read_jsonl(r1 / "preferences" / "preferences.jsonl", PreferencePair)
    assert prefs
    for p in prefs:  # a pair is of instructions, ranked by the mean influence of their answers
        assert p.chosen_influence == pytest.approx(statistics.fmean(by_candidate[p.chosen_id]))
        assert p.rejected_influence == pytest.approx(statistics.fmean(by_candidate[p.rejected_id]))
        assert p.chosen_influence > p.rejected_influence
