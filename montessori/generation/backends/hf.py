"""transformers backend (CPU and GPU): batched `generate` with left padding and the KV cache.

Sampling is done by two logits processors so that every backend means the same thing by each knob:
`PresencePenalty` (OpenAI/vLLM semantics; transformers has none) and `SeededSampler`, which applies
temperature and top-p and then draws the token with the Gumbel-max trick from its own generator,
leaving one finite logit for greedy decoding to pick. The draw thus depends only on the seed of the
call, never on the global RNG state of the process: a resumed stage samples the same text.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from montessori.generation.backends.base import Backend, Completion, Request, Sampling
from montessori.models.chat import prompt_text


class PresencePenalty(LogitsProcessor):
    """Subtract `penalty` from the logit of every token already present in the generated part."""

    def __init__(self, penalty: float, prompt_length: int):
        self.penalty, self.prompt_length = penalty, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        if self.penalty == 0 or generated.shape[1] == 0:
            return scores
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, generated, True)
        return scores - self.penalty * seen.to(scores.dtype)


class SeededSampler(LogitsProcessor):
    """Temperature, top-p, then a Gumbel-max draw from a private generator (temperature 0 = greedy)."""

    def __init__(self, temperature: float, top_p: float, seed: int, device: torch.device):
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float()
        if self.temperature > 0:
            logits = logits / self.temperature
            if self.top_p < 1.0:
                logits = _top_p(logits, self.top_p)
            uniform = torch.rand(logits.shape, generator=self.generator, device=logits.device)
            logits = logits - torch.log(-torch.log(uniform.clamp_(1e-20, 1.0)))
        choice = logits.argmax(dim=-1, keepdim=True)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice, 0.0)


def _top_p(logits: torch.Tensor, top_p: float, k: int = 256) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one).

    A full sort of the vocabulary per step costs more than the model on small teachers, so: when the
    k most likely tokens already hold top_p of the mass (the usual case for a trained model), cut
    inside them; otherwise bisect on the probability threshold (a random model's flat distribution)."""
    probs = logits.softmax(dim=-1)
    top, order = probs.topk(min(k, probs.shape[-1]), dim=-1)
    cumulative = top.cumsum(dim=-1)
    if bool((cumulative[:, -1] >= top_p).all()):
        keep_sorted = cumulative - top < top_p
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, keep_sorted)
        return logits.masked_fill(~keep, float("-inf"))
    lo, hi = torch.zeros_like(top[:, :1]), top[:, :1].clone()
    for _ in range(16):  # threshold t: the largest with mass(p >= t) >= top_p, to 2^-16 of the top prob
        mid = (lo + hi) / 2
        enough = torch.where(probs >= mid, probs, 0.0).sum(dim=-1, keepdim=True) >= top_p
        lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid)
    return logits.masked_fill(probs < lo, float("-inf"))


class TransformersBackend(Backend):
    name = "transformers"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.model.eval()
        if tokenizer is not None:
            self.tokenizer.padding_side = "left"
        self.eos_ids = _eos_ids(model, tokenizer)

    @classmethod
    def load(cls, spec: str, device: str = "auto", dtype: str = "auto") -> "TransformersBackend":
        from montessori.models.load import load_model
        model, tokenizer = load_model(spec, device=device, dtype=dtype, padding_side="left")
        return cls(model, tokenizer)

    @torch.no_grad()
    def generate(self, requests: list[Request], sampling: Sampling,
                 stop: Callable[[], bool] | None = None) -> list[list[Completion]]:
        """`stop`, if given, is asked after every decoding step; True ends generation there (what was
        generated so far is returned; `montessori serve` uses it when a client hangs up)."""
        if not requests:
            return []
        texts = [prompt_text(self.tokenizer, r.messages, r.prefill) for r in requests]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        # n samples per prompt in the same call: rows prompt0/s0, prompt0/s1, ..., prompt1/s0, ...
        generated = self.generate_ids(batch["input_ids"], batch["attention_mask"], sampling, requests[0].seed,
                                      stop=stop)
        completions = [self._completion(row) for row in generated]
        return [completions[i * sampling.n:(i + 1) * sampling.n] for i in range(len(requests))]

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Sampling,
                     seed: int, stop: Callable[[], bool] | None = None) -> list[list[int]]:
        """`sampling.n` rows of sampled token ids per left-padded prompt row (prompt-major order).

        With n > 1 the prompts are encoded once and their KV cache copied n times: the prompt, usually
        much longer than the completion, is not recomputed per sample."""
        device = self.model.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        cache = None
        if sampling.n > 1 and input_ids.shape[1] > 1:
            from transformers import DynamicCache
            cache = DynamicCache(config=self.model.config)
            mask = attention_mask[:, :-1]
            # Positions as `generate` numbers left-padded rows: from the first real token.
            positions = (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 1)
            with _quiet():
                self.model(input_ids=input_ids[:, :-1], attention_mask=mask, position_ids=positions,
                           past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(sampling.n)
        input_ids = input_ids.repeat_interleave(sampling.n, dim=0)
        attention_mask = attention_mask.repeat_interleave(sampling.n, dim=0)
        prompt_length = input_ids.shape[1]
        processors = LogitsProcessorList([
            PresencePenalty(sampling.presence_penalty, prompt_length),
            SeededSampler(sampling.temperature, sampling.top_p, seed, device),
        ])
        config = GenerationConfig(
            do_sample=False, max_new_tokens=sampling.max_new_tokens, repetition_penalty=sampling.repetition_penalty,
            eos_token_id=self.eos_ids or None, pad_token_id=self.tokenizer.pad_token_id if self.tokenizer else 0,
            num_beams=1)
        with _quiet():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                         generation_config=config, logits_processor=processors,
                                         stopping_criteria=StoppingCriteriaList([_Stop(stop)] if stop else []),
                                         past_key_values=cache)
        return output[:, prompt_length:].tolist()

    def _completion(self, ids: list[int]) -> Completion:
        end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        if end is None:
            return Completion(self.tokenizer.decode(ids, skip_special_tokens=True), len(ids), "length")
        return Completion(self.tokenizer.decode(ids[:end], skip_special_tokens=True), end + 1, "stop")


class _Stop(StoppingCriteria):
    """Ends every row when `stop()` says so (transformers asks once per decoding step)."""

    def __init__(self, stop: Callable[[], bool]):
        self.stop = stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), bool(self.stop()), dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def _quiet():
    # transformers 5 renames `past_key_values` to `cache` (FutureWarning); 4.x knows only the old name.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        yield


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
