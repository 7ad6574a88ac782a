"""The one interface every generation backend implements; the stages never know which one runs."""

from __future__ import annotations

from dataclasses import dataclass

from montessori.records import Message


@dataclass
class Sampling:
    """Sampling semantics shared by all backends (OpenAI / vLLM meaning of each field)."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 0.9
    presence_penalty: float = 1.0  # as SamplingConfig (docs/method.md, steps 1-2: 1.0); OpenAI's own default is 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 1024

    @classmethod
    def from_config(cls, cfg) -> "Sampling":
        return cls(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, presence_penalty=cfg.presence_penalty,
                   repetition_penalty=cfg.repetition_penalty, max_new_tokens=cfg.max_new_tokens)


@dataclass
class Request:
    """One prompt: chat messages, text prefilled into the assistant turn, and its sampling seed."""
    messages: list[Message]
    prefill: str = ""
    seed: int = 0


@dataclass
class Completion:
    text: str  # generated after the prompt and prefill, special tokens removed
    tokens: int  # generated tokens, end-of-sequence included
    finish_reason: str = "stop"  # stop (EOS) or length (max_new_tokens reached)


class Backend:
    """Generates `sampling.n` completions for each request, in request order."""
    name = "base"

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        raise NotImplementedError

    def close(self) -> None:
        pass
