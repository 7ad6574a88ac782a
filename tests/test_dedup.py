"""The fast ROUGE-L dedup makes exactly rouge-score's decisions."""

import json
import random

from rouge_score import rouge_scorer

from conftest import shared_data
from montessori.generation.dedup import RougeDeduper, dedup, rouge_l_f1, rouge_tokens

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)  # the Self-Instruct setting


def reference_dedup(texts, threshold=0.7):
    """The public code's rule, scored by rouge-score itself: drop if F1 > threshold against any kept one."""
    kept, keep = [], []
    for text in texts:
        ok = all(SCORER.score(k, text)["rougeL"].fmeasure <= threshold for k in kept)
        keep.append(ok)
        if ok:
            kept.append(text)
    return keep


def near_duplicates(texts, rng):
    """Edits of real instructions: some cross the 0.7 threshold, some do not."""
    out = []
    for text in texts:
        words = text.split()
        if len(words) < 3:
            continue
        i = rng.randrange(len(words))
        out.append(" ".join(words[:i] + words[i + 1:]))  # drop a word
        out.append(" ".join(words[:i] + ["really"] + words[i:]))  # insert a word
        j = rng.randrange(len(words) - 1)
        swapped = words[:j] + [words[j + 1], words[j]] + words[j + 2:]
        out.append(" ".join(swapped).upper() + "!")  # swap two words, change case and punctuation
        out.append(" ".join(words[: max(1, len(words) // 2)]))  # the first half
    return out


def seed_instructions():
    rows = [json.loads(line) for line in shared_data("self_instruct_seed_tasks.jsonl").read_text().splitlines()]
    return [f"{r['instruction']} {r['instances'][0]['input']}".strip() for r in rows]


def test_tokens_and_scores_match_rouge_score():
    from rouge_score import tokenize
    texts = seed_instructions()[:60] + ["", "!!!", "Ünïcode café, déjà-vu 2x", "a a a b", "b a a a"]
    for text in texts:
        assert rouge_tokens(text) == tokenize.tokenize(text, None)
    for a in texts:
        for b in texts[:25]:
            assert rouge_l_f1(rouge_tokens(a), rouge_tokens(b)) == SCORER.score(a, b)["rougeL"].fmeasure


def test_decisions_equal_rouge_score_on_seed_tasks_and_near_duplicates():
    rng = random.Random(0)
    seeds = seed_instructions()
    texts = seeds + near_duplicates(seeds[:40], rng)
    rng.shuffle(texts)
    expected = reference_dedup(texts)
    assert dedup(texts) == expected
    # The crafted edits exercise both sides of the threshold.
    assert 0 < expected.count(False) < len(texts) - len(seeds)


def test_pruning_skips_most_pairs_and_stays_exact():
    seeds = seed_instructions()
    pool = RougeDeduper(0.7)
    for text in seeds:
        pool.add(text)
    probe = near_duplicates(seeds[:30], random.Random(1))
    for text in probe:
        best = max(SCORER.score(k, text)["rougeL"].fmeasure for k in seeds)
        assert pool.is_duplicate(text) == (best > 0.7)
        if best > 0.7:
            assert pool.max_score(text, at_least=0.7) == best
    assert pool.pruned > 5 * pool.scored  # most pairs never needed an LCS


def test_duplicate_of_prompt_examples():
    pool = RougeDeduper(0.7)
    example = "Write a short poem about the sea at night."
    assert pool.is_duplicate("Write a short poem about the sea at night!", [example])
    assert not pool.is_duplicate("List three uses of baking soda.", [example])
