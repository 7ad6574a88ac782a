"""The fast transformers engine: our own decode loop over a slot KV cache (`generation.engine: fast`).

Why not `model.generate`: on an H200 the stage ran 2.9K real tokens/s at batch 256 for a 135M model
while the decode alone could do ~33K with a static cache. The time went to rows that had ended but
kept their slot until the longest row was done, the dynamic cache, full-vocabulary processors run
one kernel at a time, and per-batch overhead. Here:

- Every sequence (prompt x sample) owns one *slot* (a row of a preallocated KV cache); its token at
  position p lives in column p. Slots whose rows ended (EOS or max_new_tokens) are refilled with
  waiting rows, longest prompts first, once an eighth of the slots is free (continuous batching), so
  no slot decodes padding for long. A prompt is encoded once for its n samples.
- Decode attention reads only the first `view` columns (the longest live row, rounded up to 128)
  and groups the query heads per KV head instead of copying the cache `num_heads / kv_heads` times
  (what SDPA with a mask does); prompts are encoded with the model's own attention (SDPA).
- One decode step (model + penalties + top-p + draw) is a pure tensor function with no host sync;
  on CUDA it is `torch.compile`d (mode reduce-overhead: CUDA graphs) and the host only looks at the
  rows every `SYNC_EVERY` steps.
- The draw for row (request seed s, sample j) at step t uses the uniform `hash(s, j, t)` (a
  counter-based hash, no generator state), so a row's text depends on its prompt and seed only:
  not on which rows share its batch, the batch size, the order of refills or a resume.

Sampling means what the `generate` engine means (base.py: OpenAI/vLLM semantics): repetition
penalty over prompt + generated tokens (HF), presence penalty over generated tokens, temperature,
top-p (the smallest most-likely set reaching top_p), then a token from the renormalized nucleus;
temperature 0 is greedy (argmax after the penalties), as in `generate`. The nucleus is sampled by
rejection, not cut: ATTEMPTS proposals are drawn from the whole distribution (inverse CDF in
vocabulary order) and the first one inside the nucleus is the token. That needs no sort and no
threshold search over the vocabulary, only one pass per proposal (is the mass of the tokens more
likely than it below top_p?): measured on the H200 at 1024 slots, a 20-step threshold bisection was
10.6 of a 20 ms SmolLM2 step (docs/benchmarks.md). Each proposal is accepted with probability >= top_p
whatever the distribution's shape, so a row whose ATTEMPTS proposals all miss (< 0.1% of steps at
top_p 0.9) just waits one step and draws the next ATTEMPTS uniforms: its text is still a function
of its seed.

On CUDA the step is compiled (`generation.compile: on`, torch.compile mode reduce-overhead) or
captured as plain CUDA graphs of the eager step (`graphs`: no compile time); either falls back to
eager decoding, with a warning, when it fails.

Works with decoder-only models whose attention goes through transformers' `AttentionInterface` and
that take `position_ids` and a 4D mask (Llama, Qwen2, Mistral without sliding window, ...):
`SlotEngine.check()` compares one step with a plain forward and the backend falls back to
`generate` where it differs.
"""

from __future__ import annotations

import logging
import warnings

import torch

log = logging.getLogger(__name__)

ATTENTION = "montessori_slots"
SYNC_EVERY = 8  # decode steps between looks at which rows ended (each look is one host sync)
VIEW_ROUND = 128  # attention reads the first `view` cache columns, rounded up to this
REFILL_FRACTION = 8  # ended rows wait until 1/8 of the slots are free, then are refilled together
CAPACITY_ROUND = 512  # cache columns and output length are allocated in steps of this
ATTEMPTS = 3  # top-p proposals per row and step (all three miss with probability <= (1 - top_p)^3)
MASK32 = 0xFFFFFFFF


# ---- sampling: pure tensor functions (also used by tests against slow obvious implementations) ----

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32 in int64 without overflow (split x in 16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32): every input bit flips about half the output bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, sample: torch.Tensor, step: torch.Tensor, attempt: torch.Tensor | int = 0) -> torch.Tensor:
    """A float32 uniform in [0, 1) that is a fixed function of (seed, sample index, step, attempt)."""
    h = _mix32((seed & MASK32) ^ 0x3C6EF372)
    h = _mix32(h ^ (sample & MASK32))
    h = _mix32(h ^ (step & MASK32))
    h = _mix32(h ^ (attempt & MASK32))
    return (h >> 8).to(torch.float32) * (2.0 ** -24)  # 24 bits: exact in float32, never 1.0


def proposal_uniforms(seed: torch.Tensor, sample: torch.Tensor, step: torch.Tensor, tries: torch.Tensor) -> torch.Tensor:
    """[B, ATTEMPTS] uniforms of each row's next top-p proposals: attempts tries .. tries + ATTEMPTS - 1."""
    attempt = tries[:, None] + torch.arange(ATTEMPTS, device=tries.device)
    return uniform(seed[:, None], sample[:, None], step[:, None], attempt)


def in_nucleus(probs: torch.Tensor, index: torch.Tensor, top_p) -> torch.Tensor:
    """Whether token index[b, a] is in row b's top-p nucleus: the tokens more likely than it hold less
    than top_p (HF's and vLLM's cut, ties kept together). One pass over the vocabulary per column."""
    q = probs.gather(1, index)
    more = torch.stack([torch.where(probs > q[:, a:a + 1], probs, 0.0).sum(dim=-1) for a in range(index.shape[1])],
                       dim=1)
    return (more < top_p) | (top_p >= 1.0)  # top_p 1: every token (float sums may reach 1 before the last)


def penalize(logits: torch.Tensor, seen: torch.Tensor, context: torch.Tensor, presence, repetition) -> torch.Tensor:
    """HF repetition penalty over the context (prompt + generated), then OpenAI presence penalty over
    the generated tokens (`seen`), in that order (the order of the `generate` engine's processors)."""
    logits = torch.where(context, torch.where(logits < 0, logits * repetition, logits / repetition), logits)
    return torch.where(seen, logits - presence, logits)


def draw(logits: torch.Tensor, u: torch.Tensor, temperature, top_p) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, accepted) per row for softmax(logits / temperature) restricted to its top-p nucleus.

    u[:, a] gives proposal a: the inverse CDF of the whole distribution at u in vocabulary order.
    The first proposal inside the nucleus is the token. Given that one is accepted, it follows the
    renormalized nucleus exactly (rejection sampling). A row whose proposals all miss (each one
    hits with probability = the nucleus' mass >= top_p) has accepted False."""
    probs = torch.softmax(logits / temperature, dim=-1)
    # float64: a float32 running sum over a 49K vocabulary is off by ~1e-7, 0.5% of a token's width
    # in a flat distribution, enough for a GPU's scan and a CPU's to propose different tokens.
    cdf = probs.double().cumsum(dim=-1)
    # The first column whose CDF exceeds u x total. u < 1, but rounding can land past the end: the
    # last token then, which has a tiny or zero probability and is rejected.
    index = torch.searchsorted(cdf, u.double() * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)
    ok = in_nucleus(probs, index, top_p)
    first = ok.long().argmax(dim=-1, keepdim=True)  # argmax returns the first maximum
    token, accepted = index.gather(1, first).squeeze(1), ok.any(dim=-1)
    # A nucleus of one token (the top token alone reaches top_p) is that token: no proposals needed
    # (at a tiny top_p they would miss with probability 1 - p_max).
    top, best = probs.max(dim=-1)
    alone = top >= top_p
    return torch.where(alone, best, token), accepted | alone


# ---- the cache and the attention it needs ----

class SlotCache:
    """KV cache with one row per slot: row b's token at position p is stored in column p.

    Duck-types the two things transformers' decoder layers ask of a cache (`update`, and
    `get_seq_length` when no positions are given). While `fill` is set, `update` copies a prompt
    batch's keys/values into the slots `fill = (slots, source rows)`; otherwise it writes each
    slot's one new token at column `positions[b]`."""

    is_compileable = True

    def __init__(self, slots: int, capacity: int, positions: torch.Tensor):
        self.slots, self.capacity, self.positions = slots, capacity, positions
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.fill: tuple[torch.Tensor, torch.Tensor] | None = None

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        heads, device = key_states.shape[1], key_states.device
        for states, store in ((key_states, self.keys), (value_states, self.values)):
            buffer = torch.zeros(self.slots, heads, self.capacity, states.shape[-1], dtype=states.dtype,
                                 device=device)
            if device.type == "cuda":  # a fixed address: CUDA graphs may mutate it in place
                torch._dynamo.mark_static_address(buffer)
            store.append(buffer)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == len(self.keys):
            self._allocate(key_states, value_states)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.fill is not None:  # a prompt batch: attention runs over its own keys
            slots, source = self.fill
            length = key_states.shape[2]
            keys[slots, :, :length] = key_states[source]
            values[slots, :, :length] = value_states[source]
            return key_states, value_states
        rows = torch.arange(self.slots, device=keys.device)
        keys[rows, :, self.positions] = key_states[:, :, 0]
        values[rows, :, self.positions] = value_states[:, :, 0]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def slot_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """One query token per slot over the first `attention_mask.shape[-1]` cache columns; query heads
    grouped per KV head (no copy of the cache). Prompts (several query tokens) go to SDPA."""
    if query.shape[2] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads, view = key.shape[1], attention_mask.shape[-1]
    key, value = key[:, :, :view], value[:, :, :view]
    scale = scaling if scaling is not None else dim ** -0.5
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # head h reads KV head h // groups
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale + attention_mask  # [B, kv, groups, view]
    weights = scores.softmax(dim=-1).to(value.dtype)
    out = torch.matmul(weights, value)  # [B, kv, groups, dim]
    return out.reshape(batch, 1, heads, dim), None


def _register_attention() -> bool:
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers < 4.48
        return False
    AttentionInterface.register(ATTENTION, slot_attention)
    return True


# ---- the engine ----

class SlotEngine:
    """Continuous-batching decode of many (prompt, seed, sample) rows over `slots` cache rows."""

    def __init__(self, model, eos_ids: list[int], slots: int, compile: bool | str = False):
        """compile: True = torch.compile (mode reduce-overhead: inductor + CUDA graphs), "graphs" = the
        eager step captured as CUDA graphs, False = eager."""
        self.model, self.slots, self.compile = model, slots, compile
        self.device = model.device
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.eos_ids = list(eos_ids)
        self.eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=self.device)
        self.capacity = self.max_new = 0
        self._step_fn = None

    @staticmethod
    def supported(model) -> bool:
        """Decoder-only, full attention (slot_attention has no sliding window), a recent transformers."""
        config = model.config
        sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
        return not getattr(config, "is_encoder_decoder", False) and not sliding and _register_attention()

    # -- state --

    def allocate(self, capacity: int, max_new: int) -> None:
        """(Re)allocate the slot state when a call needs more than the current one holds (new buffers
        mean a new compiled graph, so sizes only grow and in steps of CAPACITY_ROUND)."""
        if capacity <= self.capacity and max_new <= self.max_new:
            return
        b, v, dev = self.slots, self.vocab, self.device
        self.capacity = max(_round_up(capacity, CAPACITY_ROUND), self.capacity)
        self.max_new = max(_round_up(max_new, CAPACITY_ROUND), self.max_new)
        self.tok = torch.zeros(b, dtype=torch.long, device=dev)  # the next input token
        self.pos = torch.zeros(b, dtype=torch.long, device=dev)  # its position (= its cache column)
        self.count = torch.zeros(b, dtype=torch.long, device=dev)  # tokens generated
        self.done = torch.ones(b, dtype=torch.bool, device=dev)
        self.seed = torch.zeros(b, dtype=torch.long, device=dev)
        self.sample = torch.zeros(b, dtype=torch.long, device=dev)
        self.tries = torch.zeros(b, dtype=torch.long, device=dev)  # top-p proposals used at this step
        self.waited = torch.zeros((), dtype=torch.long, device=dev)  # row-steps whose proposals all missed
        self.seen = torch.zeros(b, v, dtype=torch.bool, device=dev)  # generated tokens (presence)
        self.context = torch.zeros(b, v, dtype=torch.bool, device=dev)  # prompt + generated (repetition)
        self.out = torch.zeros(b, self.max_new, dtype=torch.long, device=dev)  # generated tokens
        self.params = torch.zeros(5, dtype=torch.float32, device=dev)  # temperature, top_p, presence, rep, limit
        self.cache = SlotCache(b, self.capacity, self.pos)
        if dev.type == "cuda":
            for t in (self.tok, self.pos, self.count, self.done, self.seed, self.sample, self.tries, self.waited,
                      self.seen, self.context, self.out, self.params):
                # Unguarded: new buffers (a larger call) make CUDA graphs re-record, not recompile.
                torch._dynamo.mark_static_address(t)
        self._step_fn = None  # captured CUDA graphs point at the old buffers

    # -- one decode step: no host sync, shapes fixed but for `view` --

    def _step(self, view: int, greedy: bool) -> None:
        cols = torch.arange(view, device=self.pos.device)
        # float32: slot_attention adds it to float32 scores; its width tells it how many columns to read.
        mask = torch.where(cols[None, :] <= self.pos[:, None], 0.0, torch.finfo(torch.float32).min)
        logits = self.model(input_ids=self.tok[:, None], position_ids=self.pos[:, None],
                            attention_mask=mask[:, None, None, :], past_key_values=self.cache,
                            use_cache=True).logits[:, -1].float()
        temperature, top_p, presence, repetition, limit = self.params.unbind()
        logits = penalize(logits, self.seen, self.context, presence, repetition)
        live = ~self.done
        if greedy:
            token = logits.argmax(dim=-1)
        else:
            u = proposal_uniforms(self.seed, self.sample, self.count, self.tries)
            token, accepted = draw(logits, u, temperature, top_p)
            # A row whose proposals all missed stays where it is (its KV column is rewritten with
            # the same values next step) and tries the next ATTEMPTS uniforms.
            waiting = live & ~accepted
            self.tries.copy_(torch.where(waiting, self.tries + ATTEMPTS, 0))
            self.waited += waiting.sum()
            live = live & accepted
        token = torch.where(live, token, self.tok)
        rows = torch.arange(self.slots, device=token.device)
        self.out[rows, self.count.clamp(max=self.out.shape[1] - 1)] = torch.where(
            live, token, self.out[rows, self.count.clamp(max=self.out.shape[1] - 1)])
        self.seen[rows, token] |= live
        self.context[rows, token] |= live
        step = live.long()
        self.count += step
        self.done |= (token[:, None] == self.eos[None, :]).any(dim=-1) | (self.count >= limit.long())
        self.pos += step * (~self.done).long()  # an ended row stays where it is (no position overflow)
        self.tok.copy_(token)

    def _stepper(self):
        if self._step_fn is None:
            self._step_fn = self._step
            if self.compile == "graphs" and self.device.type == "cuda":
                self._step_fn = self._graphed()
            elif self.compile and self.compile != "graphs" and not _COMPILE_FAILED:
                _raise_recompile_limit()
                self._step_fn = self._guarded(torch.compile(self._step, mode="reduce-overhead", fullgraph=False))
        return self._step_fn

    def _graphed(self):
        """The eager step captured as one CUDA graph per (view, greedy): no compiler, no compile time;
        each step is one graph launch instead of hundreds of kernel launches. A step writes only into
        the preallocated state, so the graphs can share one memory pool. Eager from the first failed
        capture on."""
        graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        pool = torch.cuda.graph_pool_handle()

        def step(view: int, greedy: bool) -> None:
            graph = graphs.get((view, greedy))
            if graph is not None:
                return graph.replay()
            self._step(view, greedy)  # this call's step, eagerly: also the warm-up capture needs
            if self._step_fn is not step:
                return None
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._step(view, greedy)  # recorded, not run
                graphs[(view, greedy)] = graph
            except Exception as err:  # noqa: BLE001 - an op that cannot be captured: decode eagerly
                log.warning("CUDA graph capture of the decode step failed (%s: %s); decoding eagerly",
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                self._step_fn, self.compile = self._step, False
            return None
        return step

    def _guarded(self, compiled):
        """The compiled step, or the eager one from the first time compiling fails (an unsupported
        op, a missing compiler): slower, never wrong."""
        def step(view: int, greedy: bool) -> None:
            if self._step_fn is not self._step:
                try:
                    return compiled(view, greedy)
                except Exception as err:  # noqa: BLE001 - any compiler failure: decode eagerly
                    log.warning("torch.compile of the decode step failed (%s: %s); decoding eagerly",
                                type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                    global _COMPILE_FAILED
                    _COMPILE_FAILED = True  # a compile attempt costs ~20 s: not again in this process
                    self._step_fn, self.compile = self._step, False
            return self._step(view, greedy)
        return step

    # -- prompts into free slots --

    def _fill(self, slots: list[int], rows: list[tuple[int, int, int]], prompts: list[list[int]]) -> None:
        """Encode the prompts of `rows` (prompt index, sample index, seed) into `slots`: the prompt but
        its last token goes into the cache, the last token is the first decode step's input."""
        unique = sorted({r[0] for r in rows})
        where = {p: k for k, p in enumerate(unique)}
        dev = self.device
        slot_t = torch.tensor(slots, device=dev)
        length = max(len(prompts[p]) for p in unique) - 1
        if length > 0:
            ids = torch.zeros(len(unique), length, dtype=torch.long)
            for k, p in enumerate(unique):  # right-padded: a prompt's tokens sit in columns 0..P-2
                ids[k, :len(prompts[p]) - 1] = torch.tensor(prompts[p][:-1])
            dtype = self.model.get_input_embeddings().weight.dtype
            causal = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=dev).triu_(1)
            positions = torch.arange(length, device=dev)[None].expand(len(unique), -1)
            self.cache.fill = (slot_t, torch.tensor([where[r[0]] for r in rows], device=dev))
            try:
                self.model(input_ids=ids.to(dev), position_ids=positions,
                           attention_mask=causal[None, None].expand(len(unique), 1, -1, -1),
                           past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            finally:
                self.cache.fill = None
        self.tok[slot_t] = torch.tensor([prompts[r[0]][-1] for r in rows], device=dev)
        self.pos[slot_t] = torch.tensor([len(prompts[r[0]]) - 1 for r in rows], device=dev)
        self.count[slot_t] = 0
        self.done[slot_t] = False
        self.sample[slot_t] = torch.tensor([r[1] for r in rows], device=dev)
        self.seed[slot_t] = torch.tensor([r[2] for r in rows], device=dev)
        self.tries[slot_t] = 0
        self.seen[slot_t] = False
        self.context[slot_t] = False
        owners = torch.tensor([s for s, r in zip(slots, rows) for _ in prompts[r[0]]], device=dev)
        tokens = torch.tensor([t for r in rows for t in prompts[r[0]]], device=dev)
        self.context[owners, tokens] = True

    # -- the loop --

    @torch.no_grad()
    def run(self, prompts: list[list[int]], seeds: list[int], sampling, eager: bool = False,
            stop=None) -> list[list[int]]:
        """Generated token ids (EOS included when reached) for each prompt x sample, prompt-major.

        `stop()`, asked every SYNC_EVERY steps, ends the call: rows in flight return what they have,
        rows not started return nothing (`montessori serve` stops a request whose client hung up)."""
        n, max_new = sampling.n, sampling.max_new_tokens
        # Longest prompts first: prompts encoded together have similar lengths (little padding).
        order = sorted(range(len(prompts)), key=lambda p: -len(prompts[p]))
        queue = [(p, j, seeds[p]) for p in order for j in range(n)][::-1]  # pop() takes the next row
        longest = max(len(p) for p in prompts)
        self.allocate(longest + max_new + SYNC_EVERY, max_new)
        self.done.fill_(True)
        self.pos.zero_()
        self.waited.zero_()
        self.params.copy_(torch.tensor([max(sampling.temperature, 1e-6), sampling.top_p, sampling.presence_penalty,
                                        sampling.repetition_penalty, max_new], dtype=torch.float32))
        greedy = sampling.temperature <= 0
        step = self._step if eager else self._stepper()
        owner: list[tuple[int, int, int] | None] = [None] * self.slots
        top = [0] * self.slots  # host-side upper bound of each slot's position
        results: dict[tuple[int, int], list[int]] = {}
        free = list(range(self.slots))
        with _attention(self.model):
            while queue or any(o is not None for o in owner):
                # Refill once an eighth of the slots is free: a prompt pass costs about as much as a few
                # decode steps however few prompts it encodes.
                if queue and len(free) >= min(max(1, self.slots // REFILL_FRACTION), len(queue)):
                    take = [queue.pop() for _ in range(min(len(free), len(queue)))]
                    slots, free = free[:len(take)], free[len(take):]
                    self._fill(slots, take, prompts)
                    for s, r in zip(slots, take):
                        owner[s], top[s] = r, len(prompts[r[0]]) - 1
                view = min(self.capacity, _round_up(max(top) + SYNC_EVERY + 1, VIEW_ROUND))
                for _ in range(SYNC_EVERY):
                    step(view, greedy)
                top = [min(t + SYNC_EVERY, self.capacity - 1) for t in top]
                done = self.done.tolist()
                ended = [s for s, o in enumerate(owner) if o is not None and done[s]]
                if ended:
                    counts = self.count[ended].tolist()
                    outs = self.out[ended].tolist()
                    for s, c, ids in zip(ended, counts, outs):
                        results[owner[s][:2]] = ids[:c]
                        owner[s], top[s] = None, 0
                    free.extend(ended)
                if stop is not None and stop():
                    for s, o in enumerate(owner):
                        if o is not None:
                            results[o[:2]] = self.out[s, :int(self.count[s])].tolist()
                    break
        return [results.get((p, j), []) for p in range(len(prompts)) for j in range(n)]

    # -- is this model served correctly? --

    @torch.no_grad()
    def check(self, prompt: list[int], steps: int = 4) -> float:
        """How far from greedy this engine's greedy tokens are under a plain forward of the same text:
        the largest (best logit - logit of the engine's token) over `steps` tokens, relative to the
        logits' spread. About 0 when the slot path computes what the model computes; the backend falls
        back to `generate` when it is not (a model whose attention or cache this engine cannot drive)."""
        from montessori.generation.backends.base import Sampling
        # Eager: compiling the greedy variant only for this check would cost a compilation.
        ids = self.run([prompt], [0], Sampling(n=1, temperature=0.0, presence_penalty=0.0, max_new_tokens=steps),
                       eager=True)[0]
        full = torch.tensor([prompt + ids], device=self.device)
        first = len(prompt) - 1  # the logits that predicted ids[0]
        logits = self.model(input_ids=full, use_cache=False).logits[0, first:first + len(ids)].float()
        chosen = logits.gather(1, torch.tensor(ids, device=self.device)[:, None]).squeeze(1)
        spread = (logits.amax(-1) - logits.amin(-1)).clamp(min=1e-6)
        return float(((logits.amax(-1) - chosen) / spread).max())


_COMPILE_FAILED = False  # set by the first failed torch.compile of a decode step


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _raise_recompile_limit() -> None:
    # One graph per distinct attention view (a few) on top of transformers' own compiled graphs.
    import torch._dynamo.config as dynamo_config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))


class _attention:
    """Route the model's attention through `slot_attention` for the duration of a call."""

    def __init__(self, model):
        self.config = model.config
        self.warnings = warnings.catch_warnings()

    def __enter__(self):
        self.warnings.__enter__()
        # transformers 5.2x renames `past_key_values` to `cache` (FutureWarning); 5.17 knows only the old name.
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        self.previous = self.config._attn_implementation
        self.config._attn_implementation = ATTENTION

    def __exit__(self, *exc):
        self.config._attn_implementation = self.previous
        self.warnings.__exit__(*exc)
