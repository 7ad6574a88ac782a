"""What kind of candidate a measured probing candidate is: the features `montessori analyze` groups by,
which generation's steering (montessori.generation.steer) and `export`'s task_type column read too.

Each feature is assigned by a deterministic rule from the run store alone:

  task_type           a fixed taxonomy (TASK_TYPES), the first rule of `task_type()` that matches (English
                      and Japanese rules)
  instruction_length  short / medium / long, by characters (`text_length`)
  response_length     short / medium / long, by characters
  has_input           whether the instruction carries its own input (a quoted text, a colon and a passage, a new line)
  seed                the seed example of the candidate's prompt it resembles most (ROUGE-L; over characters for
                      Japanese or Chinese, as dedup compares them), i.e. the one it was most likely written after
  round               the round it was generated in

It sits with the stages, below the views of a run (analysis, report, export): a stage that steers by
these kinds must not import the analysis that prints them (tests/test_layers.py).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from montessori.errors import InputError
from montessori.generation.dedup import dedup_tokens, rouge_l_f1
from montessori.records import Record
from montessori.store import RunStore, read_jsonl

TASK_TYPES = ("open question", "how-to", "writing", "rewriting", "classification", "extraction", "math", "code",
              "other")
FEATURES = ("task_type", "instruction_length", "response_length", "has_input", "seed", "round")
# Lengths are counted in characters, not whitespace words: a Japanese sentence is one "word". A wide
# character (kanji, kana, hangul, full-width forms) counts two, about the text of two Latin letters, so
# one task lands in the same bucket in Japanese and in English (tests/test_language.py). The limits
# are the old word limits at about six characters a word.
INSTRUCTION_BUCKETS = ((50, "short (1-50 chars)"), (120, "medium (51-120 chars)"), (None, "long (121+ chars)"))
RESPONSE_BUCKETS = ((120, "short (0-120 chars)"), (500, "medium (121-500 chars)"), (None, "long (501+ chars)"))

# First match wins, in this order: "Write a Python function" is code, not writing; "Rewrite" is
# rewriting; numbers with a question are math, but not model names like "CP-200" or "E14"; "error
# code" is not code.
_NUMBER = r"(?<![\w.-])\d+(?:[.,]\d+)?(?![\w-])"
_RULES = (
    ("code", r"\b(python|javascript|typescript|java|c\+\+|rust|sql|bash|shell script|html|css|regex|regular "
             r"expression|function|script|programming|write a program|algorithm|json|yaml|source code|code snippet|"
             r"(write|fix|debug|review|refactor|explain) (the |this |some |a )?(piece of )?code)\b"),
    ("math", r"\b(calculate|compute|solve|equation|formula|percent(age)?|average|probability|how (many|much))\b"
             rf"|{_NUMBER}.*{_NUMBER}.*\?|{_NUMBER}\s*[-+*/x×^]\s*{_NUMBER}"),
    ("rewriting", r"\b(rewrite|rephrase|paraphrase|reword|simplify|shorten|proofread|translate|summari[sz]e|"
                  r"summary|edit|correct the|improve the|make (it|this|the) .*(more|less|simpler|clearer|formal)|"
                  r"in plain (language|english)|convert .* into)\b"),
    ("extraction", r"\b(extract|pull out|find (all|every)|list (all|every) .* (in|from)|identify (all|the) .* "
                   r"(in|from)|which words)\b"),
    ("classification", r"\b(classify|categori[sz]e|label|sentiment|is (this|it|the) .* (positive|negative|spam)|"
                       r"which (category|class)|decide whether|spam)\b"),
    ("writing", r"\b(write|compose|draft|create|generate|come up with|brainstorm|invent|design)\b"),
    ("how-to", r"^\s*(how (do|can|should|would|to|does one)|what are the steps|steps to)\b|\b(guide|"
               r"step[- ]by[- ]step|instructions for|how to)\b"),
    ("open question", r"\?\s*$|^\s*(what|why|who|whom|when|where|which|how|is|are|does|do|can|could|should|"
                      r"would|will|explain|describe|tell|give|list|name|compare|discuss)\b"),
)
# The same taxonomy for Japanese requests, keyed on their verbs and question words ("...を要約してください"
# is rewriting, "なぜ...ですか？" an open question). Every alternative needs a kana or kanji, so English text
# is typed exactly as before; a Latin word counts only next to Japanese ("Pythonで").
_JA = r"[\u3040-\u30ff\u4e00-\u9fff]"
_LANGS = r"python|javascript|typescript|java|sql|bash|html|css|json|yaml|vba|c\+\+|rust"
_RULES_JA = {
    "code": rf"(?:{_LANGS})(?={_JA})|(?<={_JA})(?:{_LANGS})|コード|プログラム|関数|スクリプト|正規表現|マクロ",
    "math": r"計算|何(分|時間|秒|日|個|本|枚|回|倍|リットル|キロ|メートル|グラム|パーセント|%|％)|"
            r"いくつ(です|になり)|いくら(です|になり)|合計|平均|割合|確率|を求め",
    "rewriting": r"書き直|書き換え|言い換え|分かりやすく|わかりやすく|平易な|要約|まとめて|翻訳|訳して|校正|添削|"
                 r"簡潔に|敬語に",
    "extraction": r"抽出|抜き出|取り出|読み取",
    "classification": r"分類|仕分け|判定|判別|振り分け|肯定的|否定的|(どれ|どちら)に(当たる|該当)",
    "writing": r"書いて|書きなさい|作成|作って|起草|考えて|提案して|文面",
    "how-to": r"方法|手順|やり方|仕方|どうすれば|どうやって|どのように|するには|対処",
    "open question": r"？\s*$|なぜ|どうして|何ですか|とは|違い|説明して|教えて|挙げて|述べて|理由",
}
_COMPILED = tuple((name, re.compile(f"(?:{pattern})|(?:{_RULES_JA[name]})", re.IGNORECASE))
                  for name, pattern in _RULES)
# A quoted passage (an opening quote after a space or colon, so not "don't ... pump's"), a colon and a
# passage, or a second line; in Japanese a passage in 「」 or 『』, or a full-width colon and a passage.
_INPUT = re.compile(r"(?:^|[\s:(])[\"“‘'][^\"”’]{12,}?[\"”’'](?![A-Za-z])|:\s*\S+(\s+\S+){3,}|\n\s*\S"
                    r"|「[^」]{8,}」|『[^』]{8,}』|：\s*\S{8,}")
_CANDIDATE_ID = re.compile(r"^r\d+(-data)?-p\d+-s\d+$")  # synthetic examples shown in a prompt


def task_type(instruction: str) -> str:
    """The task type of an instruction: the first rule of _RULES that matches, else 'other'."""
    return next((name for name, rule in _COMPILED if rule.search(instruction)), "other")


def has_input(instruction: str) -> bool:
    return bool(_INPUT.search(instruction.strip()))


def text_length(text: str) -> int:
    """Characters, a wide one (East Asian width W or F: kanji, kana, hangul, full-width forms) counting two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def bucket(length: int, buckets) -> str:
    return next(label for limit, label in buckets if limit is None or length <= limit)


@dataclass
class CandidateFeatures(Record):
    """A measured probing candidate and its features (RUN/analysis/candidates.jsonl)."""
    kind: ClassVar[str] = "features"
    id: str
    round: int
    influence: float
    instruction: str
    response: str
    task_type: str
    instruction_length: str
    response_length: str
    has_input: str
    seed: str
    instruction_chars: int  # text_length: wide characters count two
    response_chars: int
    seed_text: str = ""  # the seed's instruction, where the run's seed set is readable


def seed_texts(run_dir: Path) -> dict[str, str]:
    """Seed id -> text from the run's config (seeds shown in the prompts), {} when unreadable."""
    from montessori.config import load_config
    from montessori.readers import read_seeds
    for name in ("config.resolved.yaml", "config.yaml"):
        if (run_dir / name).exists():
            try:
                cfg = load_config(run_dir / name)
                if cfg.data.seeds != "builtin" and not Path(cfg.data.seeds).expanduser().exists():
                    return {}  # moved, or a Hub id: never download for a report
                return {s.id: s.text for s in read_seeds(cfg.data.seeds, lenient=True).records}
            except InputError:
                return {}
    return {}


def nearest_seed(instruction: str, example_ids: list[str], seeds: dict[str, str]) -> str:
    """The seed among a prompt's examples that the instruction resembles most (ties: the first shown)."""
    shown = [e for e in example_ids if not _CANDIDATE_ID.match(e)]
    if not shown:
        return "none"
    known = [e for e in shown if e in seeds]
    if not known:
        return shown[0]
    tokens = dedup_tokens(instruction)
    return max(known, key=lambda e: (rouge_l_f1(_seed_tokens(seeds[e]), tokens), -known.index(e)))


@functools.lru_cache(maxsize=65536)
def _seed_tokens(text: str) -> list[str]:  # each seed is compared with thousands of candidates
    return dedup_tokens(text)


def describe(candidate_id: str, round_: int, influence: float, instruction: str, response: str,
             example_ids: list[str], seeds: dict[str, str]) -> CandidateFeatures:
    iw, rw = text_length(instruction), text_length(response)
    seed = nearest_seed(instruction, example_ids, seeds)
    return CandidateFeatures(id=candidate_id, round=round_, influence=influence, instruction=instruction,
                             response=response, task_type=task_type(instruction),
                             instruction_length=bucket(iw, INSTRUCTION_BUCKETS),
                             response_length=bucket(rw, RESPONSE_BUCKETS),
                             has_input="yes" if has_input(instruction) else "no",
                             seed=seed, instruction_chars=iw, response_chars=rw, seed_text=seeds.get(seed, ""))


def measured_candidates(run_dir: str | Path, instructions, responses, influence) -> tuple[list[CandidateFeatures], int]:
    """(features of every candidate with a valid influence value, number of invalid values).

    `instructions`, `responses`, `influence`: the stages (functions) that wrote each round's
    candidates.jsonl, pairs.jsonl and influence.jsonl; the caller names them (this module is below the
    generation stage, which steers by it, so it imports no stage)."""
    run_dir = Path(run_dir)
    store = RunStore(run_dir)
    seeds = seed_texts(run_dir)
    out, invalid = [], 0
    for round_ in store.rounds():
        results = read_jsonl(store.stage(round_, influence).path / "influence.jsonl")
        if not results:
            continue
        pairs = {p["id"]: p for p in read_jsonl(store.stage(round_, responses).path / "pairs.jsonl")}
        candidates = {c["id"]: c for c in read_jsonl(store.stage(round_, instructions).path / "candidates.jsonl")}
        for r in results:
            # A measured candidate is a pair: without the responses stage's record there is nothing to describe.
            pair = pairs.get(r["id"])
            if r.get("status") != "ok" or r.get("influence") is None or pair is None:
                invalid += 1
                continue
            cand = candidates.get(pair.get("candidate_id") or r["id"], {})
            out.append(describe(r["id"], int(cand.get("round", round_)), float(r["influence"]), pair["instruction"],
                                pair["response"], cand.get("example_ids", []), seeds))
    return out, invalid
