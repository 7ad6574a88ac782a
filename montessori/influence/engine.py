"""Local data influence: I(z) = L_ref(θ_warm) - L_ref(θ_z), θ_z = one AdamW step on z from the warm-up state.

Two estimators of the same definition:

  exact   take the step, evaluate the reference set, restore. The stepped weights are written into a
          separate buffer (`shadow`) and swapped in by pointer, so θ_warm is never modified and the
          restore is bit-exact by construction; m, v and the step count are only read.
  linear  the first-order Taylor form I(z) ≈ -∇L_ref(θ_warm) · Δ_z, with Δ_z the exact AdamW update
          z causes (real moments, real step count), computed elementwise and never applied.

L_ref is the token-mean cross-entropy over all response tokens of the reference set: the sum of
token losses divided by the token count, accumulated in fp64 across batches (and across processes
with torch.distributed), so it does not depend on the evaluation batch size or on how many
processes share the reference set.

Memory: the candidate's gradient is consumed parameter by parameter as soon as backward produces it
(`register_post_accumulate_grad_hook`) and dropped, so a full gradient never exists. The resident
state is θ, m, v (fp32) plus one more fp32 copy: the shadow weights (exact) or ∇L_ref (linear).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from montessori.models.chat import IGNORE_INDEX, encode_example, user_turn
from montessori.records import InfluenceResult, Pair

PRECISIONS = ("fp32", "tf32", "bf16")
ESTIMATORS = ("exact", "linear")
LOGIT_CHUNK = 4096  # response positions per lm_head call: bounds the fp32 logits (4096 x vocab)


# ---------------------------------------------------------------------------------------------
# Precision, data, loss


@contextmanager
def precision_context(precision: str, device: torch.device):
    """fp32: true fp32 matmuls. tf32: TF32 tensor-core matmuls (CUDA only; a no-op on CPU).
    bf16: bf16 autocast over fp32 master weights."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {PRECISIONS}")
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens

    @property
    def num_targets(self) -> int:
        return sum(1 for y in self.labels[1:] if y != IGNORE_INDEX)


def encode_pairs(tokenizer, pairs: Iterable[Pair], max_length: int | None) -> list[Example]:
    """Each pair as one user turn + its response, prompt tokens masked (the project-wide encoding)."""
    out = []
    for p in pairs:
        ids, labels = encode_example(tokenizer, user_turn(p.instruction), p.response, max_length=max_length)
        out.append(Example(p.id, ids, labels))
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def length_batches(examples: Sequence[Example], batch_size: int, pad_id: int, device) -> list[Batch]:
    """Sort by length and cut into batches (right-padded): similar lengths together, little padding."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    batches = []
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i:i + batch_size]
        width = len(chunk[-1].input_ids)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        batches.append(Batch(ids.to(device), mask.to(device), labels.to(device)))
    return batches


def token_loss_sum(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """(sum of response-token cross-entropies in fp32, number of response tokens).

    The lm_head runs only on response positions, in chunks: prompt positions need no logits, and a
    full (batch, length, vocab) fp32 logits tensor would be ~8 GB for Llama-3's vocabulary."""
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              use_cache=False).last_hidden_state
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h, y = hidden[:, :-1][keep], targets[keep]
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, y.numel(), LOGIT_CHUNK):
        logits = head(h[i:i + LOGIT_CHUNK]).float()
        total = total + F.cross_entropy(logits, y[i:i + LOGIT_CHUNK], reduction="sum")
    return total, int(y.numel())


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
def reference_loss(model, batches: Sequence[Batch], precision: str = "fp32") -> float:
    """Token-mean response loss over the whole reference set: Σ token losses / Σ tokens (fp64)."""
    device = batches[0].input_ids.device
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    with precision_context(precision, device):
        for batch in _my_share(batches):
            s, n = token_loss_sum(model, batch)
            acc += torch.stack([s.double(), torch.tensor(float(n), dtype=torch.float64, device=device)])
    total, count = _all_reduce(acc).tolist()
    return total / count if count else float("nan")


def reference_grad(model, batches: Sequence[Batch], precision: str = "fp32") -> list[torch.Tensor]:
    """∇L_ref(θ) with L_ref the token mean: each batch contributes Σ losses / N_total, so gradients
    accumulate in the fp32 .grad of the fp32 master weights, independent of batching."""
    device = batches[0].input_ids.device
    count = sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    params = list(model.parameters())
    for p in params:
        p.grad = None
    with precision_context(precision, device):
        for batch in _my_share(batches):
            s, _ = token_loss_sum(model, batch)
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
                m.append(s["exp_avg"].to(p.device, torch.float32))
                v.append(s["exp_avg_sq"].to(p.device, torch.float32))
                steps.add(int(float(s["step"])))
        if len(steps) > 1:
            raise ValueError(f"parameters have different step counts {sorted(steps)}")
        return cls(m, v, steps.pop() if steps else 0, float(group["lr"]), tuple(group["betas"]),
                   float(group["eps"]), float(group["weight_decay"]))


def adamw_moments(g, m, v, step: int, betas, eps):
    """torch.optim.AdamW's moment update and denominator, op for op, into new tensors (m, v untouched).
    Returns (m', denom, bias correction 1-β1^t) for t = step + 1."""
    b1, b2 = betas
    t = step + 1
    m1 = m.lerp(g, 1 - b1)
    v1 = v.mul(b2).addcmul_(g, g, value=1 - b2)
    denom = v1.sqrt_().div_((1 - b2 ** t) ** 0.5).add_(eps)
    return m1, denom, 1 - b1 ** t


def stepped_weights(theta, g, m, v, out, step: int, lr: float, betas, eps: float, weight_decay: float):
    """θ_z = θ(1 - lr·wd) - lr/(1-β1^t) · m'/denom, written into `out` (torch.optim.AdamW's step)."""
    m1, denom, bc1 = adamw_moments(g, m, v, step, betas, eps)
    torch.mul(theta, 1 - lr * weight_decay, out=out)
    return out.addcdiv_(m1, denom, value=-lr / bc1)


def update_dot(ref_grad, theta, g, m, v, step: int, lr: float, betas, eps: float, weight_decay: float):
    """∇L_ref · Δ_z with Δ_z = -lr/(1-β1^t) · m'/denom - lr·wd·θ, never forming θ_z (fp32, one scalar)."""
    m1, denom, bc1 = adamw_moments(g, m, v, step, betas, eps)
    delta = m1.div_(denom).mul_(-lr / bc1).add_(theta, alpha=-lr * weight_decay)
    return torch.dot(ref_grad.flatten(), delta.flatten())


# ---------------------------------------------------------------------------------------------
# The engine


class InfluenceEngine:
    """Holds the warm-up state in memory and scores candidates one at a time, never disturbing it."""

    def __init__(self, model, state: AdamWState, reference: Sequence[Example], *, pad_id: int,
                 estimator: str = "exact", precision: str = "fp32", grad_precision: str = "fp32",
                 eval_batch_size: int = 8, lr: float | None = None, compile: bool = False):
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator {estimator!r}: choose one of {ESTIMATORS}")
        self.model, self.state, self.estimator = model, state, estimator
        self.precision, self.grad_precision = precision, grad_precision
        self.lr = state.lr if lr is None else lr
        self.params = list(model.parameters())
        self.device = self.params[0].device
        if any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("the influence engine needs fp32 master weights (precision is set by `precision`)")
        self.batches = length_batches(reference, eval_batch_size, pad_id, self.device)
        model.eval()  # no dropout: the same state must give the same value
        self.loss_before = reference_loss(model, self.batches, precision)
        if estimator == "linear":  # one example per backward: activations of a batch would not fit an 8B
            self.ref_grad = reference_grad(model, length_batches(reference, 1, pad_id, self.device), precision)
        else:
            self.shadow = [torch.empty_like(p) for p in self.params]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        # torch.compile fuses each update into one elementwise kernel (no m', v', denom temporaries).
        wrap = (lambda f: torch.compile(f, dynamic=True)) if compile else (lambda f: f)
        self._stepped, self._update_dot = wrap(stepped_weights), wrap(update_dot)
        self.timing = {"step": 0.0, "eval": 0.0}  # seconds of the last candidate (synchronized on CUDA)

    # Runs inside backward as soon as parameter p's gradient is complete; the gradient is then dropped.
    def _consume_grad(self, p: torch.nn.Parameter) -> None:
        i, g, s = self._index[id(p)], p.grad.float(), self.state
        p.grad = None
        hyper = (s.step, self.lr, s.betas, s.eps, s.weight_decay)
        if self.estimator == "exact":
            self._stepped(p.detach(), g, s.exp_avg[i], s.exp_avg_sq[i], self.shadow[i], *hyper)
        else:
            self._dot += self._update_dot(self.ref_grad[i], p.detach(), g, s.exp_avg[i], s.exp_avg_sq[i], *hyper).double()

    def _since(self, started: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def _swap_shadow(self) -> None:
        """Exchange θ and the shadow buffers by pointer: no copy, and θ itself is never written."""
        for i, p in enumerate(self.params):
            self.shadow[i], p.data = p.data, self.shadow[i]

    def score(self, example: Example) -> InfluenceResult:
        started = time.perf_counter()
        result = self._score(example)
        result.seconds = round(time.perf_counter() - started, 4)
        return result

    def _score(self, example: Example) -> InfluenceResult:
        def invalid(status, after=None):
            return InfluenceResult(example.id, None, self.loss_before, after, status, self.estimator)
        if example.num_targets == 0:
            return invalid("empty_response")
        started = time.perf_counter()
        batch = length_batches([example], 1, 0, self.device)[0]
        self._dot = torch.zeros((), dtype=torch.float64, device=self.device)
        hooks = [p.register_post_accumulate_grad_hook(self._consume_grad) for p in self.params]
        try:
            with precision_context(self.grad_precision, self.device):
                total, n = token_loss_sum(self.model, batch)
                loss = total / n  # batch of one, token mean: the ordinary training loss
            if not torch.isfinite(loss):
                return invalid("non_finite_loss")
            loss.backward()
        finally:
            for h in hooks:
                h.remove()
            for p in self.params:
                p.grad = None
        self.timing["step"] = self._since(started)
        if self.estimator == "linear":
            influence = -float(self._dot)
            if not math.isfinite(influence):
                return invalid("non_finite_loss")
            return InfluenceResult(example.id, influence, self.loss_before, None, "ok", "linear")
        started = time.perf_counter()
        self._swap_shadow()
        try:
            after = reference_loss(self.model, self.batches, self.precision)
        finally:
            self._swap_shadow()
        self.timing["eval"] = self._since(started)
        if not math.isfinite(after):
            return invalid("non_finite_loss", None)
        return InfluenceResult(example.id, self.loss_before - after, self.loss_before, after, "ok", "exact")


def compute_influence(student, optimizer_state, candidates: Sequence[Pair], reference: Sequence[Pair], *,
                      tokenizer=None, estimator: str = "exact", precision: str = "fp32",
                      grad_precision: str | None = None, eval_batch_size: int = 8, max_length: int = 1024,
                      reference_max_length: int | None = None, lr: float | None = None, compile: bool = False,
                      on_result: Callable[[InfluenceResult], None] | None = None,
                      progress: bool = False) -> list[InfluenceResult]:
    """Influence of each candidate pair on the reference set, from one warm-up state (notebook API).

    student: an fp32 HF causal LM (model and `tokenizer`), or a (model, tokenizer) tuple.
    optimizer_state: a `torch.optim.AdamW` state_dict over `student.parameters()`, or an AdamWState.
    Returns one InfluenceResult per candidate, in order; `on_result` sees each as soon as it is ready.
    """
    from tqdm.auto import tqdm
    if isinstance(student, tuple):
        student, tokenizer = student
    if tokenizer is None:
        raise ValueError("compute_influence needs the student's tokenizer")
    params = list(student.parameters())
    state = optimizer_state if isinstance(optimizer_state, AdamWState) else \
        AdamWState.from_state_dict(optimizer_state, params)
    engine = InfluenceEngine(student, state, encode_pairs(tokenizer, reference, reference_max_length or max_length),
                             pad_id=tokenizer.pad_token_id or 0, estimator=estimator, precision=precision,
                             grad_precision=grad_precision or precision, eval_batch_size=eval_batch_size, lr=lr,
                             compile=compile)
    results = []
    for example in tqdm(encode_pairs(tokenizer, candidates, max_length), desc=f"influence ({estimator})",
                        unit="cand", disable=not progress):
        result = engine.score(example)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
