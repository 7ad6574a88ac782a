"""Judges: a model that says which of two answers is better, or grades one answer from 1 to 10.

A judge is anything with

    prefer(instruction, answer_a, answer_b) -> float in [0, 1]   probability that A is the better answer
    grade(question, answer, reference=None) -> float in [1, 10] or None (no usable verdict)

Two are shipped: `HFJudge`, a local HF chat model read through its next-token probabilities (no
sampling, no parsing: P(A) is the model's probability of "A" vs "B" after the pairwise prompt, the
grade is the expected value of its distribution over "[[1]]" .. "[[10]]"), and `HTTPJudge`, any
OpenAI-compatible chat-completions endpoint, whose text verdict is parsed.

Position bias is not the judge's business: `winrate.pairwise` asks every pair in both orders.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from typing import Protocol

import torch

from montessori.errors import InputError, MontessoriError

SYSTEM = "You are a careful, impartial judge of the quality of AI assistants' answers."

# AlpacaEval-style pairwise prompt (one instruction, two outputs, name the better one).
PAIRWISE = """Which of the two outputs below is the better answer to the instruction? Judge how helpful, \
correct, relevant and detailed each one is. The order of the outputs and their length must not \
influence your decision.

## Instruction
{instruction}

## Output (A)
{answer_a}

## Output (B)
{answer_b}

Reply with one letter, A or B: the better output."""

# MT-Bench single-answer grading prompt (rating in double brackets).
GRADE = """Please act as an impartial judge and evaluate the quality of the response provided by an AI \
assistant to the user question displayed below. Consider helpfulness, relevance, accuracy, depth, \
creativity and level of detail. {reference_note}Be as objective as possible, then rate the response \
on a scale of 1 to 10 in the format "Rating: [[5]]".

[Question]
{question}
{reference}
[The Start of Assistant's Answer]
{answer}
[The End of Assistant's Answer]"""

GRADE_PREFILL = "Rating: [["
RATINGS = tuple(range(1, 11))


class Judge(Protocol):
    name: str

    def prefer(self, instruction: str, answer_a: str, answer_b: str) -> float: ...

    def grade(self, question: str, answer: str, reference: str | None = None) -> float | None: ...


def pairwise_messages(instruction: str, answer_a: str, answer_b: str) -> list[dict]:
    text = PAIRWISE.format(instruction=instruction, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def grade_messages(question: str, answer: str, reference: str | None = None) -> list[dict]:
    note = "Compare the response with the reference answer and identify its mistakes. " if reference else ""
    ref = f"\n[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n" if reference else ""
    text = GRADE.format(question=question, answer=answer, reference_note=note, reference=ref)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


class HFJudge:
    """A local chat model as judge, read through its probabilities of the verdict tokens."""

    def __init__(self, spec: str, device: str = "auto", dtype: str = "auto", max_length: int = 4096):
        from montessori.models import load_model
        self.name = spec
        self.model, self.tokenizer = load_model(spec, device=device, dtype=dtype)
        self.model.eval()
        self.max_length = max_length

    @torch.no_grad()
    def choice_logprobs(self, messages: list[dict], prefill: str, choices: list[str]) -> list[float]:
        """log P(choice | chat prompt + prefill) for each choice string (multi-token choices summed)."""
        from montessori.models.chat import prompt_text
        tok = self.tokenizer
        prompt = tok(prompt_text(tok, messages, prefill), add_special_tokens=False)["input_ids"]
        # Over-long prompts keep their end, where the verdict is asked for.
        prompt = prompt[-(self.max_length - 8):]
        conts = [tok(c, add_special_tokens=False)["input_ids"] for c in choices]
        width = len(prompt) + max(len(c) for c in conts)
        device = next(self.model.parameters()).device
        ids = torch.full((len(conts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, c in enumerate(conts):
            row = prompt + c
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        hidden = self.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        head = self.model.get_output_embeddings()
        out = []
        for i, c in enumerate(conts):
            # Only the positions that predict the choice's tokens need the (vocabulary-wide) head.
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c), device=device)
            logp = torch.log_softmax(head(hidden[i, positions]).float(), dim=-1)
            out.append(float(logp[torch.arange(len(c), device=device), torch.tensor(c, device=device)].sum()))
        return out

    def prefer(self, instruction: str, answer_a: str, answer_b: str) -> float:
        la, lb = self.choice_logprobs(pairwise_messages(instruction, answer_a, answer_b), "", ["A", "B"])
        return 1.0 / (1.0 + math.exp(lb - la))

    def grade(self, question: str, answer: str, reference: str | None = None) -> float:
        logps = self.choice_logprobs(grade_messages(question, answer, reference), GRADE_PREFILL,
                                     [f"{r}]]" for r in RATINGS])
        p = torch.softmax(torch.tensor(logps, dtype=torch.float64), dim=0)
        return float((p * torch.tensor(RATINGS, dtype=torch.float64)).sum())


class HTTPJudge:
    """An OpenAI-compatible chat-completions endpoint as judge (text verdicts, parsed)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 max_retries: int = 5):
        self.name = f"{model}@{base_url}"
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.max_retries = model, timeout, max_retries
        self.api_key = os.environ.get(api_key_env)

    def complete(self, messages: list[dict], max_tokens: int = 16) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0.0,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as err:
                if err.code not in (429, 500, 502, 503, 504) or attempt == self.max_retries:
                    raise MontessoriError(f"judge {self.url}: HTTP {err.code} {err.reason}") from None
            except (urllib.error.URLError, TimeoutError) as err:
                if attempt == self.max_retries:
                    raise MontessoriError(f"judge {self.url}: {getattr(err, 'reason', err)}") from None
            time.sleep(min(30.0, 2.0 ** attempt))
        raise AssertionError("unreachable")

    def prefer(self, instruction: str, answer_a: str, answer_b: str) -> float:
        return parse_preference(self.complete(pairwise_messages(instruction, answer_a, answer_b)))

    def grade(self, question: str, answer: str, reference: str | None = None) -> float | None:
        return parse_rating(self.complete(grade_messages(question, answer, reference), max_tokens=512))


def parse_preference(text: str) -> float:
    """1.0 for A, 0.0 for B, 0.5 (a tie) when the verdict names neither."""
    match = re.search(r"\b([AB])\b", text.replace("(", " ").replace(")", " "))
    return 0.5 if match is None else (1.0 if match.group(1) == "A" else 0.0)


def parse_rating(text: str) -> float | None:
    match = re.search(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", text) or re.search(r"\b(10|[1-9])\b", text)
    if match is None:
        return None
    value = float(match.group(1))
    return value if 1 <= value <= 10 else None


def make_judge(model: str | None = None, base_url: str | None = None, *, api_key_env: str = "OPENAI_API_KEY",
               device: str = "auto", dtype: str = "auto") -> Judge:
    """The judge config.JudgeConfig describes: `model` served at `base_url`, else the local model `model`."""
    if not model:
        raise InputError("no judge: pass --judge SPEC (a local model), or --judge NAME --judge-url URL (the "
                         "model an OpenAI-compatible endpoint serves)")
    if base_url:
        return HTTPJudge(base_url, model, api_key_env)
    return HFJudge(model, device=device, dtype=dtype)
