"""The linear estimator's fast path: one fused elementwise pass per parameter, and CUDA graphs.

It computes the engine's linear value, the Adam part of ∇L_ref · Δ_z, differently, not a different quantity:

  - the candidate's gradient at θ_warm comes from a copy of the student (its weights are bf16 when
    the candidate gradient is bf16: the cast autocast would make on every forward, made once);
  - each parameter's gradient is consumed the moment backward completes it
    (`register_post_accumulate_grad_hook`): the AdamW update and its dot with ∇L_ref are one
    elementwise reduction over that parameter (`adam_dot_rows`), fused by torch.compile on CUDA into
    one read of g, m, v, ∇L_ref (eager, the same arithmetic is ~10 passes over memory), and the
    gradient is freed. No full gradient is ever held, nothing is zeroed or accumulated into: the gradient's
    only memory traffic is the matmul writing it and the fused pass reading it (a gradient buffer
    that backward accumulates into costs 3 more passes: zero, read, write);
  - the candidate is right-padded to a multiple of `pad_multiple` tokens (under causal attention,
    padding after the last token changes no earlier position, and it carries no loss), so a few static
    shapes cover every candidate and each is captured once as a CUDA graph: one launch replaces the
    ~3,000 kernel launches of an eager forward/backward, which made the eager step host-bound;
  - attention runs on the math backend (SDPA_BACKENDS), so a candidate's value is the same bit for
    bit every time it is scored;
  - `compile_model` compiles the copy's decoder layers (inductor fuses their small elementwise kernels);
  - `submit` only queues a candidate: the engine queues the next one before it reads a value.

Why our own code here and not a library: the eager engine's step measured 0.13 s per TinyLlama-1.1B
candidate on an H200, of which 41 ms GPU time; this path 17 ms (with the layers compiled, 25 ms
without); docs/benchmarks.md has the numbers for this path.
Memory: the copy's weights (2 bytes per parameter in bf16) on top of θ, m, v and ∇L_ref; when that
does not fit the device, the fp32 θ waits on the host (`offload`) and `close()` brings it back bit for bit.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from montessori.models.batching import precision_context
from montessori.models.chat import IGNORE_INDEX

log = logging.getLogger(__name__)

CHUNK = 1 << 26  # elements per adam_dot call at most: bounds eager temporaries, keeps indices in int32
ROW = 1024  # adam_dot_rows' row width; CHUNK is a multiple of it
# Attention of the candidate step: math, the deterministic backend. Left free, SDPA picked cuDNN for
# bf16 on Hopper; captured in the CUDA graphs, its backward made two scorings of the same candidates
# differ by up to 22x (relative) on a random TinyLlama-1.1B, H200; with math, bit for bit. Flash or
# cuDNN under torch.use_deterministic_algorithms were no faster (28 ms vs 27 ms per candidate),
# memory-efficient attention 2.6 ms faster but not deterministic (docs/benchmarks.md).
SDPA_BACKENDS = [SDPBackend.MATH]


def adam_ratio(g, m, v, b1: float, b2: float, bc2_sqrt: float, eps: float) -> torch.Tensor:
    """m'/denom of one chunk (in place on its own temporaries): the Adam part of core.adamw_delta,
    Δ = -lr/(1-β1^t) · m'/denom - lr·wd·θ, in torch's order of operations (tests/test_influence_core.py
    holds this, the engine's foreach form and core's to the same values)."""
    g = g.float()
    m1 = torch.lerp(m, g, 1 - b1)
    denom = torch.addcmul(v * b2, g, g, value=1 - b2).sqrt_().div_(bc2_sqrt).add_(eps)
    return m1.div_(denom)


def adam_dot(r, g, m, v, *consts) -> torch.Tensor:
    """Σ r · m'/denom (the caller multiplies by -lr/(1-β1^t))."""
    return torch.dot(r.float(), adam_ratio(g, m, v, *consts))


def adam_dot_rows(r, g, m, v, *consts) -> torch.Tensor:
    """adam_dot over (rows, ROW) views, summed row by row: the form torch.compile turns into one pass
    over r, g, m, v (a reduction of static width per row, then a sum of the row sums). Measured on the
    H200 (TinyLlama-1.1B, per candidate): `torch.dot` over a dynamic length compiled to a pointwise kernel
    writing every product plus a reduction kernel reading them back (22 instead of 14 bytes per parameter,
    6.2 ms); so did this sum when it viewed a 1-D input as rows inside the compiled function (6.5 ms:
    inductor cannot match the dynamic n with (n/ROW)·ROW), hence the caller passes the 2-D views."""
    return (r.float() * adam_ratio(g, m, v, *consts)).sum(1).double().sum()


class FastLinear:
    """Scores candidates for InfluenceEngine's linear estimator: `dot(input_ids, labels)` returns
    -lr/(1-β1^t) · Σ ∇L_ref · m'/denom (computed in fp64), the engine's `_dot`; `submit` queues it.

    model: the fp32 student at θ_warm (not modified; if `offload`, its weights wait on the host until
    `close()`). state: AdamWState (moments anywhere; moved to the device). ref_grad: ∇L_ref per parameter."""

    def __init__(self, model, state, ref_grad: list[torch.Tensor], *, lr: float, grad_dtype: torch.dtype,
                 grad_precision: str, pad_multiple: int = 64, graphs: bool = False, offload: bool = False,
                 compile_model: bool = False):
        self.params = list(model.parameters())
        self.device = self.params[0].device
        # A bf16 copy needs no autocast (which would also run norms and losses in fp32 on bf16 weights).
        self.state, self.lr = state, lr
        # The bf16 copy's only fp32 matmuls are the math attention's (it computes bf16 inputs in fp32):
        # tf32 holds bf16 inputs exactly, and it is ~8x faster there.
        self.grad_precision = grad_precision if grad_dtype == torch.float32 else "tf32"
        self.pad_multiple, self.use_graphs = pad_multiple, graphs and self.device.type == "cuda"
        self.ref_grad = ref_grad
        state.to(self.device)  # load_warmup leaves the moments on the host
        # What close() undoes, empty until built: close() also runs when __init__ fails part way.
        self.host, self.student, self.own, self.forward = None, None, None, None
        self.hooks, self.compiled, self.graphs, self.pool = [], [], {}, None
        try:
            if offload:  # first, so that the copy below never meets θ on the device
                self.host = [p.detach().to("cpu", copy=True) for p in self.params]
                if self.device.type == "cuda":
                    self.host = [h.pin_memory() for h in self.host]
                for p in self.params:
                    p.data = torch.empty(0, dtype=p.dtype, device=self.device)
            source = self.host or [p.detach() for p in self.params]
            if grad_dtype == torch.float32 and not offload:  # the student itself: only hooks on it are borrowed
                self.student, self.own = model, self.params
            else:  # a copy whose parameters are in grad_dtype
                memo = {id(p): torch.nn.Parameter(src.to(self.device, grad_dtype, copy=True),
                                                  requires_grad=p.requires_grad) for p, src in zip(self.params, source)}
                self.student = copy.deepcopy(model, memo)  # parameters from memo: no fp32 copy is made
                self.own = list(self.student.parameters())
            # compile_model: inductor fuses the forward's (and through AOTAutograd the backward's) small
            # elementwise kernels (norms, rotary, SiLU). Layer by layer ("regional compilation"): every decoder
            # layer runs the same compiled code, so compiling costs one layer's time, not the model's (the
            # whole 22-layer TinyLlama did not compile within 150 s on the H200's host); dynamic shapes: one
            # compilation for every length. (A copy never inherits a Module.compile() of the student:
            # Module.__getstate__ drops it; if the student itself takes the gradient, `close` undoes it.)
            self.forward = self.student.base_model
            self.compiled = []
            if compile_model:
                layers = getattr(self.forward, "layers", None)
                if isinstance(layers, torch.nn.ModuleList):
                    self.compiled = [layer for layer in layers if getattr(layer, "_compiled_call_impl", None) is None]
                    for layer in self.compiled:
                        layer.compile(dynamic=True)
                elif getattr(self.forward, "_compiled_call_impl", None) is None:
                    self.forward = torch.compile(self.forward, dynamic=True)
            # Each parameter's index in state and ref_grad (the copy's parameters are in the student's
            # order); its gradient is consumed by `_consume` as soon as backward completes it.
            self.index = {p: i for i, p in enumerate(self.own)}
            self.hooks = [p.register_post_accumulate_grad_hook(self._consume) for p in self.own]
            b1, b2 = state.betas
            t = state.step + 1
            self.consts = (b1, b2, (1 - b2 ** t) ** 0.5, state.eps)
            self.scale = -lr / (1 - b1 ** t)
            self.parts: list[torch.Tensor] = []
            self.out = torch.zeros((), dtype=torch.float64, device=self.device)
            self._dot_fn = adam_dot_rows
            if self.device.type == "cuda":  # on the CPU inductor's kernel gains nothing (matmul-bound step)
                # Compiled here, never inside backward (in a hook) or a capture, and with grad mode off as
                # inside backward (dynamo guards on it). A kernel that torch.compile(dynamic=True) compiled in
                # the first hook, for a 2,048-element norm weight, reduced every parameter in one block (0.46 s
                # per TinyLlama-1.1B candidate on the H200). Now: automatic dynamic shapes, compiled for the
                # two largest row counts, so the row count is dynamic and the row width (the reduction) static.
                self._dot_fn = torch.compile(adam_dot_rows, fullgraph=True)
                sizes = sorted({min(CHUNK, p.numel()) // ROW for p in self.own if p.numel() >= ROW}, reverse=True)
                with torch.no_grad(), precision_context(self.grad_precision, self.device):  # as in the hooks:
                    for rows in sizes[:2]:  # dynamo guards on allow_tf32 too
                        sample = (torch.zeros(rows, ROW, dtype=ref_grad[0].dtype, device=self.device),
                                  torch.zeros(rows, ROW, dtype=grad_dtype, device=self.device),
                                  *(torch.zeros(rows, ROW, dtype=state.exp_avg[0].dtype, device=self.device)
                                    for _ in range(2)))
                        self._dot(*sample, *self.consts)
            self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        except BaseException:  # θ may be on the host already: give it back before the error propagates
            self.close()
            raise

    # One candidate, static shapes only and no host synchronisation: the body of a CUDA graph.
    # The causal mask is given as a prepared 4-D mask (True: attend), the same tensor in the warm-up runs
    # and in the capture: left to transformers, it is None (SDPA's is_causal) outside a capture and a
    # mask built inside one (it treats capturing as tracing), which made a compiled layer recompile
    # inside the capture (a CUDA error).
    def _step(self, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        self.parts = []
        with precision_context(self.grad_precision, self.device), sdpa_kernel(SDPA_BACKENDS):
            hidden = self.forward(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            logits = self.student.get_output_embeddings()(hidden[0, :-1]).float()
            targets = labels[0, 1:]
            total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            (total / (targets != IGNORE_INDEX).sum()).backward()  # token mean, as the engine's step
        self.out.copy_(torch.stack(self.parts).double().sum() * self.scale)
        self.parts = []

    # Runs inside backward when p's gradient is complete (backward no longer reads it): its share of
    # the dot, in chunks of at most CHUNK elements, then the gradient is freed.
    def _consume(self, p: torch.nn.Parameter) -> None:
        i = self.index[p]
        r, g, m, v = (t.reshape(-1) for t in (self.ref_grad[i], p.grad, self.state.exp_avg[i],
                                               self.state.exp_avg_sq[i]))
        n = g.numel()
        rows = n - n % ROW
        for j in range(0, rows, CHUNK):  # whole rows: the compiled (one-pass) reduction
            k = min(j + CHUNK, rows)
            self.parts.append(self._dot(*(t[j:k].view(-1, ROW) for t in (r, g, m, v)), *self.consts))
        if rows < n:  # the last n % ROW elements (a norm weight of a 576-wide model, say): eager
            self.parts.append(adam_dot(r[rows:], g[rows:], m[rows:], v[rows:], *self.consts).double())
        p.grad = None

    def _dot(self, *args) -> torch.Tensor:
        """adam_dot_rows, fused by torch.compile on CUDA where it compiles (compiled in __init__, never
        inside a capture), else eager."""
        try:
            return self._dot_fn(*args)
        except Exception as e:  # noqa: BLE001 - no Triton, an inductor bug: the eager form is the same math
            if self._dot_fn is adam_dot_rows:
                raise
            log.warning("torch.compile of the update pass failed (%s); running it eagerly", e)
            self._dot_fn = adam_dot_rows
            return adam_dot_rows(*args)

    def _width(self, n: int) -> int:
        width = math.ceil(n / self.pad_multiple) * self.pad_multiple
        limit = getattr(self.student.config, "max_position_embeddings", None)
        return n if limit and width > limit >= n else width

    def dot(self, input_ids: Sequence[int], labels: Sequence[int]) -> float:
        return self.submit(input_ids, labels)()

    def submit(self, input_ids: Sequence[int], labels: Sequence[int]) -> Callable[[], float]:
        """Queue one candidate's step; returns a function that waits for its value (`dot`'s).

        On CUDA nothing here waits for the GPU (pinned inputs, value copied to pinned host memory behind
        an event), so the engine queues the next candidate before it reads this one's value and the
        host's share of a candidate (~4 ms on the H200: building inputs, launching the graph, reading
        the value) overlaps the GPU's."""
        n = len(input_ids)
        width = self._width(n)
        if width not in self.inputs:
            causal = torch.ones((width, width), dtype=torch.bool, device=self.device).tril_()
            self.inputs[width] = (torch.empty((1, width), dtype=torch.long, device=self.device),
                                  torch.empty((1, width), dtype=torch.long, device=self.device), causal[None, None])
        ids, lab, mask = self.inputs[width]
        pad = width - n
        cuda = self.device.type == "cuda"
        # copies ordered on the stream after the previous candidate's step, which reads the same buffers
        ids.copy_(torch.tensor([list(input_ids) + [0] * pad], pin_memory=cuda),  # pad id: no position sees it
                  non_blocking=cuda)
        lab.copy_(torch.tensor([list(labels) + [IGNORE_INDEX] * pad], pin_memory=cuda), non_blocking=cuda)
        if not self.use_graphs:
            self._step(ids, lab, mask)
        else:
            graph = self.graphs.get(width)
            if graph is None:
                graph = self.graphs[width] = self._capture(ids, lab, mask)
            graph.replay()
        host = torch.empty((), dtype=torch.float64, pin_memory=cuda)  # this candidate's own: `out` is reused
        host.copy_(self.out, non_blocking=cuda)
        if not cuda:
            return lambda: float(host)
        done = torch.cuda.Event()
        done.record()

        def wait() -> float:
            done.synchronize()
            return float(host)
        return wait

    def _capture(self, ids, lab, mask) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (cuBLAS workspaces, autograd, compilation), then capture one step.
        All graphs share one memory pool: they never run concurrently and leave nothing live in it
        (inputs and output live outside; gradients are freed inside the step)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(ids, lab, mask)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step(ids, lab, mask)
        self.pool = self.pool or graph.pool()
        log.debug("captured the linear step for %d tokens", ids.shape[1])
        return graph

    def close(self) -> None:
        """Drop graphs and the copy, then give the student its hooks and (if offloaded) its weights back:
        in that order, so that θ finds room on the device."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.pool = None
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for layer in self.compiled:  # Module.compile() undone (it only matters on the student itself)
            layer._compiled_call_impl = None
        self.compiled = []
        for p in self.own or []:
            p.grad = None
        self.student = self.own = self.forward = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.host is not None:
            for p, h in zip(self.params, self.host):
                p.data = h.to(self.device)
            self.host = None
