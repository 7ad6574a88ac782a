"""llama.cpp backend (`generation.backend: llamacpp`, extra `[cpu]`): a GGUF teacher run as it is, quantized,
in process on the CPU through llama-cpp-python's C API.

Why: the transformers backend dequantizes a GGUF to fp32 torch, and Qwen2.5-Coder-1.5B then writes 8-14
tokens/s on 2 cores; llama.cpp runs the Q4_K weights directly, several times faster (docs/benchmarks.md,
"llama.cpp on the 2-core CPU"). In process rather than llama.cpp's server behind the http backend: no
port, no process to start and stop, and the prompt and the sampling stay ours, as below.

What it shares with the other backends, so the same config means the same thing on each:

- the prompt: the model's chat template (a named model's own, as `load_tokenizer` would set it) rendered by
  transformers' own jinja renderer with the tokenizer's special tokens, then tokenized with special tokens
  parsed and no BOS added: the text the transformers backend conditions on (tested against it).
- sampling: llama.cpp computes the logits; numpy applies what hf.py applies, in its order: repetition
  penalty over prompt and generated tokens (transformers' meaning), presence penalty over the generated
  ones (OpenAI/vLLM's), temperature, top-p, then one draw from a generator seeded by the request's seed
  and the sample's index. A sample's draws thus depend on its own request only; its logits come from
  llama.cpp's kernels, which may round differently when other rows share the step (the stages hand over
  the same batches on a re-run, so a resumed stage samples the same text).
- continuous batching: up to `parallel` sequences decode in one llama_decode per step, each in its own
  KV stream; an ended sequence's slot takes the next waiting request at once. A request's prompt is
  decoded once, alone, and its KV copied to its n samples.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from montessori.errors import InputError
from montessori.generation.backends.base import Backend, Completion, Request, Sampling

log = logging.getLogger(__name__)

# llama.cpp's CPU threads meet at an OpenMP barrier after every op. Spinning there (OpenMP's default) while
# another process holds a core made 2 threads 7x slower than 1 on the shared 2-core machine; sleeping cost
# them little (docs/benchmarks.md). libgomp reads this when it loads: before anything imports llama_cpp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available() -> bool:
    import importlib.util
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_source(spec: str) -> tuple[Path, str | None] | None:
    """(GGUF file, chat template replacing the file's or None) when `spec` names a GGUF model, else None.
    Assembles a named model's parts once (as the transformers path does); resolves nothing else. A
    teacher the dpo stage trained from a GGUF one (models.lora_gguf) is its base's source: `adapters`
    says what to apply over it."""
    from montessori.models.load import NAMED_MODELS, assemble_gguf
    from montessori.models.lora_gguf import adapted_base
    adapted = adapted_base(spec)
    if adapted is not None:
        return gguf_source(adapted[0])
    if spec in NAMED_MODELS:
        named = NAMED_MODELS[spec]
        return assemble_gguf(named), named.chat_template
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise InputError(f"model '{spec}': GGUF file not found")
        named = next((m for m in NAMED_MODELS.values() if m.gguf == path.name), None)
        return path, named.chat_template if named else None
    return None


def is_gguf_spec(spec: str) -> bool:
    """Does `spec` name a GGUF model (a named model, a .gguf path, or a teacher trained from one and
    saved with its adapters as GGUF)? Nothing is assembled."""
    from montessori.models.load import NAMED_MODELS
    from montessori.models.lora_gguf import adapted_base
    return spec in NAMED_MODELS or spec.endswith(".gguf") or adapted_base(spec) is not None


def adapters(spec: str) -> list[Path]:
    """The LoRA adapter files llama.cpp applies over the base GGUF of `spec` (none for a plain GGUF)."""
    from montessori.models.lora_gguf import adapted_base
    adapted = adapted_base(spec)
    return [] if adapted is None else adapted[1]


def default_threads() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


@dataclass
class _Row:
    """One sample being decoded in a slot (KV stream)."""
    index: int  # prompt-major: prompt i's sample j is row i * n + j
    seq: int
    pos: int  # position of the next token fed (the first sampled one goes right after the prompt)
    rng: np.random.Generator
    seen: np.ndarray  # bool over the vocabulary: prompt + generated (repetition penalty)
    generated: np.ndarray  # bool over the vocabulary: generated only (presence penalty)
    ids: list[int] = field(default_factory=list)


class LlamaCppBackend(Backend):
    name = "llamacpp"
    # Refills ended rows within a call: the responses stage hands it several batches at once.
    continuous = True

    def __init__(self, gguf: str | Path, *, chat_template: str | None = None, threads: int | None = None,
                 parallel: int = 16, lora: Sequence[str | Path] = ()):
        """`parallel`: sequences decoded at once (`generation.batch_size`); `threads`: CPU threads
        (`generation.threads`; None = every core this process may use); `lora`: LoRA adapter GGUF
        files applied over the model, each at scale 1 (a DPO-trained teacher: models.lora_gguf)."""
        import llama_cpp
        _quiet(llama_cpp)
        self.lib, self.path = llama_cpp, Path(gguf)
        self.threads = threads or default_threads()
        self.parallel = max(1, parallel)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise InputError(f"{self.path}: llama.cpp could not load this GGUF file")
        self.lora = []
        for path in lora:
            adapter = llama_cpp.llama_adapter_lora_init(self.model, str(path).encode())
            if not adapter:
                raise InputError(f"{path}: llama.cpp could not load this LoRA adapter over {self.path}")
            self.lora.append(adapter)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
        self.chat_template = chat_template or self.meta("tokenizer.chat_template") or _plain_template()
        self.special_tokens = {name: self.token_text(tok) for name, tok in (
            ("bos_token", llama_cpp.llama_vocab_bos(self.vocab)), ("eos_token", llama_cpp.llama_vocab_eos(self.vocab)),
            ("pad_token", llama_cpp.llama_vocab_pad(self.vocab))) if tok >= 0}
        self.ctx = None
        self.slots = self.per_seq = 0

    @classmethod
    def load(cls, spec: str, **options) -> "LlamaCppBackend":
        source = gguf_source(spec)
        if source is None:
            raise InputError(f"model '{spec}': the llamacpp backend runs GGUF models (a named model such as "
                             f"qwen2.5-coder-1.5b or a .gguf file)")
        gguf, template = source
        return cls(gguf, chat_template=template, lora=adapters(spec), **options)

    # -- text in, text out --------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # a long chat template: ask again with room for it
            buf = ctypes.create_string_buffer(n + 1)
            self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        return self.lib.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")

    def prompt_text(self, messages: list[dict], prefill: str = "") -> str:
        """What the model is conditioned on: as montessori.models.chat.prompt_text renders it."""
        from transformers.utils.chat_template_utils import render_jinja_template
        rendered, _ = render_jinja_template([list(messages)], chat_template=self.chat_template,
                                            add_generation_prompt=True, **self.special_tokens)
        return rendered[0] + prefill

    def tokenize(self, text: str) -> list[int]:
        # No BOS added, special tokens parsed: the template writes them, as the stages encode it.
        data = text.encode("utf-8")
        buf = (self.lib.llama_token * (len(data) + 8))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, True)
        if n < 0:
            buf = (self.lib.llama_token * -n)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, True)
        return list(buf[:n])

    def detokenize(self, ids: list[int]) -> str:
        if not ids:
            return ""
        tokens = (self.lib.llama_token * len(ids))(*ids)
        size = 8 * len(ids) + 16
        buf = ctypes.create_string_buffer(size)
        # Special tokens dropped, as transformers' decode(skip_special_tokens=True).
        n = self.lib.llama_detokenize(self.vocab, tokens, len(ids), buf, size, True, False)
        if n < 0:
            size = -n + 1
            buf = ctypes.create_string_buffer(size)
            n = self.lib.llama_detokenize(self.vocab, tokens, len(ids), buf, size, True, False)
        return buf.raw[:n].decode("utf-8", errors="replace")

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        if not requests:
            return []
        prompts = [self.tokenize(self.prompt_text(r.messages, r.prefill)) for r in requests]
        rows = self.generate_tokens(prompts, [r.seed for r in requests], sampling)
        done = [self._completion(ids) for ids in rows]
        return [done[i * sampling.n:(i + 1) * sampling.n] for i in range(len(requests))]

    def _completion(self, ids: list[int]) -> Completion:
        if ids and self.ends(ids[-1]):
            return Completion(self.detokenize(ids[:-1]), len(ids), "stop")
        return Completion(self.detokenize(ids), len(ids), "length")

    # -- decoding -----------------------------------------------------------------------------------

    def _context(self, slots: int, per_seq: int) -> None:
        """A context of `slots` KV streams of at least `per_seq` cells each (grown, never shrunk)."""
        # llama.cpp sizes each stream in multiples of 256 cells: ask for one, so none is rounded below need.
        per_seq = min(-(-per_seq // 256) * 256, self.n_ctx_train or per_seq)
        if self.ctx is not None and slots <= self.slots and per_seq <= self.per_seq:
            return
        self._free_context()
        self.slots, self.per_seq = max(slots, self.slots), max(per_seq, self.per_seq)
        params = self.lib.llama_context_default_params()
        params.n_ctx = self.slots * self.per_seq
        params.n_seq_max = self.slots
        # One decode call holds a whole prompt, or a token of every slot.
        params.n_batch = max(self.per_seq, self.slots)
        params.n_ubatch = min(512, params.n_batch)
        params.n_threads = params.n_threads_batch = self.threads
        # A stream per sequence: attention reads only its own cells. With one unified cache every row
        # attends over all rows' cells (masked), and a sample's text changed with its neighbours (tested).
        params.kv_unified = False
        params.no_perf = True
        self.ctx = self.lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise InputError(f"{self.path}: llama.cpp could not create a context of {self.slots} x "
                             f"{self.per_seq} tokens (lower generation.batch_size)")
        if self.lora:
            handles = (self.lib.llama_adapter_lora_p_ctypes * len(self.lora))(*self.lora)
            scales = (ctypes.c_float * len(self.lora))(*[1.0] * len(self.lora))
            if self.lib.llama_set_adapters_lora(self.ctx, handles, len(self.lora), scales):
                raise InputError(f"{self.path}: llama.cpp could not apply the LoRA adapters")
        self.memory = self.lib.llama_get_memory(self.ctx)
        self.batch = self.lib.llama_batch_init(params.n_batch, 0, 1)

    def _free_context(self) -> None:
        if self.ctx is not None:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def close(self) -> None:
        self._free_context()
        for adapter in getattr(self, "lora", []):
            self.lib.llama_adapter_lora_free(adapter)
        self.lora = []
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass

    def generate_tokens(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling) -> list[list[int]]:
        """Generated ids (EOS included when it came) per prompt x sample, prompt-major."""
        n = sampling.n
        longest = max(len(p) for p in prompts) + sampling.max_new_tokens + 1
        if longest > (self.n_ctx_train or longest):
            raise InputError(f"{self.path.name}: a prompt of {max(len(p) for p in prompts)} tokens plus "
                             f"max_new_tokens {sampling.max_new_tokens} exceeds the model's context of "
                             f"{self.n_ctx_train} tokens")
        self._context(max(self.parallel, n), longest)
        self.lib.llama_memory_clear(self.memory, True)
        free = list(range(self.slots))
        waiting = deque(range(len(prompts)))
        active: list[_Row] = []
        out: list[list[int] | None] = [None] * (len(prompts) * n)

        def sample(row: _Row, logits: np.ndarray) -> bool:
            """Draw the row's next token; True when the row has ended (and its slot is free again)."""
            token = sample_token(logits, row, sampling)
            row.ids.append(token)
            row.seen[token] = row.generated[token] = True
            if not (self.ends(token) or len(row.ids) >= sampling.max_new_tokens):
                return False
            out[row.index] = row.ids
            self.lib.llama_memory_seq_rm(self.memory, row.seq, -1, -1)
            free.append(row.seq)
            return True

        while waiting or active:
            # One token per running row, in one decode call, in slot order: llama.cpp splits a call
            # into one pass per run of consecutive slots.
            if active:
                active.sort(key=lambda r: r.seq)
                for k, row in enumerate(active):
                    self._add(k, row.ids[-1], row.pos, row.seq, True)
                    row.pos += 1
                self._decode(len(active))
                active = [row for k, row in enumerate(active) if not sample(row, self._logits(k))]
            # Waiting prompts into the free slots, each decoded alone: mixed into the running rows' call,
            # a prompt is cut into one pass per token (llama.cpp gives every sequence of a pass as many
            # tokens as the shortest has). Its n samples start from its one decoded copy.
            free.sort()
            while waiting and len(free) >= n:
                i = waiting.popleft()
                seqs, free[:] = free[:n], free[n:]
                for pos, tok in enumerate(prompts[i]):
                    self._add(pos, tok, pos, seqs[0], pos == len(prompts[i]) - 1)
                self._decode(len(prompts[i]))
                for s in seqs[1:]:
                    self.lib.llama_memory_seq_cp(self.memory, seqs[0], s, -1, -1)
                logits = self._logits(len(prompts[i]) - 1)
                seen = np.zeros(self.n_vocab, dtype=bool)
                seen[prompts[i]] = True
                for j, s in enumerate(seqs):
                    row = _Row(i * n + j, s, len(prompts[i]), _rng(seeds[i], j), seen.copy(),
                               np.zeros(self.n_vocab, dtype=bool))
                    if not sample(row, logits):
                        active.append(row)
        return out

    def _decode(self, count: int) -> None:
        self.batch.n_tokens = count
        code = self.lib.llama_decode(self.ctx, self.batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed ({code}) with {count} tokens")

    def _logits(self, k: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, k), shape=(self.n_vocab,))

    def ends(self, token: int) -> bool:
        """Does `token` end a turn (EOS, end of turn: llama.cpp's end-of-generation set)?"""
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def _add(self, k: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self.batch
        b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = token, pos, 1, logits
        b.seq_id[k][0] = seq


_LOG_CALLBACK = None  # the ctypes callback must outlive every call llama.cpp makes to it


def _quiet(llama_cpp) -> None:
    """llama.cpp's errors to our log; its load and context chatter (INFO, WARN) dropped."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        def forward(level: int, text: bytes, user_data) -> None:
            if level == 4:  # GGML_LOG_LEVEL_ERROR (ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT)
                log.error("llama.cpp: %s", text.decode("utf-8", errors="replace").rstrip())
        _LOG_CALLBACK = llama_cpp.llama_log_callback(forward)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def _rng(seed: int, sample: int) -> np.random.Generator:
    """The generator of one sample: its request's seed and its index, nothing else."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed % 2 ** 64, sample])))


def sample_token(logits: np.ndarray, row: _Row, sampling: Sampling) -> int:
    """One token as hf.py samples it: repetition penalty (prompt + generated), presence penalty
    (generated), then temperature and top-p, and a draw from the row's generator (temperature 0: greedy)."""
    scores = logits.astype(np.float32, copy=True)
    if sampling.repetition_penalty != 1.0:
        seen = scores[row.seen]
        scores[row.seen] = np.where(seen < 0, seen * sampling.repetition_penalty, seen / sampling.repetition_penalty)
    if sampling.presence_penalty:
        scores[row.generated] -= sampling.presence_penalty
    if sampling.temperature <= 0:
        return int(scores.argmax())
    scores /= sampling.temperature
    keep = top_p_tokens(scores, sampling.top_p)
    kept = scores[keep] - scores[keep].max()
    probs = np.exp(kept)
    probs /= probs.sum()
    return int(keep[min(np.searchsorted(np.cumsum(probs), row.rng.random(), side="right"), len(keep) - 1)])


def top_p_tokens(scores: np.ndarray, top_p: float, k: int = 256) -> np.ndarray:
    """Ids of the tokens top-p keeps, as hf.py's _top_p keeps them: when the k most likely tokens hold top_p
    of the mass, the smallest most-likely-first set that reaches it (at least one); otherwise (a flat
    distribution) those at or above the probability threshold found by the same 16-step bisection. A sort
    of the whole vocabulary would cost 8 ms a token on SmolLM2's 49K, more than the model's step."""
    if top_p >= 1.0:
        return np.arange(len(scores))
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    k = min(k, len(probs))
    top = np.argpartition(-probs, k - 1)[:k]
    top = top[np.argsort(-probs[top], kind="stable")]
    cumulative = np.cumsum(probs[top])
    if cumulative[-1] >= top_p:
        # A token is kept while the mass before it is below top_p (so the first always is).
        return top[:max(1, int(np.searchsorted(cumulative - probs[top], top_p, side="left")))]
    # mass(p >= t) for any t: from the probabilities sorted once (16 passes over the vocabulary cost more).
    descending = np.sort(probs)[::-1]
    mass = np.cumsum(descending, dtype=np.float64)  # float32 running sums drift over 150K terms
    lo, hi = np.float32(0.0), probs[top[0]]
    for _ in range(16):
        mid = (lo + hi) / np.float32(2)
        if mass[len(descending) - np.searchsorted(descending[::-1], mid, side="left") - 1] >= top_p:
            lo = mid
        else:
            hi = mid
    return np.flatnonzero(probs >= lo)


def _plain_template() -> str:
    from montessori.models.load import PLAIN_CHAT_TEMPLATE
    return PLAIN_CHAT_TEMPLATE
