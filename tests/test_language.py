"""Seeds in any language: the teacher is asked to write in the seeds' language, dedup works on text
without spaces, and the analysis features mean something in Japanese; English stays exactly as it was."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path

import pytest
from rouge_score import rouge_scorer, tokenize

from montessori.config import GenerationConfig, load_preset
from montessori.features import INSTRUCTION_BUCKETS, bucket, describe, has_input, task_type, text_length
from montessori.generation.dedup import RougeDeduper, dedup, dedup_tokens, near_duplicates, rouge_l_f1
from montessori.generation.prompts import (answer_messages, build_prompt, choose_examples, detect_language,
                                           resolve_language)
from montessori.generation.stage import derived_seed, run_language
from montessori.models.chat import user_turn
from montessori.pipeline import STAGES
from montessori.readers import read_pairs, read_seeds
from shopfloor import TASKS

JA_FILE = Path(__file__).parent / "data" / "shopfloor_ja.csv"
JA_TASKS = [(r["instruction"], r["answer"]) for r in csv.DictReader(JA_FILE.open(encoding="utf-8"))]
JA_NEAR = ("旋盤のびびりマークの原因を三つ挙げてください。", "旋盤のびびりマークの原因を三つ挙げて下さい。")


def english_texts() -> list[str]:
    return ([s.text for s in read_seeds().records] + [p.instruction for p in read_pairs("builtin").records]
            + [q for q, _ in TASKS])


# --- which language ---------------------------------------------------------------------------------

def test_language_is_detected_from_the_seeds():
    assert detect_language([q for q, _ in JA_TASKS]) == "Japanese"
    assert detect_language(english_texts()) == "English"
    assert detect_language([q for q, _ in TASKS]) == "English"
    assert detect_language(["请解释车床颤振的三个原因。", "如何更换主轴轴承？"]) == "Chinese"  # hanzi without kana
    assert detect_language(["선반 채터 자국의 원인을 세 가지 들어 주세요."]) == "Korean"
    assert detect_language(["Как заменить уплотнение насоса?"]) == "Russian"
    assert detect_language(["Écrivez une lettre au client pour dire que la pompe est en retard.",
                            "Quelle est la différence entre les deux joints ?"]) == "French"
    assert detect_language(["Schreiben Sie eine kurze E-Mail an den Kunden, dass die Pumpe nicht kommt."]) == "German"
    assert detect_language(["¿Cómo se cambia el sello de la bomba?", "Escribe un correo para el cliente."]) == "Spanish"
    # Japanese names and model numbers in English text do not make it Japanese, nor English names French.
    assert detect_language(["What does error code E14 on the 東京 CP-200 controller mean?"]) == "English"
    assert detect_language(["Write a note to Jean-Pierre Dupont at Le Havre."]) == "English"
    assert detect_language([]) == "English"


def test_generation_language_names_or_detects_it():
    ja = [q for q, _ in JA_TASKS]
    assert resolve_language("auto", ja) == "Japanese"
    assert resolve_language("ja", []) == "Japanese" and resolve_language("Brazilian Portuguese", []) == \
        "Brazilian Portuguese"
    cfg = load_preset("tiny")
    assert run_language(cfg) == "English"  # the builtin seeds
    assert run_language(cfg, [(str(i), q) for i, q in enumerate(ja)]) == "Japanese"
    cfg = load_preset("tiny", ["generation.language=ja"])
    assert run_language(cfg) == "Japanese"  # set, whatever the seeds


def test_a_bad_language_value_is_refused_naming_the_key():
    from montessori.errors import InputError
    with pytest.raises(InputError, match="generation.language"):
        load_preset("tiny", ["generation.language=1x"])


def test_the_language_key_leaves_finished_runs_fingerprints_alone():
    # At its default it is left out of every fingerprint (LATER_KEYS); set, it is in those of the stages
    # that ask the teacher to write: instructions, responses, mechanism, dataset.
    assert "language" not in GenerationConfig().fingerprint_dump()
    readers = {s.name for s in STAGES if "generation.language" in s.keys}
    assert readers == {"instructions", "responses", "mechanism", "dataset"}
    default, set_ = load_preset("tiny"), load_preset("tiny", ["generation.language=Japanese"])
    for stage in STAGES:
        assert "generation.language" not in default.keys_dump(stage.keys)
        assert ("generation.language" in set_.keys_dump(stage.keys)) == (stage.name in readers)


# --- the prompts --------------------------------------------------------------------------------------

def _english_prompts(language) -> str:
    """tests/test_analysis.py's prompt set (both styles), built with `language`."""
    seeds = [(s.id, s.text) for s in read_seeds().records]
    out = []
    for i in range(40):
        synthetic = [(f"syn-{j}", f"synthetic instruction {j}") for j in range(i % 5)]
        rng = random.Random(derived_seed(0, 1, "r1", i))
        ex = choose_examples(rng, seeds, synthetic, 8, 2, None)
        out.append(build_prompt("list" if i % 2 else "tagged", [t for _, t in ex], language))
        out.append([e for e, _ in ex])
    return hashlib.sha256(json.dumps(out).encode()).hexdigest()


def test_english_seeds_give_exactly_the_prompts_of_before():
    # The hash of these prompts before languages existed (tests/test_analysis.py, commit 8cfe8de).
    assert _english_prompts(run_language(load_preset("tiny"))) == \
        "de12706e441d2a2d9d8875eb6dfa7ab10a6f59db99b0325b45a1f5cb37820270"
    assert answer_messages("How do I reset the relay?", "English") == user_turn("How do I reset the relay?")


@pytest.mark.parametrize("style", ["tagged", "list"])
def test_japanese_seeds_ask_for_japanese(style):
    examples = [q for q, _ in JA_TASKS[:8]]
    (message,), prefill = build_prompt(style, examples, detect_language(examples))
    english, _ = build_prompt(style, examples)
    assert "Japanese" in message["content"] and "Japanese" not in english[0]["content"]
    assert message["content"].startswith(english[0]["content"].split("\n")[0][:40])  # the same request, one note more
    assert all(e in message["content"] for e in examples)
    system, user = answer_messages(examples[0], "Japanese")
    assert system == {"role": "system", "content": "Answer in Japanese."} and [user] == user_turn(examples[0])


def test_the_instructions_stage_asks_the_teacher_in_japanese(tiny_spec, tmp_path):
    """The library form of stage `instructions` with Japanese seeds, on the tiny teacher: every prompt it
    sent says Japanese; the same call with English seeds sends none that does."""
    from montessori.generation.backends import make_backend
    from montessori.generation.stage import sample_instructions
    from montessori.store import read_jsonl
    cfg = load_preset("tiny", ["generation.num_prompts=2"])
    teacher = make_backend(cfg.models.teacher, cfg.generation, cfg.models)
    try:
        ja = [(f"ja-{i}", q) for i, (q, _) in enumerate(JA_TASKS)]
        sample_instructions(teacher, cfg, folder=tmp_path / "ja", seeds=ja)
        sample_instructions(teacher, cfg, folder=tmp_path / "en")
    finally:
        teacher.close()
    ja_prompts = read_jsonl(tmp_path / "ja" / "prompts.jsonl")
    en_prompts = read_jsonl(tmp_path / "en" / "prompts.jsonl")
    assert len(ja_prompts) == len(en_prompts) == 2
    assert all("Write every instruction in Japanese" in p["messages"][0]["content"] for p in ja_prompts)
    assert not any("Japanese" in p["messages"][0]["content"] for p in en_prompts)


# --- dedup -------------------------------------------------------------------------------------------

def test_japanese_near_duplicates_are_removed_and_distinct_tasks_kept():
    a, b = JA_NEAR
    assert rouge_l_f1(dedup_tokens(a), dedup_tokens(b)) > 0.9  # characters: ください / 下さい differ in 2
    distinct = [q for q, _ in JA_TASKS if q != b]
    assert dedup(distinct) == [True] * len(distinct)  # 18 different shop-floor tasks: all kept
    keep = dedup([a] + distinct[1:] + [b])
    assert keep == [True] * len(distinct) + [False]  # only the rewritten one goes
    # rouge-score itself sees no token in Japanese, which is why dedup kept everything before.
    assert tokenize.tokenize(a, None) == [] and dedup([a, b]) == [True, False]
    # against the prompt's examples too (the instructions stage's second check)
    assert RougeDeduper(0.7).is_duplicate(b, [a]) and not RougeDeduper(0.7).is_duplicate(distinct[1], [a])
    assert near_duplicates([b, distinct[1]], [a, distinct[2]]) == [(0, 0, pytest.approx(0.9302, abs=1e-4))]


def test_other_scripts_get_tokens_too():
    assert dedup_tokens("CP-200のエラー") == ["cp", "200", "の", "エ", "ラ", "ー"]
    assert dedup_tokens("Как заменить уплотнение насоса P-40?") == ["как", "заменить", "уплотнение", "насоса", "p",
                                                                     "40"]
    assert dedup(["Как заменить уплотнение насоса?", "Как заменить уплотнение насоса P-40?"]) == [True, False]


def test_english_dedup_is_still_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = english_texts() + ["Ünïcode café, déjà-vu 2x", "Translate 'Где библиотека?' into English."]
    for text in texts:
        assert dedup_tokens(text) == tokenize.tokenize(text, None)
    rng = random.Random(0)
    for a, b in (rng.sample(texts, 2) for _ in range(200)):
        assert rouge_l_f1(dedup_tokens(a), dedup_tokens(b)) == scorer.score(a, b)["rougeL"].fmeasure


# --- analysis features --------------------------------------------------------------------------------

JA_TYPES = ["open question", "how-to", "how-to", "rewriting", "classification", "extraction", "math", "code",
            "writing", "writing", "open question", "rewriting", "math", "open question", "how-to", "open question",
            "rewriting", "classification", "open question"]
JA_INPUTS = {3, 4, 5, 11, 16, 17}  # the tasks that quote their passage in 「」 after a full-width colon


def test_japanese_task_types_and_inputs():
    assert [task_type(q) for q, _ in JA_TASKS] == JA_TYPES
    assert {i for i, (q, _) in enumerate(JA_TASKS) if has_input(q)} == JA_INPUTS
    assert not has_input("「保証」か「修理」か答えてください。")  # quoted words are not a passage
    assert task_type("原因をいくつか挙げてください。") == "open question"  # "some", not a count


def test_english_task_types_are_unchanged():
    # Recorded with the rules before the Japanese ones were added (228 builtin and shop-floor texts).
    got = [[task_type(t), has_input(t)] for t in english_texts()]
    assert len(got) == 228
    assert hashlib.sha256(json.dumps(got).encode()).hexdigest() == \
        "8cdcbbf2cade0a1041fe72d63e1a1ce491842d87ed1017831d3182647e827e9d"


def test_lengths_count_characters_so_a_translation_lands_in_the_same_bucket():
    ja, en = "旋盤のびびりマークの原因を三つ挙げてください。", "Give three causes of chatter marks on a lathe."
    assert len(ja.split()) == 1  # one whitespace "word": why lengths are not counted in words
    assert text_length(ja) == 46 and text_length(en) == 46  # a wide character counts two
    assert bucket(text_length(ja), INSTRUCTION_BUCKETS) == bucket(text_length(en), INSTRUCTION_BUCKETS)
    long_ja = JA_TASKS[3][0]  # a summary request with its passage
    assert bucket(text_length(long_ja), INSTRUCTION_BUCKETS) == "medium (51-120 chars)"


def test_a_japanese_candidate_is_attributed_to_the_seed_it_resembles():
    seeds = {f"task-{i:03d}": q for i, (q, _) in enumerate(JA_TASKS)}
    shown = ["task-002", "task-010", "task-000", "task-007"]
    f = describe("r1-p00000-s0", 1, 0.1, "旋盤のびびりマークが出る原因を二つ挙げてください。", "工具の突き出しと送りです。",
                 shown, seeds)
    assert f.seed == "task-000"  # before, no tokens: the first one shown (task-002)
    assert f.task_type == "open question" and f.instruction_chars == text_length(f.instruction) > 0
    assert f.response_chars == 2 * len(f.response)
