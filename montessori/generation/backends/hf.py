"""transformers backend (CPU and GPU), two engines (`generation.engine`):

- `fast` (slots.py): our own continuous-batching decode loop over a slot KV cache, compiled on CUDA,
  with draws that depend on each request's own seed only. The default on CUDA.
- `generate`: batched `model.generate` with left padding and the KV cache, described below.

Both mean the same by every sampling knob; they draw different random numbers, so the same seed
gives different (equally distributed) text on the two engines.

In the `generate` engine two logits processors sample, so that every backend means the same thing by
each knob: `PresencePenalty` (OpenAI/vLLM semantics; transformers has none) and `SeededSampler`, which applies
temperature and top-p and then draws the token with the Gumbel-max trick from its own generator,
leaving one finite logit for greedy decoding to pick. The draw thus depends only on the seed of the
call, never on the global RNG state of the process: a resumed stage samples the same text.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from montessori.generation.backends.base import Backend, Completion, Request, Sampling
from montessori.models.chat import prompt_text

log = logging.getLogger(__name__)


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

    def __init__(self, model, tokenizer, engine: str = "auto", compile: str = "auto", slots: int | None = None):
        """`slots`: sequences decoded at once by the fast engine (`generation.batch_size`); None = the
        rows of the call (at most 256). `compile` (fast engine): on = torch.compile, graphs = CUDA graphs
        of the eager step, off; auto = graphs on CUDA, off on CPU."""
        self.model, self.tokenizer = model, tokenizer
        self.model.eval()
        if tokenizer is not None:
            self.tokenizer.padding_side = "left"
        self.eos_ids = _eos_ids(model, tokenizer)
        self.engine = _choose_engine(engine, model)
        cuda = model.device.type == "cuda"
        # auto = CUDA graphs of the eager step: torch.compile of the step failed on the H200 image (torch
        # 2.11: InductorError in the sampling ops' codegen, 2026-12-01, docs/benchmarks.md); `on` tries it.
        self.compile = "graphs" if compile in ("graphs", "auto") and cuda else compile == "on"
        self.slots = slots
        self._fast = None

    @property
    def continuous(self) -> bool:
        """Refills ended rows within a call, and a row's text depends on its own request only."""
        return self.engine == "fast"

    @classmethod
    def load(cls, spec: str, device: str = "auto", dtype: str = "auto", **options) -> "TransformersBackend":
        from montessori.models.load import load_model
        model, tokenizer = load_model(spec, device=device, dtype=dtype, padding_side="left")
        return cls(model, tokenizer, **options)

    @torch.no_grad()
    def generate(self, requests: list[Request], sampling: Sampling,
                 stop: Callable[[], bool] | None = None) -> list[list[Completion]]:
        """`stop`, if given, is asked after every decoding step; True ends generation there (what was
        generated so far is returned; `montessori serve` uses it when a client hangs up)."""
        if not requests:
            return []
        texts = [prompt_text(self.tokenizer, r.messages, r.prefill) for r in requests]
        prompts = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # n samples per prompt: rows prompt0/s0, prompt0/s1, ..., prompt1/s0, ...
        generated = self.generate_tokens(prompts, [r.seed for r in requests], sampling, stop=stop)
        completions = [self._completion(row) for row in generated]
        return [completions[i * sampling.n:(i + 1) * sampling.n] for i in range(len(requests))]

    @torch.no_grad()
    def generate_tokens(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling,
                        stop: Callable[[], bool] | None = None) -> list[list[int]]:
        """Generated ids for each prompt x sample (prompt-major) on the configured engine. The fast
        engine seeds each prompt with its own seed; `generate` seeds the call with the first one."""
        engine = self._fast_engine(prompts, sampling) if self.engine == "fast" else None
        if engine is not None:
            return engine.run(prompts, seeds, sampling, stop=stop)
        # At most `slots` rows per `generate` call, each call seeded by its first prompt: the stage's
        # batches, whatever it hands over (the same text as before the fast engine existed).
        per_call = max(1, self.slots // sampling.n) if self.slots else len(prompts)
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        rows = []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start:start + per_call]
            width = max(len(p) for p in chunk)
            input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk])
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            rows += self.generate_ids(input_ids, attention_mask, sampling, seeds[start], stop=stop)
            if stop is not None and stop():
                break
        rows += [[] for _ in range(len(prompts) * sampling.n - len(rows))]  # stopped: never started
        return rows

    def _fast_engine(self, prompts: list[list[int]], sampling: Sampling):
        """The slot engine for this call (built on first use and checked against a plain forward of
        the model; None, and the `generate` engine from then on, if it does not compute the same)."""
        from montessori.generation.backends.slots import SlotEngine
        slots = self.slots or min(256, len(prompts) * sampling.n)
        if self._fast is None or self._fast.slots < slots or self._fast.eos_ids != self.eos_ids:
            engine = SlotEngine(self.model, self.eos_ids, slots, compile=self.compile)
            # Buffers for this call's sizes first: a later, larger call means new shapes (a recompile).
            engine.allocate(max(len(p) for p in prompts) + sampling.max_new_tokens + 8, sampling.max_new_tokens)
            gap = engine.check(list(prompts[0][:32]))
            log.info("fast generation engine: %d slots, compile %s, greedy gap %.3g", slots, engine.compile, gap)
            # bf16 noise can pick a near-tie (a few % of the logits' spread on a random model); a broken
            # cache or mask picks tokens far from the best one.
            if gap > 0.1:
                log.warning("the fast generation engine does not reproduce %s (greedy gap %.3g); using "
                            "generate instead (generation.engine)", type(self.model).__name__, gap)
                self.engine = "generate"
                return None
            self._fast = engine
        return self._fast

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


def _choose_engine(engine: str, model) -> str:
    from montessori.generation.backends.slots import SlotEngine
    if engine == "auto":
        engine = "fast" if model.device.type == "cuda" else "generate"
    if engine == "fast" and not SlotEngine.supported(model):
        log.warning("generation.engine fast needs transformers' AttentionInterface and a decoder-only "
                    "model; using generate")
        engine = "generate"
    return engine


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
