"""Verifiable instruction following (IFEval): reading, scoring against the library's own checkers,
strict vs loose, the prompt-as-answer floor, offline punkt, and `montessori eval --ifeval` end to end."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

pytest.importorskip("if_verifiable", reason="IFEval scoring needs if-verifiable (montessori[eval], Python >= 3.11)")

from montessori.cli import main  # noqa: E402
from montessori.errors import InputError  # noqa: E402
from montessori.evaluation import ifeval  # noqa: E402

from tests.conftest import shared_data  # noqa: E402

SMALL = Path(__file__).parent / "data" / "ifeval_small.jsonl"

# key: (an answer that follows every instruction of the prompt, one that follows none of them)
ANSWERS = {
    1: ("A lantern swung at the harbor while we walked.", "We walked along the beach at dusk."),
    2: ("The river bends, the river sings, and the river never sleeps.", "The river bends past the mill."),
    3: ("Tea is warm and calming.", "Tea is really very calming."),
    4: ("Zebras zigzag at the zoo.", "Lions rest at the park."),
    5: ("Ein gutes Frühstück besteht aus frischem Brot, Butter, Käse und einer Tasse Kaffee am Morgen.",
        "A good breakfast is fresh bread with butter and a cup of coffee in the morning."),
    6: ("A compass points north. It helps you find your way.",
        "A compass points north. It uses a magnet. It helps hikers. It needs no battery."),
    7: ("I lost my key. I searched the kitchen. I checked my coat. It was in my shoe.",
        "I lost my key. It was in my shoe."),
    8: ("Gardens grow food.\n***\nGardens calm the mind.", "Gardens grow food and calm the mind."),
    9: ("Gravity pulls masses toward each other.",
        "Gravity is the force by which a planet or other body draws objects toward its centre, and it keeps "
        "the moon in orbit around the earth."),
    10: ("Bread is baked from flour.\n\nHowever, some bread uses no yeast.",
         "Bread is baked from flour.\n\nSome bread uses no yeast."),
    11: ("Dear [name], join us at [address] on Friday.", "Dear friend, join us on Friday."),
    12: ("Your dog was lovely today.\n\nP.S. Thank you for the apples.", "Your dog was lovely today."),
    13: ("* Apple\n* Pear\n* Plum", "* Apple\n* Pear"),
    14: ("My answer is yes.", "Water makes other things wet."),
    15: ("A bicycle has *two wheels* and *a chain*.", "A bicycle has two wheels and a chain."),
    16: ("Section 1\nBuy seeds.\nSection 2\nPlant them.", "Buy seeds, then plant them."),
    17: ('{"name": "Tom", "age": 3}', "The cat is called Tom and he is 3."),
    18: ("<<Rain>>\nDrops on the window\nclouds on the hill", "Drops on the window\nclouds on the hill"),
    19: ("Hello there!\n******\nGood morning!", "Hello there! Good morning!"),
    20: ("Name a planet. Mars.", "Mars."),
    21: ("A lighthouse guides ships at night. Is there anything else I can help with?",
         "A lighthouse guides ships at night."),
    22: ("NEVER run near the POOL.", "Never run near the pool."),
    23: ("SNOW IS COLD AND WHITE.", "Snow is cold and white."),
    24: ("sand is warm and soft.", "Sand is warm and soft."),
    25: ("The market is loud and busy.", "The market is loud, busy and bright."),
    26: ('"You are doing great."', "You are doing great."),
    27: ("a candle glows softly. it smells of wax.", "A candle glows, softly. It smells of wax. It melts. It drips."),
}
SENTENCE_KEYS = ("6", "7", "22", "27")  # NLTK punkt: sentence counts (6, 7, 27), word_tokenize (22)


@pytest.fixture(scope="module")
def prompts():
    return ifeval.read_prompts(SMALL)


def answers(which: int) -> dict[str, str]:
    return {str(k): v[which] for k, v in ANSWERS.items()}


def direct(prompt: ifeval.IFEvalPrompt, answer: str) -> list[bool]:
    """The library's checker of each instruction, built and called by hand (strict: the answer as is)."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    verdicts = []
    for instruction_id, kwargs in zip(prompt.instruction_id_list, prompt.kwargs):
        checker = INSTRUCTION_DICT[instruction_id](instruction_id)
        checker.build_description(**kwargs)
        if "prompt" in (checker.get_instruction_args() or {}):
            checker.build_description(prompt=prompt.prompt)
        verdicts.append(bool(answer.strip()) and bool(checker.check_following(answer)))
    return verdicts


def test_the_small_file_covers_every_ifeval_checker(prompts):
    covered = {i for p in prompts for i in p.instruction_id_list}
    assert covered == set(ifeval.checkers())  # 25 instruction types, each with a passing and a failing answer
    assert {p.key for p in prompts} == {str(k) for k in ANSWERS}


def test_each_checker_family_passes_the_good_answer_and_fails_the_bad_one(prompts):
    good, bad = ifeval.score(prompts, answers(0)), ifeval.score(prompts, answers(1))
    for g, b in zip(good, bad):
        assert g.strict == [True] * len(g.strict) and g.loose == [True] * len(g.loose), (g.key, g.instruction_id_list)
        assert not any(b.strict) and not any(b.loose), (b.key, b.instruction_id_list, b.strict, b.loose)
    summary = ifeval.summarize(good, samples=200)
    assert summary["prompt_strict"] == summary["inst_loose"] == 1.0
    assert ifeval.summarize(bad, samples=200)["inst_loose"] == 0.0


def test_strict_verdicts_equal_the_library_checker_called_directly(prompts):
    mixed = {k: (ANSWERS[int(k)][int(k) % 2]) for k in answers(0)}  # good and bad answers, interleaved
    mixed["27"] = "a candle glows softly, it smells of wax."  # lowercase, one sentence, but a comma
    for which in (answers(0), answers(1), mixed):
        for p, r in zip(prompts, ifeval.score(prompts, which)):
            assert r.strict == direct(p, which[p.key]), (p.key, which[p.key])
    (r27,) = [r for r in ifeval.score(prompts, mixed) if r.key == "27"]
    assert r27.strict == [True, False, True] and not r27.prompt_strict


def test_loose_forgives_a_preamble_a_closing_line_and_markdown_but_strict_does_not(prompts):
    by_key = {p.key: p for p in prompts}
    cases = {
        "17": 'Here is the JSON you asked for:\n{"name": "Tom", "age": 3}',  # first line removed
        "26": '"You are doing great."\nI hope this helps.',  # last line removed
        "23": "**SNOW IS COLD AND WHITE.**\nhope it helps",  # last line removed (lowercase words)
        "21": "A lighthouse guides ships at night. **Is there anything else I can help with?**",  # asterisks
    }
    chosen = [by_key[k] for k in cases]
    results = ifeval.score(chosen, cases)
    for r in results:
        assert r.strict == [False] and r.loose == [True], r.key
        assert r.strict == direct(by_key[r.key], cases[r.key])
    summary = ifeval.summarize(results, samples=200)
    assert (summary["prompt_strict"], summary["prompt_loose"]) == (0.0, 1.0)
    # An answer that follows nothing stays failed under loose rules.
    assert not any(ifeval.score([by_key["25"]], ["**Loud, busy**"])[0].loose)


def test_an_empty_answer_follows_no_instruction(prompts):
    results = ifeval.score(prompts, ["  "] * len(prompts))
    assert not any(x for r in results for x in r.strict + r.loose)


def test_prompt_level_and_instruction_level_accuracy_with_intervals(prompts):
    results = ifeval.score(prompts, answers(0))
    results[-1].strict = [True, False, True]  # prompt 27 (3 instructions) misses one, strict only
    results[0].strict, results[0].loose = [False], [False]  # prompt 1 misses its one instruction
    s = ifeval.summarize(results, samples=500, seed=3)
    n_prompts, n_inst = len(prompts), sum(len(p.instruction_id_list) for p in prompts)
    assert (s["prompts"], s["instructions"]) == (n_prompts, n_inst) == (27, 29)
    assert s["prompt_strict"] == pytest.approx((n_prompts - 2) / n_prompts)
    assert s["prompt_loose"] == pytest.approx((n_prompts - 1) / n_prompts)
    assert s["inst_strict"] == pytest.approx((n_inst - 2) / n_inst)
    assert s["inst_loose"] == pytest.approx((n_inst - 1) / n_inst)
    for level in ifeval.LEVELS:
        assert s[f"{level}_low"] <= s[level] <= s[f"{level}_high"] <= 1.0
        assert s[f"{level}_low"] < s[f"{level}_high"]
    assert s["by_instruction"]["change_case:english_lowercase"] == {"count": 2, "strict": 1.0, "loose": 1.0}
    assert s["by_instruction"]["punctuation:no_comma"]["strict"] == 0.5


def test_paired_difference(prompts):
    good, bad = ifeval.score(prompts, answers(0)), ifeval.score(prompts, answers(1))
    d = ifeval.difference(good, bad, samples=300)
    for level in ifeval.LEVELS:
        assert d[level] == d[f"{level}_low"] == d[f"{level}_high"] == 1.0  # every prompt differs the same way
    same = ifeval.difference(good, good, samples=300)
    assert all(same[k] == 0.0 for k in same if k != "prompts")
    mixed = ifeval.score(prompts, {k: ANSWERS[int(k)][int(k) % 2] for k in answers(0)})
    d = ifeval.difference(mixed, bad, samples=2000)
    s = ifeval.summarize(mixed, samples=2000)
    assert d["prompt_strict"] == pytest.approx(s["prompt_strict"])  # bad follows nothing
    assert d["prompt_strict_low"] > 0  # paired: bad's zeros cancel, the interval excludes 0
    with pytest.raises(ValueError):
        ifeval.difference(good[:3], bad[1:4])


def test_floor_is_scoring_the_prompt_as_the_answer(prompts):
    floor = ifeval.floor(prompts)
    assert [(r.strict, r.loose) for r in floor] == \
        [(r.strict, r.loose) for r in ifeval.score(prompts, [p.prompt for p in prompts])]
    by_key = {r.key: r for r in floor}
    assert by_key["20"].strict == [True]  # the prompt starts with the request it must repeat
    assert by_key["9"].strict == [True]  # fewer than 20 words
    assert by_key["23"].strict == [False]  # not in capitals


def test_scoring_is_reproducible_where_the_checkers_draw_at_random():
    # keywords:letter_frequency replaces the letter '#' by a random letter (two public IFEval prompts).
    record = {"key": 7, "prompt": "Tweet with at least 4 hashtags.",
              "instruction_id_list": ["keywords:letter_frequency"],
              "kwargs": [{"let_relation": "at least", "letter": "#", "let_frequency": 4}]}
    p = ifeval._prompt(record, ifeval.checkers())
    answers_ = ["".join(chr(c) * 4 for c in range(97, 123))[: 4 * n] for n in range(27)]
    runs = {tuple(r.strict[0] for r in ifeval.score([p] * 27, answers_)) for _ in range(5)}
    assert len(runs) == 1
    flips = next(iter(runs))
    assert flips.count(True) >= 1 and flips.count(False) >= 1  # a random letter, but the same on every run


def test_sentence_checkers_score_offline_without_nltk_data(prompts, tmp_path, monkeypatch):
    import nltk
    from if_verifiable.ifeval import instructions_util
    from nltk import tokenize
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no-nltk-data")])
    monkeypatch.delenv("NLTK_DATA", raising=False)
    monkeypatch.setenv("MONTESSORI_CACHE", str(tmp_path / "cache"))

    def no_network(*args, **kwargs):
        raise OSError("no network in this test")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    for cached in (instructions_util._get_sentence_tokenizer, tokenize._get_punkt_tokenizer):
        cached.cache_clear()  # a tokenizer loaded earlier from installed NLTK data would hide the point
    with pytest.raises(LookupError):  # what the checkers would hit without ensure_punkt
        nltk.data.find("tokenizers/punkt_tab/english/")
    chosen = [p for p in prompts if p.key in SENTENCE_KEYS]
    good = ifeval.score(chosen, answers(0))
    bad = ifeval.score(chosen, answers(1))
    assert all(all(r.strict) for r in good) and not any(any(r.strict) for r in bad)
    assert instructions_util.count_sentences("Dr. Smith went home at 5 p.m. today. He slept. Was he tired?") == 3
    assert (tmp_path / "cache" / "nltk_data" / "tokenizers" / "punkt_tab" / "english" / "ortho_context.tab").exists()
    for cached in (instructions_util._get_sentence_tokenizer, tokenize._get_punkt_tokenizer):
        cached.cache_clear()  # the next test loads punkt from its own path


def test_the_written_punkt_model_is_nltk_punkt_tokenizes_model(tmp_path, monkeypatch):
    import nltk
    import punkt
    from nltk.tokenize.punkt import PunktTokenizer
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    monkeypatch.setenv("MONTESSORI_CACHE", str(tmp_path / "cache"))
    ifeval.ensure_punkt()
    ours, theirs = PunktTokenizer("english")._params, punkt.load_model("english")
    assert ours.abbrev_types == set(theirs.abbrev_types) and len(ours.abbrev_types) == 156
    assert ours.collocations == set(theirs.collocations)
    assert ours.sent_starters == set(theirs.sent_starters)
    assert dict(ours.ortho_context) == dict(theirs.ortho_context)


BAD_RECORDS = {
    "missing-prompt": ({"key": 2, "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
                       "line 2, field 'prompt': missing"),
    "kwargs-not-list": ({"key": 2, "prompt": "Hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": {}},
                        "line 2, field 'kwargs': expected a list of objects"),
    "kwargs-not-dicts": ({"key": 2, "prompt": "Hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [3]},
                         "line 2, field 'kwargs': expected a list of objects"),
    "kwargs-length": ({"key": 2, "prompt": "Hi.", "instruction_id_list": ["punctuation:no_comma",
                                                                         "startend:quotation"], "kwargs": [{}]},
                      "line 2, field 'kwargs': 1 objects for 2 instructions"),
    "unknown-id": ({"key": 2, "prompt": "Hi.", "instruction_id_list": ["punctuation:no_semicolon"], "kwargs": [{}]},
                   "line 2, field 'instruction_id_list': unknown instruction id 'punctuation:no_semicolon'"),
    "bad-argument": ({"key": 2, "prompt": "Hi.", "instruction_id_list": ["length_constraints:number_words"],
                      "kwargs": [{"num_words": 5, "relation": "around"}]},
                     "line 2, field 'kwargs': instruction 1 (length_constraints:number_words)"),
    "unknown-argument": ({"key": 2, "prompt": "Hi.", "instruction_id_list": ["punctuation:no_comma"],
                          "kwargs": [{"num_words": 5}]},
                         "line 2, field 'kwargs': instruction 1 (punctuation:no_comma)"),
    "duplicate-key": ({"key": 1, "prompt": "Hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
                      "line 2, field 'key': duplicate key '1'"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_malformed_record_is_one_line_naming_file_line_and_field_exit_2(case, tmp_path, capsys):
    record, expected = BAD_RECORDS[case]
    bad = tmp_path / "bad.jsonl"
    good = {"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(InputError, match="bad.jsonl, " + expected.split(":")[0]):
        ifeval.read_prompts(bad)
    # Refused before any model loads (the student does not even exist).
    rc = main(["eval", str(tmp_path / "no-such-student"), "--ifeval", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"{bad}, {expected}" in err, err


def test_invalid_json_and_max_prompts(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(SMALL.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(InputError, match=r"bad.jsonl, line 2: not valid JSON"):
        ifeval.read_prompts(bad)
    assert [p.key for p in ifeval.read_prompts(bad, limit=1)] == ["1"]  # the first N prompts only
    assert len(ifeval.read_prompts(SMALL, limit=5)) == 5


def test_the_public_ifeval_prompts_read_and_score(prompts):
    path = shared_data("ifeval_input_data.jsonl")
    public = ifeval.read_prompts(path)
    assert len(public) == 541 and sum(len(p.instruction_id_list) for p in public) == 834
    first = ifeval.floor(public[:80])
    assert [r.strict for r in first] == [r.strict for r in ifeval.floor(public[:80])]
    s = ifeval.summarize(first, samples=200)
    assert s["prompt_strict"] == pytest.approx(0.25)  # answering with the prompt meets a quarter of them


def test_eval_config_keys_leave_existing_fingerprints_alone(tiny_config):
    from montessori.config import load_preset
    from montessori.pipeline import STAGES
    (stage,) = [s for s in STAGES if s.name == "eval"]
    assert not any(k.startswith("eval.ifeval") for k in tiny_config.keys_dump(stage.keys))
    configured = load_preset("tiny", [f"eval.ifeval={SMALL}", "eval.ifeval_max_prompts=3"])
    dump = configured.keys_dump(stage.keys)
    assert dump["eval.ifeval"] == str(SMALL) and dump["eval.ifeval_max_prompts"] == 3
    assert "eval.ifeval" in stage.files


def test_preflight_refuses_a_bad_ifeval_file(tmp_path):
    from montessori.config import load_preset
    from montessori.preflight import preflight
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": 1, "prompt": "Hi.", "instruction_id_list": ["nope"], "kwargs": [{}]}\n')
    with pytest.raises(InputError, match="bad.jsonl, line 1, field 'instruction_id_list'"):
        preflight(load_preset("tiny", [f"eval.ifeval={bad}"]), {"eval"})


def test_montessori_eval_ifeval_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the printed table, unabridged
    out = tmp_path / "out"
    rc = main(["eval", "tiny-random:0", "tiny-random:1", "--ifeval", str(SMALL), "--ifeval-max-new-tokens", "6",
               "--max-examples", "2", "--max-length", "64", "--bootstrap", "200", "--device", "cpu",
               "--dtype", "float32", "--no-progress", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "eval.json").read_text())
    section = results["ifeval"]
    assert (section["prompts"], section["instructions"], section["max_new_tokens"]) == (27, 29, 6)
    assert section["checkers"].startswith("if-verifiable ")
    prompts = ifeval.read_prompts(SMALL)
    per_student = {}
    for name in ("tiny-random:0", "tiny-random:1"):
        cached = [json.loads(line) for line in Path(section["answers"][name]).read_text().splitlines()]
        assert len(cached) == 27  # greedy answers, cached like the judged metrics' answers
        per_student[name] = ifeval.score(prompts, {r["id"]: r["answers"][0] for r in cached})
        expected = ifeval.summarize(per_student[name], samples=200)
        assert section["students"][name] == expected
    assert section["floor"] == ifeval.summarize(ifeval.floor(prompts), samples=200)
    entries = {(m["metric"], m["student"]): m for m in results["metrics"]}
    for level in ifeval.LEVELS:
        for name in ("tiny-random:0", "tiny-random:1", ifeval.FLOOR):
            summary = section["floor"] if name == ifeval.FLOOR else section["students"][name]
            entry = entries[(f"ifeval/{level}", name)]
            assert (entry["value"], entry["low"], entry["high"]) == \
                (summary[level], summary[f"{level}_low"], summary[f"{level}_high"])
        diff = entries[(f"ifeval/{level}_diff", "tiny-random:1")]
        assert diff["baseline"] == "tiny-random:0"
        assert diff["value"] == pytest.approx(section["students"]["tiny-random:1"][level]
                                              - section["students"]["tiny-random:0"][level])
    assert "ifeval/prompt_loose" in printed and ifeval.FLOOR in printed
    # `montessori compare` reads the same entries.
    from montessori.evaluation.compare import compare
    columns, metrics, cells = compare([out])
    assert "ifeval/inst_loose" in metrics and any(c.endswith(ifeval.FLOOR) for c in columns)
