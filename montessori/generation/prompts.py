"""Generation prompts (docs/method.md, step 1) in two styles, each with its parser.

`tagged` (the paper's): one user turn shows 8 example instructions in <instruction> tags and asks for a
brief reason, an optional input and exactly one new instruction in <instruction>...</instruction>; the
last tag of the completion is the instruction.

`list` (original Self-Instruct): the user turn shows the examples as a numbered list and the assistant
turn is prefilled with the next number ("9."); the first line of the continuation is the instruction.
Small teachers follow it where they ignore the tagged format (SmolLM2-135M: see docs/benchmarks.md).

The prefill is part of the prompt: a candidate's `completion` is only the text generated after it.

Both ask for instructions in the seeds' language (`generation.language`; `auto`: `detect_language` of
the seed tasks), and `answer_messages` asks for answers in it. English adds nothing: a run whose seeds
are English gets exactly the prompts it got before languages existed.
"""

from __future__ import annotations

import random
import re

from montessori.records import Message

STYLES = ("tagged", "list")
ENGLISH = "English"  # the language the prompts are written in; asking for it adds nothing to them
AUTO = "auto"  # generation.language: detect it from the seed tasks

TAGGED_REQUEST = """\
You write task instructions for training a helpful AI assistant. Here are {k} example instructions:

{examples}

Write one new instruction that is different from all of the examples: a task a person might really \
ask an assistant to do. First explain in one or two sentences why you chose this task. If the task \
needs an input (for example a text to summarize), include that input right after the instruction. \
Then give exactly one new instruction (with its input, if any) inside <instruction>...</instruction>.\
{language_note}"""

LIST_REQUEST = """\
Come up with a series of diverse task instructions for a helpful AI assistant. Each one is a single \
line: a task a person might really ask for, with any input it needs written in the same line.\
{language_note}

{examples}"""

# Appended to the request for any language but English (which keeps the request as it always was).
TAGGED_LANGUAGE_NOTE = ("\n\nThe examples are written in {language}. Write the new instruction (and its input) in "
                        "{language} too.")
LIST_LANGUAGE_NOTE = " Write every instruction in {language}, like the examples."
ANSWER_LANGUAGE_NOTE = "Answer in {language}."

_ITEM_NUMBER = re.compile(r"^\d+[.)]\s*")
_TAG = re.compile(r"<instruction>(.*?)</instruction>", re.DOTALL | re.IGNORECASE)


def build_prompt(style: str, examples: list[str], language: str = ENGLISH) -> tuple[list[Message], str]:
    """(messages, prefill) asking the teacher for one new instruction after `examples`, in `language`."""
    if style == "tagged":
        shown = "\n".join(f"<instruction>{_one_line(e)}</instruction>" for e in examples)
        note = "" if language == ENGLISH else TAGGED_LANGUAGE_NOTE.format(language=language)
        return [{"role": "user", "content": TAGGED_REQUEST.format(k=len(examples), examples=shown,
                                                                  language_note=note)}], ""
    if style == "list":
        shown = "\n".join(f"{i}. {_one_line(e)}" for i, e in enumerate(examples, 1))
        note = "" if language == ENGLISH else LIST_LANGUAGE_NOTE.format(language=language)
        return [{"role": "user", "content": LIST_REQUEST.format(examples=shown, language_note=note)}], \
            f"{len(examples) + 1}."
    raise ValueError(f"unknown prompt style {style!r} (choose one of {', '.join(STYLES)})")


def answer_messages(instruction: str, language: str = ENGLISH) -> list[Message]:
    """The teacher's turn for answering an instruction: the instruction alone as the user's turn, and for
    any language but English a system turn asking for the answer in it (a small teacher otherwise
    drifts back to English, the language most of its training data is in)."""
    turn = [{"role": "user", "content": instruction}]  # models.chat.user_turn (its package imports torch)
    if language == ENGLISH:
        return turn
    return [{"role": "system", "content": ANSWER_LANGUAGE_NOTE.format(language=language)}] + turn


def parse_completion(style: str, completion: str) -> str | None:
    """The instruction written in a completion, or None when it does not follow the format."""
    if style == "tagged":
        matches = _TAG.findall(completion)
        return matches[-1].strip() if matches else None
    # The first line after the prefilled number; a model that starts a new line and numbers it
    # itself ("\n10. ...") still wrote one new item.
    line = _ITEM_NUMBER.sub("", completion.strip().split("\n", 1)[0]).strip()
    return line or None


def unparsed_reason(style: str) -> str:
    return "no_tag" if style == "tagged" else "no_item"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def choose_examples(rng: random.Random, seeds: list[tuple[str, str]], synthetic: list[tuple[str, str]],
                    k: int = 8, num_synthetic: int = 2, weights: list[float] | None = None) -> list[tuple[str, str]]:
    """k (id, text) examples: k - num_synthetic seeds + num_synthetic synthetic once that many exist,
    else k seeds (docs/method.md, step 1: 6 + 2). Synthetic ones go last, as the newest items of the list.

    `weights` (one per seed, generation.steer) draws the seeds in proportion to them, without
    replacement; None draws them uniformly, exactly as before steering existed."""
    use_synthetic = num_synthetic if len(synthetic) >= num_synthetic else 0
    count = min(k - use_synthetic, len(seeds))
    if weights is None:
        chosen = rng.sample(seeds, count)
    else:  # Efraimidis-Spirakis: the `count` largest u^(1/w) are a weighted sample without replacement
        keys = [rng.random() ** (1.0 / w) for w in weights]
        chosen = [seeds[i] for i in sorted(range(len(seeds)), key=lambda i: -keys[i])[:count]]
    return chosen + (rng.sample(synthetic, use_synthetic) if use_synthetic else [])


# --- the seeds' language ------------------------------------------------------------------------------
# A fixed rule, not a model: the script of the seeds' letters (kana is Japanese, hangul Korean, ...), and
# for Latin script a count of common function words. No dependency and no randomness, so the same seeds
# give the same prompts on every machine; and English is what it falls back to, so English seeds (or seeds
# it cannot tell) keep today's prompts. Latin-script languages outside FUNCTION_WORDS, and languages
# that share a script (Cyrillic is read as Russian), are set with generation.language.

LANGUAGE_CODES = {"en": "English", "ja": "Japanese", "zh": "Chinese", "ko": "Korean", "fr": "French",
                  "de": "German", "es": "Spanish", "pt": "Portuguese", "it": "Italian", "nl": "Dutch",
                  "ru": "Russian", "uk": "Ukrainian", "el": "Greek", "ar": "Arabic", "he": "Hebrew",
                  "hi": "Hindi", "th": "Thai", "vi": "Vietnamese", "pl": "Polish", "tr": "Turkish"}
# Code-point ranges of scripts that (mostly) name one language; "Han" is Japanese with kana, else Chinese.
_SCRIPTS = (("Kana", 0x3040, 0x30FF), ("Kana", 0x31F0, 0x31FF), ("Kana", 0xFF66, 0xFF9F),
            ("Han", 0x3400, 0x4DBF), ("Han", 0x4E00, 0x9FFF), ("Han", 0xF900, 0xFAFF),
            ("Korean", 0xAC00, 0xD7AF), ("Korean", 0x1100, 0x11FF), ("Korean", 0x3130, 0x318F),
            ("Russian", 0x0400, 0x04FF), ("Greek", 0x0370, 0x03FF), ("Arabic", 0x0600, 0x06FF),
            ("Hebrew", 0x0590, 0x05FF), ("Hindi", 0x0900, 0x097F), ("Thai", 0x0E00, 0x0E7F))
# One kana, hanzi or hangul character is a syllable or a word: it weighs as two Latin letters.
_WIDE = {"Kana", "Han", "Korean"}
# Words frequent in one Latin-script language and rare in English task text.
FUNCTION_WORDS = {
    "English": "the and of to is are what how with this that for your you which from be it on".split(),
    "French": "le la les des du une est et pour dans que qui avec sur pas vous ce cette au aux".split(),
    "German": "der die das und ist nicht mit für ein eine ich sie auf den dem zu wie was bitte".split(),
    "Spanish": "el los las del que es y con por para una cómo qué se su al lo".split(),
    "Portuguese": "o os da das dos não com uma para é que em um no na como".split(),
    "Italian": "il lo gli della di che è e per una un con non come sono nel".split(),
    "Dutch": "de het een en van niet dat met voor hoe wat zijn op je".split(),
}
_LETTERS = re.compile(r"[^\W\d_]+")


def _script(ch: str) -> str | None:
    cp = ord(ch)
    if cp < 0x250:
        return "Latin" if ch.isalpha() else None
    return next((name for name, first, last in _SCRIPTS if first <= cp <= last), None)


def detect_language(texts) -> str:
    """The language of a set of texts (the seed tasks): the script with the most letters, and for Latin
    script the language whose function words occur most; English when it cannot tell."""
    counts: dict[str, int] = {}
    for text in texts:
        for ch in text:
            script = _script(ch)
            if script is not None:
                counts[script] = counts.get(script, 0) + (2 if script in _WIDE else 1)
    if not counts:
        return ENGLISH
    cjk = counts.get("Kana", 0) + counts.get("Han", 0)
    scores = {k: v for k, v in counts.items() if k not in ("Kana", "Han")} | ({"CJK": cjk} if cjk else {})
    script = max(scores, key=lambda k: (scores[k], k == "Latin"))
    if script == "CJK":
        # Japanese writes its grammar in kana (typically half the characters); Chinese has none.
        return "Japanese" if counts.get("Kana", 0) >= 0.1 * cjk else "Chinese"
    if script != "Latin":
        return script
    hits = dict.fromkeys(FUNCTION_WORDS, 0)
    for text in texts:
        for word in _LETTERS.findall(text.lower()):
            for language, words in FUNCTION_WORDS.items():
                hits[language] += word in words
    best = max(hits, key=lambda k: (hits[k], k == ENGLISH))
    # Another language must clearly outvote English: names and loanwords give every set a few hits.
    return best if hits[best] >= 3 and hits[best] > 2 * hits[ENGLISH] else ENGLISH


def resolve_language(setting: str, texts) -> str:
    """generation.language as the prompts name it: `auto` detects it from `texts`, a code is spelled out
    (`ja` -> Japanese), any other value is used as written."""
    if setting == AUTO:
        return detect_language(texts)
    return LANGUAGE_CODES.get(setting.lower(), setting)
