"""Chat templating and the one helper that builds (input_ids, labels) with prompt tokens masked.

Every stage that computes a response-only loss (warm-up, influence, DPO data checks, SFT, eval)
uses `encode_example`, so "response tokens" means the same thing everywhere: the tokens after the
chat-templated prompt (and any prefill), up to and including the end-of-turn token.
"""

from __future__ import annotations

IGNORE_INDEX = -100


def prompt_text(tokenizer, messages: list[dict], prefill: str = "") -> str:
    """The exact text the model is conditioned on: chat template + generation prompt + prefill."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + prefill


def encode_example(tokenizer, messages: list[dict], response: str, *, prefill: str = "",
                   max_length: int | None = None, add_eos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response and labels with every prompt position set to -100.

    Prompt and response are tokenized separately and concatenated: the same token boundary as
    generation, where the response tokens were sampled after the prompt tokens. Truncation cuts the
    end of the response; a prompt longer than max_length leaves no response token (all -100).
    """
    prompt_ids = tokenizer(prompt_text(tokenizer, messages, prefill), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return input_ids, labels


def user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]
