"""Local data influence, the definition (docs/method.md, step 5), written to be read rather than to be fast.

    I(z) = L(D_ref; θ_warm) − L(D_ref; θ_z),    θ_z = θ_warm + Δ_z
    Δ_z  = one AdamW step on z alone from the warm-up state (its moments m, v and step count t)
    linear:  I(z) ≈ −∇L(D_ref; θ_warm) · Δ_z    (first order in Δ_z; Δ_z is never applied)

L is the token mean of the cross-entropy on response tokens: Σ token losses / Σ response tokens over
the whole set (prompt tokens masked). engine.py (memory layouts, batching, 8B on one GPU) and fast.py
(the CUDA step) compute the same numbers at scale; tests/test_influence_core.py holds them to this
file, and this file to a deep copy of the model stepped by torch.optim.AdamW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from montessori.models.batching import Example


def loss(model, examples: list[Example]) -> torch.Tensor:
    """L(D; θ): every response token of D weighs the same, whatever its example's length."""
    device = next(model.parameters()).device
    total = 0.0
    for e in examples:
        logits = model(torch.tensor([e.input_ids], device=device)).logits[0, :-1].float()
        targets = torch.tensor(e.labels[1:], device=device)  # token k predicts token k+1
        total = total + F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").double()
    return total / sum(e.num_targets for e in examples)


def adamw_delta(theta, g, m, v, *, step: int, lr: float, betas, eps: float, weight_decay: float):
    """Δ of torch.optim.AdamW's next step (t = step + 1), bias-corrected, decoupled weight decay."""
    (b1, b2), t = betas, step + 1
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return -lr * (m_hat / (v_hat.sqrt() + eps) + weight_decay * theta)


def step_delta(model, optimizer_state: dict, z: Example, lr: float | None = None) -> list[torch.Tensor]:
    """Δ_z per parameter. optimizer_state: `torch.optim.AdamW(model.parameters()).state_dict()`."""
    group, state = optimizer_state["param_groups"][0], optimizer_state["state"]
    params = list(model.parameters())
    grads = torch.autograd.grad(loss(model, [z]), params)  # batch of one: the ordinary training loss
    deltas = []
    for i, (p, g) in enumerate(zip(params, grads)):
        s = state.get(i, {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p), "step": 0})
        deltas.append(adamw_delta(p.detach(), g, s["exp_avg"].to(p.device), s["exp_avg_sq"].to(p.device),
                                  step=int(s["step"]), lr=group["lr"] if lr is None else lr,
                                  betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"]))
    return deltas


def exact_influence(model, optimizer_state: dict, z: Example, reference: list[Example],
                    lr: float | None = None) -> float:
    """Take the step, measure the reference loss, put θ_warm back."""
    model.eval()  # no dropout: the same state gives the same value
    deltas = step_delta(model, optimizer_state, z, lr)
    params = list(model.parameters())
    warm = [p.detach().clone() for p in params]
    with torch.no_grad():
        before = loss(model, reference)
        for p, d in zip(params, deltas):
            p.add_(d)
        after = loss(model, reference)
        for p, w in zip(params, warm):
            p.copy_(w)
    return float(before - after)


def linear_influence(model, optimizer_state: dict, z: Example, reference: list[Example],
                     lr: float | None = None) -> float:
    """−∇L(D_ref; θ_warm) · Δ_z, summed in fp64."""
    model.eval()
    ref_grad = torch.autograd.grad(loss(model, reference), list(model.parameters()))
    deltas = step_delta(model, optimizer_state, z, lr)
    return -float(sum(torch.dot(r.flatten().double(), d.flatten().double()) for r, d in zip(ref_grad, deltas)))
