"""Local data influence: I(z) = L_ref(θ_warm) - L_ref(θ_z), θ_z = one AdamW step on z from the warm-up state.

Two estimators of the same definition (influence/core.py states it plainly; this module computes it
at scale, and tests/test_influence_core.py holds every layout here to core.py):

  exact   take the step, evaluate the reference set, restore. The stepped weights are written into a
          separate buffer (`shadow`) and swapped in by pointer, so θ_warm is never modified and the
          restore is bit-exact by construction; m, v and the step count are only read.
  linear  the first-order Taylor form I(z) ≈ -∇L_ref(θ_warm) · Δ_z, with Δ_z the exact AdamW update
          z causes (real moments, real step count), computed elementwise and never applied.

L_ref is the token-mean cross-entropy over all response tokens of the reference set: the sum of
token losses divided by the token count, accumulated in fp64 across batches (and across processes
with torch.distributed), so it does not depend on the evaluation batch size or on how many
processes share the reference set.

Memory: the candidate's gradient is consumed as soon as backward produces it
(`register_post_accumulate_grad_hook`), in buckets of at most BUCKET_BYTES, and dropped, so a full
gradient never exists. The resident state is θ, m, v (fp32) plus one more copy: the shadow weights
(exact) or ∇L_ref (linear). When four fp32 copies do not fit the device (an 8B student: 4 x 32 GB on
a 141 GB GPU), ∇L_ref is kept in bf16 (accumulated in fp32 first, before the moments reach the
device) and the exact estimator steps θ in place and restores it from a pinned host copy
(`shadow="host"`): bit-exact either way. Budget per parameter: 12 bytes (θ, m, v) + 4 (fp32 shadow
or ∇L_ref), 2 (bf16 ∇L_ref) or 0 (host shadow); docs/benchmarks.md has the measured peaks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from montessori.influence.settings import InfluenceSettings
from montessori.models.batching import Batch, Example, encode_pairs, length_batches, precision_context, token_loss_sum
from montessori.models.chat import IGNORE_INDEX
from montessori.records import InfluenceResult, Pair

ESTIMATORS = ("exact", "linear")
COMPILE = ("auto", "on", "off")  # influence.compile
# How the linear step runs: hooks = eager, gradient consumed in buckets during backward (below);
# flat / graphed = fast.py (a fused update per parameter; graphed adds CUDA graphs);
# auto = graphed on CUDA, hooks elsewhere (`resolve_linear_kernel`).
LINEAR_KERNELS = ("auto", "hooks", "flat", "graphed")


def resolve_linear_kernel(kernel: str, device: torch.device) -> str:
    """auto -> graphed on CUDA: 7x faster than hooks on the H200 (17 vs 119 ms per TinyLlama-1.1B
    candidate, with compile="auto") and reproducible bit for bit (its attention runs on the
    deterministic math backend, fast.SDPA_BACKENDS); on the CPU the step is matmul-bound and the fast
    path buys nothing, and CUDA graphs need CUDA: hooks. Measurements: docs/benchmarks.md."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"linear_kernel {kernel!r}: choose one of {LINEAR_KERNELS}")
    if kernel == "auto":
        return "graphed" if device.type == "cuda" else "hooks"
    return kernel


# Candidate gradients held before one batched (torch._foreach_*) update. Per-parameter updates cost
# ~13 kernel launches per tensor (2,600 for TinyLlama's 201 tensors) and dominated the linear step;
# measured in docs/benchmarks.md.
BUCKET_BYTES = 256 << 20
# A fourth fp32 copy of the weights (shadow or ∇L_ref) is kept on the device only if 4 copies take
# at most this share of its memory; the rest is activations, logits chunks and the allocator's slack.
RESIDENT_SHARE = 0.8


# ---------------------------------------------------------------------------------------------
# The reference set: L_ref and ∇L_ref


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def _my_share(batches: Sequence[Batch]) -> Sequence[Batch]:
    """With torch.distributed, each process evaluates every world-th batch; sums are all-reduced."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return batches[torch.distributed.get_rank()::torch.distributed.get_world_size()]
    return batches


@torch.no_grad()
def reference_loss(model, batches: Sequence[Batch], precision: str = "float32") -> float:
    """Token-mean response loss over the whole reference set: Σ token losses / Σ tokens (fp64)."""
    device = batches[0].input_ids.device
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    with precision_context(precision, device):
        for batch in _my_share(batches):
            s, n = token_loss_sum(model, batch)
            acc += torch.stack([s.double(), torch.tensor(float(n), dtype=torch.float64, device=device)])
    total, count = _all_reduce(acc).tolist()
    return total / count if count else float("nan")


def reference_grad(model, batches: Sequence[Batch], precision: str = "float32") -> list[torch.Tensor]:
    """∇L_ref(θ) with L_ref the token mean: each batch contributes Σ losses / N_total, so gradients
    accumulate in the fp32 .grad of the fp32 master weights, independent of batching."""
    device = batches[0].input_ids.device
    count = sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    params = list(model.parameters())
    for p in params:
        p.grad = None
    with precision_context(precision, device):
        for batch in _my_share(batches):
            s, n = token_loss_sum(model, batch)
            if n:  # an example that max_length cut to its prompt has no target token, so no graph
                (s / count).backward()
    grads = []
    for p in params:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        grads.append(_all_reduce(g.float()))
        p.grad = None
    return grads


# ---------------------------------------------------------------------------------------------
# The optimizer state and the AdamW step


@dataclass
class AdamWState:
    """The warm-up optimizer's state, read-only here: per-parameter moments, step count, hyperparameters.

    `lr` is the learning rate of the probing step: what the scheduler gives at the next step, which
    torch stores in the param group after `scheduler.step()`."""
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    step: int
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float

    @classmethod
    def from_state_dict(cls, state_dict: dict, params: Sequence[torch.nn.Parameter]) -> AdamWState:
        """From `torch.optim.AdamW(model.parameters()).state_dict()` (one param group). A parameter
        without state (no step taken yet) gets zero moments."""
        if len(state_dict["param_groups"]) != 1:
            raise ValueError("expected an AdamW state_dict with one parameter group")
        group = state_dict["param_groups"][0]
        if len(group["params"]) != len(params):
            raise ValueError(f"optimizer state has {len(group['params'])} parameters, the model {len(params)}")
        m, v, steps = [], [], set()
        for key, p in zip(group["params"], params):
            s = state_dict["state"].get(key)
            if s is None:
                m.append(torch.zeros_like(p, dtype=torch.float32))
                v.append(torch.zeros_like(p, dtype=torch.float32))
                steps.add(0)
            else:
                m.append(s["exp_avg"].float())  # where they are: the engine moves them (after ∇L_ref)
                v.append(s["exp_avg_sq"].float())
                steps.add(int(float(s["step"])))
        if len(steps) > 1:
            raise ValueError(f"parameters have different step counts {sorted(steps)}")
        return cls(m, v, steps.pop() if steps else 0, float(group["lr"]), tuple(group["betas"]),
                   float(group["eps"]), float(group["weight_decay"]))

    def to(self, device) -> AdamWState:
        """Move the moments to `device`, tensor by tensor (in place: the host copies are freed as it goes)."""
        for moments in (self.exp_avg, self.exp_avg_sq):
            for i, t in enumerate(moments):
                moments[i] = t.to(device)
        return self


def fits_device(params: Sequence[torch.Tensor], bytes_per_param: float) -> bool:
    """Whether `bytes_per_param` bytes for every parameter fit RESIDENT_SHARE of the device (always
    true off CUDA). θ, m, v and one more fp32 copy: 16 bytes."""
    device = params[0].device
    if device.type != "cuda":
        return True
    total = torch.cuda.get_device_properties(device).total_memory
    return bytes_per_param * sum(p.numel() for p in params) <= RESIDENT_SHARE * total


def foreach_denoms(G, M, V, step: int, betas, eps):
    """core.adamw_delta's moment update and denominator over lists of tensors, op for op as torch's
    foreach AdamW, into new tensors (m, v untouched). Returns (m', denom, 1-β1^t) for t = step + 1.
    fast.adam_ratio is the same per tensor; tests/test_influence_core.py holds both to core."""
    b1, b2 = betas
    t = step + 1
    m1 = torch._foreach_lerp(M, G, 1 - b1)
    denom = torch._foreach_mul(V, b2)
    torch._foreach_addcmul_(denom, G, G, value=1 - b2)
    torch._foreach_sqrt_(denom)
    torch._foreach_div_(denom, (1 - b2 ** t) ** 0.5)
    torch._foreach_add_(denom, eps)
    return m1, denom, 1 - b1 ** t


def foreach_stepped(TH, G, M, V, OUT, step: int, lr: float, betas, eps: float, weight_decay: float):
    """θ_z = θ(1 - lr·wd) - lr/(1-β1^t) · m'/denom, written into OUT (OUT may be TH: an in-place step)."""
    m1, denom, bc1 = foreach_denoms(G, M, V, step, betas, eps)
    if any(o is not th for o, th in zip(OUT, TH)):
        torch._foreach_copy_(OUT, TH)
    if weight_decay:
        torch._foreach_mul_(OUT, 1 - lr * weight_decay)
    torch._foreach_addcdiv_(OUT, m1, denom, value=-lr / bc1)


def foreach_update_dots(R, G, M, V, step: int, lr: float, betas, eps: float) -> torch.Tensor:
    """Σ_i R_i · (-lr/(1-β1^t) · m'_i/denom_i): the Adam part of ∇L_ref · Δ_z over a list (fp32 sum;
    the weight-decay part -lr·wd·∇L_ref·θ is a constant of the warm-up state, added once)."""
    m1, denom, bc1 = foreach_denoms(G, M, V, step, betas, eps)
    torch._foreach_div_(m1, denom)
    dots = torch.stack([torch.dot(r.flatten().float(), u.flatten()) for r, u in zip(R, m1)])
    return dots.double().sum() * (-lr / bc1)


# ---------------------------------------------------------------------------------------------
# The engine


class InfluenceEngine:
    """Holds the warm-up state in memory and scores candidates one at a time, never disturbing it.

    ref_grad_dtype (linear): "float32", "bfloat16" (stored after fp32 accumulation) or "auto" (float32 when four
    fp32 copies fit the device). shadow (exact): "device" (stepped weights in a second fp32 buffer,
    swapped in by pointer), "host" (θ stepped in place, restored from a pinned host copy) or "auto".
    compile: "on" (torch.compile the eager passes and the fast path's copy), "off", or "auto" (only the
    graphed linear step's copy, on CUDA). The moments may be given on the host: they move to the device
    after ∇L_ref is computed."""

    def __init__(self, model, state: AdamWState, reference: Sequence[Example], *, pad_id: int,
                 settings: InfluenceSettings | None = None, **knobs):
        """settings (or InfluenceSettings' fields as keywords, overriding it): how to compute; its
        max_length, reference_max_length and device are the caller's (reference is encoded already)."""
        self.params = list(model.parameters())
        self.device = self.params[0].device
        s = self.settings = replace(settings or InfluenceSettings(), **knobs).resolve(self.device)
        if s.estimator not in ESTIMATORS:
            raise ValueError(f"estimator {s.estimator!r}: choose one of {ESTIMATORS}")
        if s.compile not in COMPILE:
            raise ValueError(f"compile {s.compile!r}: choose one of {COMPILE}")
        self.model, self.state, self.estimator, self.compile = model, state, s.estimator, s.compile
        self.precision, self.grad_precision = s.precision, s.grad_precision
        self.lr = state.lr if s.lr is None else s.lr
        kernel = resolve_linear_kernel(s.linear_kernel, self.device)  # checked before the reference pass
        if any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("the influence engine needs fp32 master weights (precision is set by `precision`)")
        self.batches = length_batches(reference, s.eval_batch_size, pad_id, self.device)
        model.eval()  # no dropout: the same state must give the same value
        self.loss_before = reference_loss(model, self.batches, s.precision)
        fits = fits_device(self.params, 16)
        self.ref_grad_dtype = ("float32" if fits else "bfloat16") if s.ref_grad_dtype == "auto" else s.ref_grad_dtype
        self.shadow_mode = ("device" if fits else "host") if s.shadow == "auto" else s.shadow
        self.ref_dot_theta = 0.0
        self.fast = None
        self.linear_kernel = None
        if s.estimator == "linear":  # one example per backward: activations of a batch would not fit an 8B
            grads = reference_grad(model, length_batches(reference, 1, pad_id, self.device), s.precision)
            dtype = torch.bfloat16 if self.ref_grad_dtype == "bfloat16" else torch.float32
            for i, g in enumerate(grads):  # tensor by tensor: the fp32 copy is freed as it goes
                grads[i] = g.to(dtype)
            self.ref_grad = grads
            if state.weight_decay:  # the update's weight-decay term, -lr·wd·∇L_ref·θ, is fixed per state
                self.ref_dot_theta = float(sum(torch.dot(r.flatten().double(), p.detach().flatten().double())
                                               for r, p in zip(grads, self.params)))
            self.linear_kernel = kernel
        elif self.shadow_mode == "device":
            self.shadow = [torch.empty_like(p) for p in self.params]
        else:
            self.backup = [p.detach().to("cpu", copy=True) for p in self.params]
            if self.device.type == "cuda":
                self.backup = [b.pin_memory() for b in self.backup]
        state.to(self.device)
        self._index = {id(p): i for i, p in enumerate(self.params)}
        # torch.compile of the bucketed elementwise passes (foreach kernels fused by inductor).
        wrap = (lambda f: torch.compile(f, dynamic=True)) if s.compile == "on" else (lambda f: f)
        self._stepped, self._update_dots = wrap(foreach_stepped), wrap(foreach_update_dots)
        self.timing = {"step": 0.0, "eval": 0.0}  # seconds of the last candidate (synchronized on CUDA)
        # Last: the fast path may move θ to the host (an 8B student) and gives it back only on close(),
        # so nothing that can fail comes after it (and FastLinear gives θ back if it fails itself).
        if self.linear_kernel not in (None, "hooks"):  # fast.py: fused update per parameter, CUDA graphs
            self.fast = self._fast_linear(s.grad_precision, s.pad_multiple)

    def _fast_linear(self, grad_precision: str, pad_multiple: int):
        from montessori.influence.fast import FastLinear  # CUDA-only machinery: imported when used
        grad_dtype = torch.bfloat16 if grad_precision == "bfloat16" else torch.float32
        # θ, m, v, ∇L_ref and (bf16) the copy's weights; else θ waits on the host. The candidate
        # gradient is consumed parameter by parameter: never held whole.
        copy = grad_dtype.itemsize if grad_dtype != torch.float32 else 0
        offload = not fits_device(self.params, 12 + self.ref_grad[0].element_size() + copy)
        graphed = self.linear_kernel == "graphed"
        # compile="auto": the graphed step on CUDA compiles its copy's layers (measured 25 -> 17 ms per
        # TinyLlama-1.1B candidate on the H200); the flat step is the CPU-testable form of it, eager.
        compile_layers = self.compile == "on" or (self.compile == "auto" and graphed and self.device.type == "cuda")
        return FastLinear(self.model, self.state, self.ref_grad, lr=self.lr, grad_dtype=grad_dtype,
                          grad_precision=grad_precision, pad_multiple=pad_multiple,
                          graphs=graphed, offload=offload, compile_model=compile_layers)

    def close(self) -> None:
        """Give the model back as it was (the linear fast path borrows hooks on it and, at 8B, its memory)."""
        if self.fast is not None:
            self.fast.close()
            self.fast = None

    # Runs inside backward as soon as parameter p's gradient is complete: the gradient joins the bucket,
    # which is consumed (and freed) once it holds BUCKET_BYTES. A parameter whose gradient is complete is
    # no longer read by backward, so an in-place step of it (shadow="host") is safe.
    def _consume_grad(self, p: torch.nn.Parameter) -> None:
        self._pending.append((self._index[id(p)], p.grad))
        self._pending_bytes += p.grad.numel() * p.grad.element_size()
        p.grad = None
        if self._pending_bytes >= BUCKET_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        s, idx = self.state, [i for i, _ in self._pending]
        G = [g.float() for _, g in self._pending]
        self._pending, self._pending_bytes = [], 0
        M, V = [s.exp_avg[i] for i in idx], [s.exp_avg_sq[i] for i in idx]
        if self.estimator == "linear":
            R = [self.ref_grad[i] for i in idx]
            self._dot += self._update_dots(R, G, M, V, s.step, self.lr, s.betas, s.eps)
            return
        TH = [self.params[i].data for i in idx]
        OUT = [self.shadow[i] for i in idx] if self.shadow_mode == "device" else TH
        self._stepped(TH, G, M, V, OUT, s.step, self.lr, s.betas, s.eps, s.weight_decay)

    def _since(self, started: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def _swap_shadow(self) -> None:
        """Exchange θ and the shadow buffers by pointer: no copy, and θ itself is never written."""
        for i, p in enumerate(self.params):
            self.shadow[i], p.data = p.data, self.shadow[i]

    def _restore(self) -> None:
        """shadow="host": copy θ_warm back from the pinned host copy (bit-exact)."""
        for p, b in zip(self.params, self.backup):
            p.data.copy_(b, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def score(self, example: Example) -> InfluenceResult:
        started = time.perf_counter()
        result = self._score(example)
        result.seconds = round(time.perf_counter() - started, 4)
        return result

    def score_many(self, examples: Iterable[Example]) -> Iterator[InfluenceResult]:
        """`score` of each example, in order, as each is ready. On the linear fast path one candidate is
        queued on the GPU ahead: its step runs while the host reads the previous one's value and
        prepares its inputs (so at most two are in flight; `seconds` is the time between results)."""
        if self.fast is None:
            yield from map(self.score, examples)
            return
        pending, last = None, time.perf_counter()
        for example in examples:
            if example.num_targets == 0:
                value = None
            else:
                value = self.fast.submit(example.input_ids, example.labels)
            if pending is not None:
                yield self._finish(*pending, last)
                last = time.perf_counter()
            pending = (example, value)
        if pending is not None:
            yield self._finish(*pending, last)

    def _finish(self, example: Example, value, since: float) -> InfluenceResult:
        if value is None:
            result = InfluenceResult(example.id, None, self.loss_before, None, "empty_response", self.estimator)
        else:
            result = self._linear_result(example, value())
        result.seconds = self.timing["step"] = round(time.perf_counter() - since, 4)
        return result

    def _score(self, example: Example) -> InfluenceResult:
        def invalid(status, after=None):
            return InfluenceResult(example.id, None, self.loss_before, after, status, self.estimator)
        if example.num_targets == 0:
            return invalid("empty_response")
        if self.fast is not None:
            started = time.perf_counter()
            dot = self.fast.dot(example.input_ids, example.labels)
            self.timing["step"] = self._since(started)
            return self._linear_result(example, dot)
        in_place = self.estimator == "exact" and self.shadow_mode == "host"
        started = time.perf_counter()
        batch = length_batches([example], 1, 0, self.device)[0]
        self._dot = torch.zeros((), dtype=torch.float64, device=self.device)
        self._pending, self._pending_bytes = [], 0
        hooks = [p.register_post_accumulate_grad_hook(self._consume_grad) for p in self.params]
        try:
            with precision_context(self.grad_precision, self.device):
                total, n = token_loss_sum(self.model, batch)
                loss = total / n  # batch of one, token mean: the ordinary training loss
            if not torch.isfinite(loss):
                return invalid("non_finite_loss")
            loss.backward()
            self._flush()
        except BaseException:
            if in_place:
                self._restore()
            raise
        finally:
            for h in hooks:
                h.remove()
            for p in self.params:
                p.grad = None
            self._pending, self._pending_bytes = [], 0
        self.timing["step"] = self._since(started)
        if self.estimator == "linear":
            return self._linear_result(example, float(self._dot))
        started = time.perf_counter()
        if not in_place:  # θ_z sits in the shadow buffers: swap it in, and back afterwards
            self._swap_shadow()
        try:
            after = reference_loss(self.model, self.batches, self.precision)
        finally:
            self._restore() if in_place else self._swap_shadow()
        self.timing["eval"] = self._since(started)
        if not math.isfinite(after):
            return invalid("non_finite_loss", None)
        return InfluenceResult(example.id, self.loss_before - after, self.loss_before, after, "ok", "exact")

    def _linear_result(self, example: Example, dot: float) -> InfluenceResult:
        """I(z) ≈ -∇L_ref·Δ_z: the Adam part (dot) and the weight-decay part -lr·wd·∇L_ref·θ."""
        influence = -(dot - self.lr * self.state.weight_decay * self.ref_dot_theta)
        if not math.isfinite(influence):  # a non-finite candidate loss makes the gradient non-finite
            return InfluenceResult(example.id, None, self.loss_before, None, "non_finite_loss", "linear")
        return InfluenceResult(example.id, influence, self.loss_before, None, "ok", "linear")


def compute_influence(student, optimizer_state, candidates: Sequence[Pair], reference: Sequence[Pair], *,
                      tokenizer=None, settings: InfluenceSettings | None = None,
                      on_result: Callable[[InfluenceResult], None] | None = None, progress: bool = False,
                      **knobs) -> list[InfluenceResult]:
    """Influence of each candidate pair on the reference set, from one warm-up state (notebook API).

    student: an fp32 HF causal LM (model and `tokenizer`), or a (model, tokenizer) tuple.
    optimizer_state: a `torch.optim.AdamW` state_dict over `student.parameters()`, or an AdamWState.
    settings: an InfluenceSettings (default: the config's defaults, the linear estimator); keywords
    named like its fields override it: `compute_influence(..., estimator="exact")`.
    Returns one InfluenceResult per candidate, in order; `on_result` sees each as soon as it is ready.
    """
    from tqdm.auto import tqdm
    if isinstance(student, tuple):
        student, tokenizer = student
    if tokenizer is None:
        raise ValueError("compute_influence needs the student's tokenizer")
    settings = replace(settings or InfluenceSettings(), **knobs)
    params = list(student.parameters())
    state = optimizer_state if isinstance(optimizer_state, AdamWState) else \
        AdamWState.from_state_dict(optimizer_state, params)
    reference = encode_pairs(tokenizer, reference, settings.reference_max_length or settings.max_length)
    results, engine = [], None
    try:  # the engine inside: whatever fails, close() gives the student back as it was
        engine = InfluenceEngine(student, state, reference, pad_id=tokenizer.pad_token_id or 0, settings=settings)
        examples = encode_pairs(tokenizer, candidates, settings.max_length)
        for result in tqdm(engine.score_many(examples), total=len(examples),
                           desc=f"influence ({settings.estimator})", unit="cand", disable=not progress):
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        if engine is not None:
            engine.close()
    return results
