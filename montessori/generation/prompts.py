"""Generation prompts (docs/method.md, step 1) in two styles, each with its parser.

`tagged` (the paper's): one user turn shows 8 example instructions in <instruction> tags and asks for a
brief reason, an optional input and exactly one new instruction in <instruction>...</instruction>; the
last tag of the completion is the instruction.

`list` (original Self-Instruct): the user turn shows the examples as a numbered list and the assistant
turn is prefilled with the next number ("9."); the first line of the continuation is the instruction.
Small teachers follow it where they ignore the tagged format (SmolLM2-135M: see docs/benchmarks.md).

The prefill is part of the prompt: a candidate's `completion` is only the text generated after it.
"""

from __future__ import annotations

import random
import re

from montessori.records import Message

STYLES = ("tagged", "list")

TAGGED_REQUEST = """\
You write task instructions for training a helpful AI assistant. Here are {k} example instructions:

{examples}

Write one new instruction that is different from all of the examples: a task a person might really \
ask an assistant to do. First explain in one or two sentences why you chose this task. If the task \
needs an input (for example a text to summarize), include that input right after the instruction. \
Then give exactly one new instruction (with its input, if any) inside <instruction>...</instruction>."""

LIST_REQUEST = """\
Come up with a series of diverse task instructions for a helpful AI assistant. Each one is a single \
line: a task a person might really ask for, with any input it needs written in the same line.

{examples}"""

_ITEM_NUMBER = re.compile(r"^\d+[.)]\s*")
_TAG = re.compile(r"<instruction>(.*?)</instruction>", re.DOTALL | re.IGNORECASE)


def build_prompt(style: str, examples: list[str]) -> tuple[list[Message], str]:
    """(messages, prefill) asking the teacher for one new instruction after `examples`."""
    if style == "tagged":
        shown = "\n".join(f"<instruction>{_one_line(e)}</instruction>" for e in examples)
        return [{"role": "user", "content": TAGGED_REQUEST.format(k=len(examples), examples=shown)}], ""
    if style == "list":
        shown = "\n".join(f"{i}. {_one_line(e)}" for i, e in enumerate(examples, 1))
        return [{"role": "user", "content": LIST_REQUEST.format(examples=shown)}], f"{len(examples) + 1}."
    raise ValueError(f"unknown prompt style {style!r} (choose one of {', '.join(STYLES)})")


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
